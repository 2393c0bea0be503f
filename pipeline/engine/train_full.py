"""Full-batch first-order training: one pass per iteration, then the optimizer's update."""

from __future__ import annotations

import time
from typing import Any

from distributed import span
from fedpipe.engine.train_pass import Engine, full_pass
from fedpipe.engine.train_records import (
    check_finite,
    converged,
    emit,
    pass_record,
    save_state,
    start_state,
)
from fedpipe.tasks.optimizers import Optimizer, apply_updates


def run_full_batch(engine: Engine, optimizer: Optimizer, iterations: int, seed: int,
                   checkpoint_every: int | None, resume: bool, tol: float | None):
    """Gradient descent (with any first-order optimizer) on the full-batch mean loss.

    Record ``t`` describes the parameters after ``t`` updates, so the loop makes
    ``iterations + 1`` passes (the last one only measures).
    """
    start, params, state = start_state(engine, optimizer, "iteration", "full-batch", seed, resume)
    records: list[dict[str, Any]] = []
    t0 = last = time.perf_counter()
    stopped = "iterations"
    for t in range(start, iterations + 1):
        with span(f"iteration-{t}"):
            result = full_pass(engine, params)
        now = time.perf_counter()
        check_finite(result.loss, "iteration", t, engine.run_dir)
        emit(engine, pass_record("iteration", t, result, now - last, now - t0), records)
        last = time.perf_counter()  # time spent in on_record is not training time
        if converged(records, tol):
            stopped = "tol"
            break
        if t == iterations:
            break
        updates, state = optimizer.update(result.grad, state, params)
        params = apply_updates(params, updates)
        if checkpoint_every and (t + 1) % checkpoint_every == 0:
            save_state(engine, "iteration", t + 1, params, state, seed, kind="full-batch")
    save_state(engine, "iteration", records[-1]["iteration"] if records else start, params,
               state, seed, kind="full-batch")
    return params, records, stopped
