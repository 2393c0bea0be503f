"""Run bookkeeping both training loops share: the metrics emitter, the checkpoint, the timing.

Data-parallel ``fit`` (:mod:`fedpipe.engine.train_records`) and the federated round loop
(:mod:`fedpipe.engine.federate`, :mod:`fedpipe.engine.fed_state`) write their records, their
``checkpoint.npz`` and their summary's timing through these functions only, so a run directory
reads the same whichever loop wrote it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe import rundir

OnRecord = Callable[[dict[str, Any]], None]


def emit(run_dir: Path | None, on_record: OnRecord | None, record: dict[str, Any],
         checkpoint: Callable[[], None] | None = None) -> None:
    """Append ``record`` to ``metrics.jsonl``, write the checkpoint due now, call ``on_record``.

    The checkpoint comes after its record is on disk (a resume keeps the records before the
    checkpoint's step) and before the callback, so a callback that stops the run finds it.
    """
    if run_dir is not None:
        rundir.append_metrics(run_dir, record)
        if checkpoint is not None:
            checkpoint()
    if on_record is not None:
        on_record(record)


def save_state(run_dir: Path | None, params: np.ndarray, opt_state: Mapping[str, np.ndarray],
               meta: Mapping[str, Any], extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Write ``checkpoint.npz``: ``params``, the optimizer state as ``opt/<key>``, ``extra``.

    Non-finite parameters are never written: a diverged step must not replace a good checkpoint.
    """
    if run_dir is None or not np.all(np.isfinite(params)):
        return
    arrays = {"params": params, **{f"opt/{k}": v for k, v in opt_state.items()}, **(extra or {})}
    rundir.save_checkpoint(run_dir, arrays, {**meta, "n_params": int(params.size)})


def load_state(run_dir: Path) -> tuple[np.ndarray, dict, dict, dict] | None:
    """``(params, optimizer state, other arrays, meta)`` of the checkpoint, or ``None``."""
    if (loaded := rundir.load_checkpoint(run_dir)) is None:
        return None
    arrays, meta = loaded
    opt_state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    rest = {k: v for k, v in arrays.items() if k != "params" and not k.startswith("opt/")}
    return arrays["params"], opt_state, rest, meta


def rewind(run_dir: Path, step_key: str, step: int) -> None:
    """Drop the metric records from ``step`` on: the resumed run writes them again."""
    rundir.trim_metrics(run_dir, lambda rec: rec.get(step_key, -1) < step)


def timing(records: Sequence[dict[str, Any]], unit: str, skip_first: bool = False) -> dict:
    """``{"seconds_per_<unit>": median seconds}`` (``None`` without records).

    ``skip_first``: a data-parallel run's record 0 only measures the start; it is no iteration.
    """
    seconds = [r["seconds"] for r in records]
    timed = seconds[1:] if skip_first and len(seconds) > 1 else seconds
    return {f"seconds_per_{unit}": statistics.median(timed) if timed else None}


def where(run_dir: Path | None) -> dict:
    """The summary's ``run_dir`` (the published target), when the run has one."""
    return {} if run_dir is None else {"run_dir": str(rundir.target(run_dir))}
