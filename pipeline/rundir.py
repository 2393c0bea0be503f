"""The run directory: what a training or federated run leaves behind, written crash-safely.

Layout (``docs/DESIGN.md``): ``params.npz`` (named arrays), ``metrics.jsonl`` (one JSON object
per iteration/epoch/round), ``summary.json``, ``config.toml`` and ``checkpoint.npz`` (flat arrays
plus a JSON ``meta`` dict). Every whole-file write goes to a temporary file in the same directory,
is fsynced and then ``os.replace``-d over the target, so a crash mid-write leaves the previous
version intact; ``metrics.jsonl`` is append-only and trimmed on resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from fedpipe.errors import ValidationError

PARAMS = "params.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
CHECKPOINT = "checkpoint.npz"
_META_KEY = "__meta__"

RunDir = Path  # a run directory is just a path; the functions below are its whole API


class Run(NamedTuple):
    """A finished (or interrupted) run read back from disk by :func:`load_run`.

    A finished run is a self-contained model (``model.json``, ``preprocess.json``,
    ``params.npz``): :meth:`predict` and :meth:`predict_proba` need neither the training store
    nor the code that built the model.
    """

    params: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]
    path: Path | None = None

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


def prepare(out: str | os.PathLike[str], resume: bool = False) -> Path:
    """Create the run directory; without ``resume`` clear the files of an earlier run in it.

    Parameters
    ----------
    out : path
        The run directory (created with its parents when missing).
    resume : bool
        Keep ``checkpoint.npz`` and ``metrics.jsonl`` so the engine can continue the run.

    Returns
    -------
    pathlib.Path
    """
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValidationError(f"--out {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        # A fresh run must not inherit another run's history or resume from its checkpoint.
        for name in (METRICS, CHECKPOINT, SUMMARY, PARAMS, "model.json", "preprocess.json"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    return run_dir


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
    """Write ``checkpoint.npz`` (``arrays`` plus ``meta`` as JSON) atomically.

    A crash at any point leaves either the previous checkpoint or the new one, never a mix:
    the bytes go to a temporary file that is fsynced before ``os.replace`` swaps it in.
    """
    path = Path(run_dir) / CHECKPOINT
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[_META_KEY] = np.array(json.dumps(dict(meta), default=_json_default))
    with _atomic_writer(path) as handle:
        np.savez(handle, **payload)
    return path


def load_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read ``checkpoint.npz`` back as ``(arrays, meta)``, or ``None`` when there is none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != _META_KEY}
        meta = json.loads(str(data[_META_KEY]))
    return arrays, meta


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run directory back: parameters, metrics, summary and configuration.

    Missing files give empty values, so an interrupted run can be inspected too.
    """
    import tomllib

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
    config = {}
    if (run_dir / CONFIG).exists():
        config = tomllib.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    return Run(params=params, metrics=read_metrics(run_dir), summary=summary, config=config,
               path=run_dir)
