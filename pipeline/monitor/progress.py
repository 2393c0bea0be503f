"""Terminal progress bars driven by the engines' ``on_record`` callback.

The engines only call ``on_record(record)`` after each iteration/epoch/round; this module turns
those records into a rich progress bar on **stderr** with the current loss and an ETA, so
``--json`` output on stdout stays one clean line. ``--quiet`` and ``--json`` silence it.

>>> with ProgressBar(total=3, unit="round", enabled=False) as bar:
...     bar({"round": 1, "train_loss": 0.5})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Record = Mapping[str, Any]
OnRecord = Callable[[Record], None]

# The first of these keys a record carries is its position on the x axis.
STEP_KEYS = ("round", "iteration", "epoch", "step")
LOSS_KEYS = ("train_loss", "loss", "objective", "test_loss")
ACCURACY_KEYS = ("test_accuracy", "train_accuracy", "accuracy")


def step_of(record: Record) -> tuple[str, int] | None:
    """``(key, value)`` of the record's step counter (round, iteration, epoch…), or ``None``."""
    for key in STEP_KEYS:
        if isinstance(record.get(key), int | float):
            return key, int(record[key])
    return None


def steps_done(record: Record) -> int | None:
    """How many iterations/epochs/rounds are complete once ``record`` is written.

    Data-parallel engines number the state *after* t updates (``iteration 0`` is the initial
    evaluation); federated engines number the round just finished from 0. Counting from the
    step rather than the records also keeps a resumed run's bar right.
    """
    step = step_of(record)
    if step is None:
        return None
    return step[1] + 1 if step[0] == "round" else step[1]


def first_number(record: Record, keys: tuple[str, ...]) -> tuple[str, float] | None:
    """``(key, value)`` of the first finite number among ``keys`` in ``record``."""
    for key in keys:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return key, float(value)
    return None


def describe(record: Record) -> str:
    """A short ``loss 0.1234 · acc 0.912`` text for the bar; empty when the record has neither."""
    parts = []
    if (loss := first_number(record, LOSS_KEYS)) is not None:
        parts.append(f"{loss[0].replace('_', ' ')} {loss[1]:.4g}")
    if (acc := first_number(record, ACCURACY_KEYS)) is not None:
        parts.append(f"{acc[0].replace('_', ' ')} {acc[1]:.3f}")
    return " · ".join(parts)


class ProgressBar:
    """A context manager and ``on_record`` callback showing one bar of ``total`` steps.

    Parameters
    ----------
    total : int or None
        Number of iterations/epochs/rounds expected (``None``: unknown, no ETA).
    unit : str
        What one step is called in the bar's label ("iteration", "round", …).
    enabled : bool
        ``False`` makes every method a no-op (``--quiet`` / ``--json``).
    console : rich.console.Console, optional
        Where to draw; stderr by default so stdout stays machine-readable.
    """

    def __init__(self, total: int | None, unit: str = "iteration", *, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.total, self.unit, self.enabled = total, unit, enabled
        self.records = 0
        self._progress: Progress | None = None
        self._task: Any = None
        self._console = console if console is not None else Console(stderr=True)

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=self._console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(f"{self.unit}s", total=self.total, metrics="")
        return self

    def __call__(self, record: Record) -> None:
        self.records += 1
        if self._progress is None:
            return
        done = steps_done(record)
        completed = self.records if done is None else done
        if self.total is not None:
            completed = min(completed, self.total)
        self._progress.update(self._task, completed=completed, metrics=describe(record))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            if exc_type is not None and self.records == 0:
                # Bad input found before the first step: the error line stands alone.
                self._progress.live.transient = True
            self._progress.stop()
            self._progress = None


def is_quiet(args: object) -> bool:
    """True when the command line asked for no progress output (``--quiet`` or ``--json``)."""
    return bool(getattr(args, "quiet", False) or getattr(args, "json", False))


def chain(*callbacks: OnRecord | None) -> OnRecord:
    """One ``on_record`` that calls each non-``None`` callback in order."""
    active = [cb for cb in callbacks if cb is not None]

    def on_record(record: Record) -> None:
        for cb in active:
            cb(record)

    return on_record


# Per-client fields go by several names across engines and versions; read the first present.
_CLIENT_FIELDS = {
    "loss": ("loss", "local_loss", "train_loss"),
    "accuracy": ("accuracy", "local_accuracy", "test_accuracy", "train_accuracy"),
    "seconds": ("seconds", "time", "duration", "elapsed"),
    "update_bytes": ("update_bytes", "update_size", "bytes", "nbytes"),
    "n_rows": ("n_rows", "n", "rows", "num_examples"),
}


_TRAIN_KEYS = ("train_loss", "loss", "local_loss", "steps", "seconds", "update_bytes", "n")


def client_rows(record: Record) -> list[dict[str, Any]]:
    """The per-client view of a federated round record, one uniform dict per client.

    Accepts ``record["clients"]`` as a ``{id: {...}}`` mapping or a list of dicts with a
    ``client``/``id`` key, and drop-outs as ``record["dropped"]`` (``{id: reason}``, a list
    of ids, or a list of ``{"client", "reason"}``) or as a per-client ``status``/``dropped``.
    Each row has ``id, status, reason, loss, accuracy, seconds, update_bytes, n_rows``
    (``None`` where unknown); ``status`` is ``"ok"`` (trained this round), ``"dropped"``, or
    ``"idle"`` (not sampled, only evaluated). Data-parallel records give ``[]``.
    """
    raw = record.get("clients")
    items: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(raw, Mapping):
        items = [(str(k), v if isinstance(v, Mapping) else {}) for k, v in raw.items()]
    elif isinstance(raw, list):
        for i, entry in enumerate(raw):
            if isinstance(entry, Mapping):
                items.append((str(entry.get("client", entry.get("id", i))), entry))
            else:
                items.append((str(entry), {}))
    dropped = _dropped(record.get("dropped"))
    # A rejected update (e.g. failed a norm check) is a drop-out with a reason, too.
    dropped.update({c: f"rejected: {why}" for c, why in _dropped(record.get("rejected")).items()})
    rows = {}
    for cid, entry in items:
        row: dict[str, Any] = {"id": cid}
        for field, keys in _CLIENT_FIELDS.items():
            found = first_number(entry, keys)
            row[field] = None if found is None else found[1]
        is_dropped = bool(entry.get("dropped")) or entry.get("status") in ("dropped", "failed")
        reason = entry.get("reason") or entry.get("error") or (dropped.get(cid) if cid in dropped else None)
        # Every client may be evaluated; only those with training metrics took part in the round.
        trained = not entry or any(k in entry for k in _TRAIN_KEYS)
        row["status"] = "dropped" if is_dropped or cid in dropped else ("ok" if trained else "idle")
        row["reason"] = None if reason is None else str(reason)
        rows[cid] = row
    for cid, reason in dropped.items():
        rows.setdefault(cid, {"id": cid, "status": "dropped", "reason": reason,
                              **dict.fromkeys(_CLIENT_FIELDS)})
    return list(rows.values())


def _dropped(raw: Any) -> dict[str, str | None]:
    if isinstance(raw, Mapping):
        return {str(k): (None if v is None else str(v)) for k, v in raw.items()}
    if isinstance(raw, list):
        out: dict[str, str | None] = {}
        for entry in raw:
            if isinstance(entry, Mapping):
                out[str(entry.get("client", entry.get("id")))] = entry.get("reason")
            else:
                out[str(entry)] = None
        return out
    return {}
