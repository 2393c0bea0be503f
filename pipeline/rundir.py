"""The run directory: what a training or federated run leaves behind, written crash-safely.

Layout (``docs/DESIGN.md``): ``params.npz`` (named arrays), ``metrics.jsonl`` (one JSON object
per iteration/epoch/round), ``summary.json``, ``config.toml`` and ``checkpoint.npz`` (flat arrays
plus a JSON ``meta`` dict). Every whole-file write goes to a temporary file in the same directory,
is fsynced and then ``os.replace``-d over the target, so a crash mid-write leaves the previous
version intact; ``metrics.jsonl`` is append-only and trimmed on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from fedpipe.errors import ValidationError

log = logging.getLogger("fedpipe")

PARAMS = "params.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
CHECKPOINT = "checkpoint.npz"
PREVIOUS_CHECKPOINT = "checkpoint.1.npz"
_META_KEY = "__meta__"

RunDir = Path  # a run directory is just a path; the functions below are its whole API


class Run(NamedTuple):
    """A run: what :func:`fedpipe.engine.train.fit` and :func:`fedpipe.engine.federate.federate`
    return and what :func:`load_run` reads back from its directory, the same value all three.

    A finished run is a self-contained model (``model.json``, ``preprocess.json``,
    ``params.npz``): :meth:`predict` and :meth:`predict_proba` need neither the training store
    nor the code that built the model.

    Attributes
    ----------
    params : ndarray
        The flat float64 parameter vector (``load_run``: ``named`` ravelled in order).
    named : dict of str to ndarray
        The model's ``unpack(params)``, as in ``params.npz``.
    metrics : list of dict
        One record per iteration, epoch or round, as in ``metrics.jsonl``; a federated run
        started in this process keeps each round's record without its per-client records
        (``clients``, in ``metrics.jsonl`` only), so memory does not grow with clients.
    summary : dict
        ``summary.json``.
    config : dict
        ``config.toml``: the configuration written for the run ({} when it had no run directory).
    path : Path or None
        The run directory (None for a run without one).
    state : ServerState or None
        A federated run's final state on the driver (params, server optimizer state, stage
        states, control, round, seed), what its checkpoint holds; None otherwise.
    """

    params: np.ndarray
    named: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]
    path: Path | None = None
    state: Any = None

    def predict(self, X: Any) -> Any:
        """Predictions in the original labels; see :func:`fedpipe.model.predict.predict`."""
        from fedpipe.model import predict, saved

        return predict.predict(saved.load(self._dir()), X)

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, columns in the order of ``preprocess.json``'s ``classes``."""
        from fedpipe.model import predict, saved

        return predict.predict(saved.load(self._dir()), X, proba=True)

    def to_sklearn(self) -> Any:
        """A fitted scikit-learn ``Pipeline`` (preprocessing + model) predicting the same."""
        from fedpipe.model import saved, sklearn_export

        return sklearn_export.to_sklearn(saved.load(self._dir()))

    def _dir(self) -> Path:
        if self.path is None:
            raise ValidationError("this Run was not read from a run directory")
        return self.path


RESULTS = (PARAMS, SUMMARY, METRICS, CHECKPOINT, PREVIOUS_CHECKPOINT, "model.json",
           "preprocess.json")  # what a run must never lose to a later one
_STAGING = re.compile(r"^\.(?P<name>.+)\.staging-[0-9a-f]{8}$")


def prepare(out: str | os.PathLike[str], resume: bool = False, overwrite: bool = False) -> Path:
    """The directory a run writes into; an earlier run's results are never destroyed early.

    Parameters
    ----------
    out : path
        The run directory (created with its parents when missing).
    resume : bool
        Continue the run in ``out`` from its checkpoint (writes in place).
    overwrite : bool
        ``out`` holds an earlier run's results and the new run replaces them. The new run then
        writes into a staging directory beside ``out`` that :func:`publish` swaps into place
        when it ends, so a run that fails or is killed leaves the earlier results whole.

    Returns
    -------
    pathlib.Path
        Where the run writes: ``out`` itself, or its staging directory.

    Raises
    ------
    ValidationError
        ``out`` is a file, or holds an earlier run's results and neither ``resume`` nor
        ``overwrite`` was given.
    """
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValidationError(f"--out {run_dir} exists and is not a directory")
    earlier = [name for name in RESULTS if (run_dir / name).exists()]
    if resume or not earlier:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    if not overwrite:
        raise ValidationError(f"--out {run_dir} holds an earlier run ({', '.join(earlier)}); "
                              "choose another --out, --resume it, or pass --overwrite")
    for stale in run_dir.parent.glob(f".{run_dir.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a replacement run that failed or was killed
    staging = run_dir.parent / f".{run_dir.name}.staging-{os.urandom(4).hex()}"
    staging.mkdir()
    return staging


def target(run_dir: str | os.PathLike[str]) -> Path:
    """The directory a run's results end up in (``out``, also while it writes to staging)."""
    run_dir = Path(run_dir)
    match = _STAGING.match(run_dir.name)
    return run_dir if match is None else run_dir.parent / match["name"]


def publish(run_dir: str | os.PathLike[str]) -> Path:
    """Move a finished run from its staging directory over ``out``; returns ``out``.

    A no-op for a run that wrote in place. The earlier run is renamed aside first and removed
    only once the new one is in place.
    """
    run_dir, final = Path(run_dir), target(run_dir)
    if final == run_dir:
        return run_dir
    aside = run_dir.parent / f".{final.name}.replaced-{os.urandom(4).hex()}"
    os.replace(final, aside)
    os.replace(run_dir, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


@contextlib.contextmanager
def _atomic_writer(path: Path) -> Iterator[io.BufferedWriter]:
    """Yield a temp file next to ``path``; on success fsync it and ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def append_metrics(run_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line to ``metrics.jsonl`` (flushed so tails see it)."""
    line = json.dumps(dict(record), default=_json_default)
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl``; a torn last line (a crash mid-append) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def trim_metrics(run_dir: str | os.PathLike[str], keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``metrics.jsonl`` keeping only the records ``keep`` accepts (used on resume)."""
    records = [r for r in read_metrics(run_dir) if keep(r)]
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
    with _atomic_writer(Path(run_dir) / METRICS) as handle:
        handle.write(text.encode("utf-8"))


def write_params(run_dir: str | os.PathLike[str], params: Mapping[str, np.ndarray]) -> Path:
    """Write the named parameter arrays to ``params.npz`` atomically."""
    path = Path(run_dir) / PARAMS
    with _atomic_writer(path) as handle:
        np.savez(handle, **{k: np.asarray(v) for k, v in params.items()})
    return path


def write_summary(run_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` atomically."""
    path = Path(run_dir) / SUMMARY
    text = json.dumps(dict(summary), indent=2, sort_keys=True, default=_json_default)
    with _atomic_writer(path) as handle:
        handle.write((text + "\n").encode("utf-8"))
    return path


def write_config(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """Write the resolved configuration as ``config.toml`` (``None`` values are left out)."""
    path = Path(run_dir) / CONFIG
    with _atomic_writer(path) as handle:
        handle.write(to_toml(config).encode("utf-8"))
    return path


def to_toml(config: Mapping[str, Any]) -> str:
    """Serialise a nested dict of str/int/float/bool/list/dict to TOML (``tomllib`` only reads).

    Scalars and lists come first, then one ``[table]`` per nested dict, as TOML requires.
    """
    return "".join(_toml_table(config, ()))


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[str]:
    scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        yield f"\n[{'.'.join(_toml_key(p) for p in path)}]\n"
    for key, value in scalars.items():
        yield f"{_toml_key(key)} = {_toml_value(value)}\n"
    for key, value in tables.items():
        yield from _toml_table(value, (*path, str(key)))


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple | np.ndarray):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def save_checkpoint(
    run_dir: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> Path:
    """Write ``checkpoint.npz`` (``arrays`` plus ``meta`` as JSON) atomically, keeping the
    previous one as ``checkpoint.1.npz``.

    A crash at any point leaves either the previous checkpoint or the new one, never a mix:
    the bytes go to a temporary file that is fsynced before ``os.replace`` swaps it in. The
    meta records a SHA-256 digest of the arrays and the run's ``config.toml``, so a checkpoint
    that was damaged later, or belongs to other settings, is recognised on load.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    config = run_dir / CONFIG
    meta = {**meta, "digest": _digest(payload),
            "config": config.read_text(encoding="utf-8") if config.exists() else None}
    payload[_META_KEY] = np.array(json.dumps(meta, default=_json_default))
    if path.exists():
        os.replace(path, run_dir / PREVIOUS_CHECKPOINT)
    with _atomic_writer(path) as handle:
        np.savez(handle, **payload)
    return path


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        sha.update(f"{key}:{value.dtype.str}:{value.shape};".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One checkpoint file, or ValueError saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != _META_KEY}
            meta = json.loads(str(data[_META_KEY]))
    except Exception as exc:  # zip, npy and JSON errors alike: the file is unreadable
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    if "digest" in meta and meta["digest"] != _digest(arrays):
        raise ValueError("its arrays do not match their digest")
    bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite values in {', '.join(sorted(bad))}")
    return arrays, meta


def load_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The newest valid checkpoint as ``(arrays, meta)``, or ``None`` when there is none.

    ``checkpoint.npz`` is tried first, then the generation before it; a truncated, garbled or
    non-finite one is skipped with a warning.

    Raises
    ------
    ValidationError
        Checkpoints exist but none is valid (the line names each and why).
    """
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            loaded = _read_checkpoint(path)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if problems:
            log.warning("resuming from %s: %s", name, "; ".join(problems))
        return loaded
    if problems:
        raise ValidationError(f"no valid checkpoint in {run_dir} ({'; '.join(problems)})")
    return None


def checkpoint_step(run_dir: str | os.PathLike[str]) -> str | None:
    """``"iteration 20"`` (or epoch, round) of the newest valid checkpoint, ``None`` if none."""
    try:
        loaded = load_checkpoint(run_dir)
    except ValidationError:
        return None
    if loaded is None:
        return None
    meta = loaded[1]
    return next((f"{key} {meta[key]}" for key in ("iteration", "epoch", "round") if key in meta),
                "unknown")


def read_config(run_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``config.toml`` of a run directory as a dict ({} without one)."""
    import tomllib

    path = None if run_dir is None else Path(run_dir) / CONFIG
    if path is None or not path.exists():
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8"))


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run directory back: parameters, metrics, summary and configuration.

    Missing files give empty values, so an interrupted run can be inspected too.
    """

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValidationError(f"run directory {run_dir} does not exist")
    params: dict[str, np.ndarray] = {}
    if (run_dir / PARAMS).exists():
        with np.load(run_dir / PARAMS, allow_pickle=False) as data:
            params = {k: data[k] for k in data.files}
    summary = {}
    if (run_dir / SUMMARY).exists():
        summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    config = read_config(run_dir)
    flat = (np.concatenate([np.ravel(v) for v in params.values()]).astype(np.float64)
            if params else np.zeros(0))
    return Run(params=flat, named=params, metrics=read_metrics(run_dir), summary=summary,
               config=config, path=run_dir)
