"""L-BFGS on the full-batch objective: the math is :mod:`tasks.lbfgs`, each trial point is a pass.

Every objective evaluation the line search asks for is one :func:`pipeline.train.full_pass`
(``grad-…`` tasks, ``sum-…`` tree, one gradient back), so an iteration costs one pass when the
unit step is accepted, which is the usual case once the curvature pairs have scaled the steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from distributed import span

from pipeline.train import (
    Engine,
    Pass,
    check_finite,
    converged,
    emit,
    full_pass,
    pass_record,
    restore_state,
    save_state,
)
from tasks import lbfgs

KIND = "lbfgs"


def run_lbfgs(engine: Engine, config: lbfgs.LBFGS, iterations: int, seed: int,
              checkpoint_every: int | None, resume: bool, tol: float | None):
    """Minimise the mean loss plus penalty with L-BFGS for at most ``iterations`` iterations.

    Stops early when the objective changes by at most ``tol * max(1, |f|)`` or when the line
    search finds no decrease (the minimum is reached to machine precision).

    References
    ----------
    J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer, 2006,
    Algorithm 7.5 (L-BFGS) with the line search of Algorithms 3.5-3.6.
    """
    n = engine.model.n_params
    params, start = engine.model.init(seed), 0
    s_hist, y_hist = lbfgs.empty_history(n)
    restored = restore_state(engine, "iteration", KIND, seed) if resume else None
    if restored is not None:
        start, params, state, _ = restored
        s_hist, y_hist = state["s"], state["y"]
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with span(f"iteration-{start}"):
        current = full_pass(engine, params)
    check_finite(current.loss, "iteration", start, engine.run_dir)
    evaluations, last = 1, time.perf_counter()
    emit(engine, pass_record("iteration", start, current, last - t0, last - t0,
                             evaluations=evaluations), records)
    last = time.perf_counter()
    stopped = "iterations"
    for t in range(start + 1, iterations + 1):
        with span(f"iteration-{t}"):
            accepted, trial, used = _line_search(engine, config, params, current,
                                                   s_hist, y_hist, len(s_hist) == 0)
        evaluations += used
        if accepted is None:
            stopped = "line-search"
            break
        s_hist, y_hist = lbfgs.update_history(s_hist, y_hist, params, accepted, current.grad,
                                              trial.grad, config.memory)
        params, current = accepted, trial
        now = time.perf_counter()
        emit(engine, pass_record("iteration", t, current, now - last, now - t0,
                                 evaluations=evaluations), records)
        last = time.perf_counter()  # time spent in on_record is not training time
        if checkpoint_every and t % checkpoint_every == 0:
            save_state(engine, "iteration", t, params, {"s": s_hist, "y": y_hist}, seed, kind=KIND)
        if converged(records, tol):
            stopped = "tol"
            break
    save_state(engine, "iteration", records[-1]["iteration"], params,
               {"s": s_hist, "y": y_hist}, seed, kind=KIND)
    return params, records, stopped


def _line_search(engine: Engine, config: lbfgs.LBFGS, params: np.ndarray, current: Pass,
                 s_hist: np.ndarray, y_hist: np.ndarray, first: bool):
    """Search along the L-BFGS direction from ``params``.

    Returns ``(accepted_params, its_pass, passes_used)``; the first two are ``None`` when no
    step decreases the objective.
    """
    d = lbfgs.direction(current.grad, s_hist, y_hist)
    ls = lbfgs.line_search_start(current.loss, float(current.grad @ d),
                                 lbfgs.initial_step(current.grad, first))
    # Every trial is kept: the search may settle on an earlier one than the last evaluated.
    tried: dict[float, tuple[np.ndarray, Pass]] = {}
    while not ls.done:
        point = lbfgs.trial_point(params, d, ls.alpha)
        tried[ls.alpha] = (point, full_pass(engine, point))
        ls = lbfgs.line_search_step(ls, tried[ls.alpha][1].loss,
                                    float(tried[ls.alpha][1].grad @ d), config)
    if ls.failed:
        return None, None, len(tried)
    point, trial = tried[ls.alpha]
    return point, trial, len(tried)
