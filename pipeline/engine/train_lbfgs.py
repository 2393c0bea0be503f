"""L-BFGS on the full-batch objective: the math is :mod:`fedpipe.tasks.lbfgs`, each trial point is a pass.

Every objective evaluation the line search asks for is one pass (:mod:`fedpipe.engine.train_pass`)
over the training rows only (``grad-…`` tasks, ``sum-…`` tree, one gradient back), so an
iteration costs one pass when the first trial step is accepted, which is the usual case (a
unit-length step on the first iteration, then the unit step scaled by the curvature pairs).

The test metrics of a record are computed once, at the accepted iterate (``eval-…`` tasks),
never at a trial point. They are submitted together with the next iteration's first trial
pass, so the two share one round trip to the cluster; the record is written as soon as its
metrics arrive (its ``elapsed`` is that moment), before the trial's gradient is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed import Future, span
from fedpipe.engine.train_data import send_params
from fedpipe.engine.train_pass import (
    Engine,
    Pass,
    finish_eval,
    finish_train,
    full_pass,
    submit_eval,
    submit_train,
)
from fedpipe.engine.train_records import (
    check_finite,
    converged,
    emit,
    pass_record,
    restore_state,
    save_state,
)
from fedpipe.tasks import lbfgs

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
    params, start = engine.model.init(seed), 0
    s_hist, y_hist = lbfgs.empty_history(engine.model.n_params)
    restored = restore_state(engine, "iteration", KIND, seed) if resume else None
    if restored is not None:
        start, params, state, _ = restored
        s_hist, y_hist = state["s"], state["y"]
    run = _Run(engine, seed, checkpoint_every, start)
    with span(f"iteration-{start}"):
        current = full_pass(engine, params)
    check_finite(current.loss, "iteration", start, engine.run_dir)
    run.evaluations = 1
    run.record(start, current, params, s_hist, y_hist)
    stopped = "iterations"
    for t in range(start + 1, iterations + 1):
        with span(f"iteration-{t}"):
            accepted, trial, used = _line_search(engine, config, params, current, s_hist,
                                                 y_hist, len(s_hist) == 0, run.flush)
            run.evaluations += used
            if accepted is None:
                stopped = "line-search"
                break
            s_hist, y_hist = lbfgs.update_history(s_hist, y_hist, params, accepted,
                                                  current.grad, trial.grad, config.memory)
            small = _small_change(current.loss, trial.loss, tol)
            params, current = accepted, trial
            run.defer(t, current, params, s_hist, y_hist)
            if small or t == iterations:  # no next trial to share the round trip with
                run.flush()
                stopped = "tol" if small else stopped
                break
    run.flush()
    save_state(engine, "iteration", run.records[-1]["iteration"], params,
               {"s": s_hist, "y": y_hist}, seed, kind=KIND)
    return params, run.records, stopped


def _small_change(previous: float, loss: float, tol: float | None) -> bool:
    # converged() on the records that will be written, known before their test metrics are.
    return converged([{"train_loss": previous}, {"train_loss": loss}], tol)


class _Run:
    """Records of one L-BFGS run, with at most one waiting for its test metrics."""

    def __init__(self, engine: Engine, seed: int, checkpoint_every: int | None,
                 start: int) -> None:
        self.engine, self.seed, self.checkpoint_every = engine, seed, checkpoint_every
        self.start = start  # the first record describes the checkpoint resumed from
        self.records: list[dict[str, Any]] = []
        self.evaluations = 0
        self.t0 = self.last = time.perf_counter()
        self.pending: tuple[Future | None, tuple] | None = None

    def defer(self, t: int, result: Pass, params: np.ndarray, s_hist: np.ndarray,
              y_hist: np.ndarray) -> None:
        """Submit the test sums at accepted iterate ``t``; :meth:`flush` writes its record."""
        engine = self.engine
        future = submit_eval(engine, send_params(engine.dask_client, params))
        self.pending = (future, (t, result, params, s_hist, y_hist, self.evaluations))

    def flush(self) -> None:
        """Write the deferred record, if any, once its test metrics are back."""
        if self.pending is None:
            return
        future, (t, result, params, s_hist, y_hist, evaluations) = self.pending
        self.pending = None
        metrics = finish_eval(self.engine, None if future is None else future.result())
        self.record(t, result._replace(metrics=metrics), params, s_hist, y_hist, evaluations)

    def record(self, t: int, result: Pass, params: np.ndarray, s_hist: np.ndarray,
               y_hist: np.ndarray, evaluations: int | None = None) -> None:
        """Write record ``t`` (and the checkpoint due at ``t``)."""
        now = time.perf_counter()
        evaluations = self.evaluations if evaluations is None else evaluations
        emit(self.engine, pass_record("iteration", t, result, now - self.last, now - self.t0,
                                      evaluations=evaluations), self.records)
        self.last = time.perf_counter()  # time spent in on_record is not training time
        if self.checkpoint_every and t % self.checkpoint_every == 0 and t > self.start:
            save_state(self.engine, "iteration", t, params, {"s": s_hist, "y": y_hist},
                       self.seed, kind=KIND)


def _line_search(engine: Engine, config: lbfgs.LBFGS, params: np.ndarray, current: Pass,
                 s_hist: np.ndarray, y_hist: np.ndarray, first: bool,
                 after_submit: Callable[[], None]):
    """Search along the L-BFGS direction from ``params``.

    ``after_submit`` runs once the first trial pass is on its way (or at once when there is no
    trial): the engine writes the previous record then, while the cluster works.

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
        future = submit_train(engine, send_params(engine.dask_client, point))
        after_submit()
        tried[ls.alpha] = (point, finish_train(engine, point, future.result()))
        ls = lbfgs.line_search_step(ls, tried[ls.alpha][1].loss,
                                    float(tried[ls.alpha][1].grad @ d), config)
    after_submit()
    if ls.failed:
        return None, None, len(tried)
    point, trial = tried[ls.alpha]
    return point, trial, len(tried)
