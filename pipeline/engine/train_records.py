"""Run bookkeeping shared by the training loops: records, stopping, checkpoints, the summary.

A loop builds one record per iteration/epoch (:func:`pass_record`), hands it to :func:`emit`
(``metrics.jsonl`` and ``on_record``), stops on divergence (:func:`check_finite`) or on a
small change (:func:`converged`), and checkpoints with :func:`save_state` what
:func:`restore_state` gives back on ``--resume``. The writing and reading is
:mod:`fedpipe.engine.runlog`'s, the same the federated round loop uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe import cluster, rundir
from fedpipe.engine import runlog
from fedpipe.engine.train_pass import Engine, Pass
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.tasks.lbfgs import LBFGS

log = logging.getLogger("fedpipe")


def emit(engine: Engine, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Keep a metrics record, append it to ``metrics.jsonl`` and call ``on_record``."""
    records.append(record)
    runlog.emit(engine.run_dir, engine.on_record, record)


def pass_record(step_key: str, step: int, result: Pass, seconds: float, elapsed: float,
                **extra: Any) -> dict[str, Any]:
    """The metrics record of one iteration/epoch."""
    return {step_key: step, "train_loss": result.loss, **result.metrics,
            "n_train": result.n_train, "seconds": seconds, "elapsed": elapsed, **extra}


def check_finite(loss: float, step_key: str, step: int, run_dir: Path | None) -> None:
    """Divergence: stop with one line naming the step and the checkpoint left behind."""
    if math.isfinite(loss):
        return
    where = ""
    if run_dir is not None and (ckpt := rundir.load_checkpoint(run_dir)) is not None:
        where = f"; last good checkpoint is {step_key} {ckpt[1].get(step_key)} in {run_dir}"
    raise TrainingError(f"training loss became {loss} at {step_key} {step} (diverged: "
                        f"try a smaller --lr){where}")


def converged(records: list[dict[str, Any]], tol: float | None) -> bool:
    """True when the last two training losses differ by at most ``tol * max(1, |loss|)``."""
    if tol is None or len(records) < 2:
        return False
    prev, last = records[-2]["train_loss"], records[-1]["train_loss"]
    return abs(prev - last) <= tol * max(1.0, abs(last))


def save_state(engine: Engine, step_key: str, step: int, params: np.ndarray,
               state: Mapping[str, np.ndarray], seed: int, **meta: Any) -> None:
    """Checkpoint parameters and optimizer state (``opt/<key>``) with the step and seed."""
    runlog.save_state(engine.run_dir, params, state,
                      {step_key: step, "seed": seed, "model": engine.model.name, **meta})


def start_state(engine: Engine, optimizer: Any, step_key: str, kind: str, seed: int,
                resume: bool) -> tuple[int, np.ndarray, dict]:
    """``(first step, params, optimizer state)``: fresh from the seed, or from the checkpoint."""
    restored = restore_state(engine, step_key, kind, seed) if resume else None
    if restored is None:
        params = engine.model.init(seed)
        return 0, params, optimizer.init(params)
    start, params, state, _ = restored
    return start, params, state


def restore_state(engine: Engine, step_key: str, kind: str, seed: int):
    """Load the checkpoint to resume from: ``(step, params, state, meta)`` or ``None``.

    Metric records from the checkpoint's step on are dropped; the resumed run writes them again.
    """
    if engine.run_dir is None or (ckpt := runlog.load_state(engine.run_dir)) is None:
        log.info("no checkpoint to resume from: starting at the beginning")
        if engine.run_dir is not None:  # records of an attempt killed before its first checkpoint
            rundir.trim_metrics(engine.run_dir, lambda r: False)
        return None
    params, state, _, meta = ckpt
    if meta.get("kind") != kind or meta.get("n_params") != engine.model.n_params:
        raise ValidationError(
            f"checkpoint in {engine.run_dir} is from a different run ({meta.get('kind')} "
            f"training of {meta.get('model')}); use another --out or drop --resume")
    if meta.get("seed") != seed:
        raise ValidationError(f"checkpoint in {engine.run_dir} was written with --seed "
                              f"{meta.get('seed')}, not {seed}")
    step = int(meta[step_key])
    runlog.rewind(engine.run_dir, step_key, step)
    log.info("resuming from %s %d", step_key, step)
    return step, params, state, meta


def run_summary(engine: Engine, optimizer, records: list[dict[str, Any]], stopped: str,
                total_seconds: float) -> dict[str, Any]:
    """``summary.json``: final metrics, iterations, median seconds per iteration, cluster."""
    step_key = next((k for k in ("iteration", "epoch") if records and k in records[-1]),
                    "iteration")
    final = {k: v for k, v in records[-1].items()
             if k not in ("seconds", "elapsed", "n_train", step_key)} if records else {}
    return {
        "model": engine.model.name,
        "task": engine.model.task,
        "optimizer": "lbfgs" if isinstance(optimizer, LBFGS) else "first-order",
        step_key + "s": records[-1][step_key] if records else 0,
        "stopped": stopped,
        "final": final,
        # record 0 (or the first after a resume) only measures the start; it is no iteration
        **runlog.timing(records, "iteration", skip_first=True),
        "total_seconds": total_seconds,
        "peak_worker_memory": cluster.peak_worker_memory(engine.dask_client),
        "cache": engine.data.mode,
        "n_chunks": engine.data.info.n_chunks,
        "chunks_per_task": len(engine.data.blocks[0]) if engine.data.blocks else 1,
        "fan_in": engine.fan_in,
        "n_workers": cluster.n_workers(engine.dask_client),
        "n_train": next((r["n_train"] for r in reversed(records) if "n_train" in r), None),
        "dashboard": cluster.dashboard_link(engine.dask_client),
        "run_dir": runlog.where(engine.run_dir).get("run_dir"),
    }
