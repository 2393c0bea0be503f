"""Bounded-staleness data-parallel training (stale-synchronous parallel, ``--mode async``).

The blocks of the full-batch pass are split into groups (one per worker by default,
:func:`fedpipe.tasks.staleness.group_blocks`). Each group's ``grad-…`` tasks run at the newest
parameters when the group starts; the driver keeps every block's latest ``(loss_sum, grad_sum,
n)`` and the version it was computed at. When a group's results arrive the driver steps the
optimizer at once on the sum of every block's latest contribution, provided none is more than
``S`` versions old (:func:`fedpipe.tasks.staleness.may_step`); otherwise the groups already done
wait for the late one. Idle groups then start again at the new version. The sum is
:func:`fedpipe.engine.graph.fold_tree` in block order, the tree the synchronous pass builds on
the workers, so with ``S = 0`` (every step waits for every group) the parameters are those of
:func:`fedpipe.engine.train_full.run_full_batch`, bit for bit.

With ``arrival="seeded"`` the results are taken in the order of a virtual clock drawn from the
seed (:func:`fedpipe.tasks.staleness.virtual_duration`) instead of the order they come in, so a
run is reproducible bit for bit and resumes bit-identical: the checkpoint holds the in-flight
work (which group computes at which version, the parameters of that version, the virtual clock)
and every block's latest contribution.

References
----------
Ho et al., "More effective distributed ML via a stale synchronous parallel parameter server",
NIPS 2013.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import numpy as np
from distributed import Future, wait
from fedpipe import cluster
from fedpipe.engine import runlog
from fedpipe.engine.graph import fold_tree
from fedpipe.engine.train_data import send_params
from fedpipe.engine.train_pass import Engine, block_tasks, full_pass
from fedpipe.engine.train_records import check_finite, converged, pass_record, restore_state
from fedpipe.errors import ValidationError
from fedpipe.tasks import reduce
from fedpipe.tasks import staleness as st
from fedpipe.tasks.optimizers import Optimizer, apply_updates

KIND = "bounded-staleness"
ARRIVALS = ("real", "seeded")


class BoundedStaleness(NamedTuple):
    """Train with gradients up to ``max_staleness`` versions old (``fp.fit(..., mode=...)``).

    Parameters
    ----------
    max_staleness : int
        The bound ``S``: no contribution older than ``S`` optimizer steps is applied. ``0`` is
        synchronous full-batch training, bit for bit.
    arrival : {"real", "seeded"}
        Take results in the order they arrive, or in the order of a virtual clock drawn from
        the seed (reproducible bit for bit, whatever the cluster's timing).
    groups : int, optional
        Groups of blocks that compute and arrive together (default: one per worker).
    spread : float
        Seeded arrival only: sigma of the lognormal speed of each group on the virtual clock.

    References
    ----------
    Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013.
    """

    max_staleness: int
    arrival: str = "real"
    groups: int | None = None
    spread: float = 0.5


def check_mode(mode: Any, optimizer: Any, epochs: int | None) -> None:
    """Refuse what the stale loop does not run, in one line naming the option."""
    if not isinstance(mode, BoundedStaleness):
        raise ValidationError(f"mode must be fedpipe.BoundedStaleness, got {type(mode).__name__}")
    if not isinstance(mode.max_staleness, int | np.integer) or mode.max_staleness < 0:
        raise ValidationError(f"--max-staleness must be an integer >= 0, got {mode.max_staleness!r}")
    if mode.arrival not in ARRIVALS:
        raise ValidationError(f"--arrival must be one of {', '.join(ARRIVALS)}, got {mode.arrival!r}")
    if mode.groups is not None and (not isinstance(mode.groups, int) or mode.groups < 1):
        raise ValidationError(f"groups must be a positive integer, got {mode.groups!r}")
    if not isinstance(optimizer, Optimizer):
        raise ValidationError("--mode async needs a first-order --optimizer (not lbfgs: its "
                              "line search needs exact gradients)")
    if epochs is not None:
        raise ValidationError("--mode async is full-batch: use --iterations, not --epochs")


@dataclasses.dataclass
class Flight:
    """The driver's view of the work: every block's latest result and every group's task."""

    groups: list[list[int]]
    contrib: list[tuple | None]     # per block: (loss_sum, grad_sum, n), latest
    cversion: np.ndarray            # per group: version its contribution was computed at
    started: np.ndarray             # per group: version of the task in flight
    busy: np.ndarray                # per group: a task in flight
    finish: np.ndarray              # per group: virtual end of that task (seeded arrival)
    dispatches: np.ndarray          # per group: tasks started so far (the virtual clock's draw)
    clock: float = 0.0
    futures: dict[int, list[Future]] = dataclasses.field(default_factory=dict)
    params_at: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def run_stale(engine: Engine, optimizer: Optimizer, mode: BoundedStaleness, iterations: int,
              seed: int, checkpoint_every: int | None, resume: bool, tol: float | None):
    """Full-batch training with bounded-staleness gradients; ``(params, records, stopped)``.

    Record ``v`` describes the step from version ``v`` (its objective is that of the
    contributions it adds, with their staleness); the last record, ``iterations``, is one
    synchronous pass at the final parameters, with the test metrics.
    """
    meta = {"kind": KIND, "max_staleness": int(mode.max_staleness), "arrival": mode.arrival}
    version, params, state, flight = _start(engine, optimizer, mode, seed, resume, meta)
    records: list[dict[str, Any]] = []
    t0 = last = time.perf_counter()
    arrivals: list[list[int]] = []
    stopped = "iterations"
    while version < iterations:
        for g in _arrive(engine, flight, mode):
            arrivals.append([g, int(flight.cversion[g])])
        if st.may_step(version, flight.cversion, mode.max_staleness):
            loss_sum, grad_sum, n = fold_tree(flight.contrib, engine.fan_in,
                                              lambda _l, _j, part: reduce.add_sums(*part))
            loss, grad = reduce.objective(loss_sum, grad_sum, n, engine.model, params)
            check_finite(loss, "iteration", version, engine.run_dir)
            now = time.perf_counter()
            record = {"iteration": version, "train_loss": loss, "n_train": int(n),
                      **st.staleness_stats(version, flight.cversion), "arrivals": arrivals,
                      "seconds": now - last, "elapsed": now - t0,
                      **({"virtual_time": flight.clock} if mode.arrival == "seeded" else {})}
            arrivals = []
            if not _emit(engine, records, record, tol):
                stopped = "tol"
                break
            last = time.perf_counter()
            updates, state = optimizer.update(grad, state, params)
            params, version = apply_updates(params, updates), version + 1
            # the last version's tasks are only booked (a resume starts them), not run
            _dispatch(engine, flight, mode, seed, version, params, submit=version < iterations)
            if checkpoint_every and version % checkpoint_every == 0:
                _save(engine, version, params, state, seed, meta, flight)
        else:  # a late group that came back while the bound holds the step starts again
            _dispatch(engine, flight, mode, seed, version, params)
    _save(engine, version, params, state, seed, meta, flight)
    engine.dask_client.cancel([f for fs in flight.futures.values() for f in fs])
    if stopped == "iterations":
        result = full_pass(engine, params)
        check_finite(result.loss, "iteration", version, engine.run_dir)
        now = time.perf_counter()
        _emit(engine, records, pass_record("iteration", version, result, now - last, now - t0),
              None)
    return params, records, stopped


def _emit(engine: Engine, records: list[dict], record: dict, tol: float | None) -> bool:
    """Keep and write ``record``; False when the run has converged."""
    records.append(record)
    runlog.emit(engine.run_dir, engine.on_record, record)
    return not converged(records, tol)


def _arrive(engine: Engine, flight: Flight, mode: BoundedStaleness) -> list[int]:
    """Wait for the next group(s) to finish and keep their blocks' results; their indices."""
    if mode.arrival == "seeded":
        done = [st.next_arrival(flight.finish, flight.busy)]
        flight.clock = float(flight.finish[done[0]])
    else:
        done = _first_done(flight)
    for g in done:
        results = engine.dask_client.gather(flight.futures.pop(g))
        for b, result in zip(flight.groups[g], results, strict=True):
            flight.contrib[b] = result
        flight.cversion[g], flight.busy[g] = flight.started[g], False
    in_use = {int(flight.started[g]) for g in np.flatnonzero(flight.busy)}
    flight.params_at = {u: p for u, p in flight.params_at.items() if u in in_use}
    return done


def _first_done(flight: Flight) -> list[int]:
    """Groups whose every task is done (all that are, so that simultaneous ones step once)."""
    while True:
        done = [g for g, fs in sorted(flight.futures.items()) if all(f.done() for f in fs)]
        if done:
            return done
        wait([f for fs in flight.futures.values() for f in fs if not f.done()],
             return_when="FIRST_COMPLETED")


def _dispatch(engine: Engine, flight: Flight, mode: BoundedStaleness, seed: int,
              version: int, params: np.ndarray, submit: bool = True) -> None:
    """Start every idle group that is behind ``version`` on the newest parameters
    (``submit=False``: book them as started without submitting their tasks)."""
    starting = st.to_dispatch(version, flight.cversion, flight.busy)
    if not starting:
        return
    flight.params_at[version] = params
    sent = send_params(engine.dask_client, params) if submit else None
    for g in starting:
        flight.started[g], flight.busy[g] = version, True
        flight.finish[g] = flight.clock + st.virtual_duration(
            seed, g, int(flight.dispatches[g]), mode.spread)
        flight.dispatches[g] += 1
        if submit:
            flight.futures[g] = _submit(engine, flight, g, sent)


def _submit(engine: Engine, flight: Flight, g: int, sent: Any) -> list[Future]:
    return block_tasks(engine, "train", reduce.block_loss_and_grad, sent, f"grad-g{g}",
                       only=flight.groups[g])


# ---------------------------------------------------------------------------------------------
# start and checkpoint

def _start(engine: Engine, optimizer: Optimizer, mode: BoundedStaleness, seed: int,
           resume: bool, meta: dict):
    """``(version, params, optimizer state, flight)``: fresh, or the checkpoint's with its
    in-flight groups started again at the versions they were computing."""
    restored = restore_state(engine, "iteration", KIND, seed) if resume else None
    if restored is None:
        n_groups = mode.groups or max(cluster.n_workers(engine.dask_client), 1)
        flight = _fresh_flight(len(engine.data.blocks), n_groups)
        params = engine.model.init(seed)
        state = optimizer.init(params)
        _dispatch(engine, flight, mode, seed, 0, params)
        return 0, params, state, flight
    version, params, state, ckpt_meta = restored
    for key in ("max_staleness", "arrival"):
        if ckpt_meta.get(key) != meta[key]:
            raise ValidationError(f"checkpoint in {engine.run_dir} was written with "
                                  f"--{key.replace('_', '-')} {ckpt_meta.get(key)}, "
                                  f"not {meta[key]}")
    _, _, rest, _ = runlog.load_state(engine.run_dir)
    flight = _restore_flight(engine, rest, mode)
    for g in np.flatnonzero(flight.busy):  # the work in flight at the checkpoint, again
        u = int(flight.started[g])
        flight.futures[g] = _submit(engine, flight, int(g),
                                    send_params(engine.dask_client, flight.params_at[u]))
    return version, params, state, flight


def _fresh_flight(n_blocks: int, n_groups: int) -> Flight:
    groups = st.group_blocks(n_blocks, n_groups)
    size = len(groups)
    return Flight(groups, [None] * n_blocks, np.full(size, st.NO_VERSION, dtype=np.int64),
                  np.zeros(size, dtype=np.int64), np.zeros(size, dtype=bool),
                  np.zeros(size), np.zeros(size, dtype=np.int64))


def _save(engine: Engine, version: int, params: np.ndarray, state: dict, seed: int,
          meta: dict, flight: Flight) -> None:
    if engine.run_dir is None:
        return
    extra = {"stale/cversion": flight.cversion, "stale/started": flight.started,
             "stale/busy": flight.busy, "stale/finish": flight.finish,
             "stale/dispatches": flight.dispatches, "stale/clock": np.float64(flight.clock),
             "stale/groups": np.array(len(flight.groups))}
    for b, part in enumerate(flight.contrib):
        if part is not None:
            extra.update({f"stale/loss/{b}": np.float64(part[0]), f"stale/grad/{b}": part[1],
                          f"stale/n/{b}": np.int64(part[2])})
    for u, p in flight.params_at.items():
        extra[f"stale/params/{u}"] = p
    runlog.save_state(engine.run_dir, params, state,
                      {"iteration": version, "seed": seed, "model": engine.model.name, **meta},
                      extra)


def _restore_flight(engine: Engine, rest: dict, mode: BoundedStaleness) -> Flight:
    n_groups = int(rest["stale/groups"])
    if mode.groups is not None and min(mode.groups, len(engine.data.blocks)) != n_groups:
        raise ValidationError(f"checkpoint in {engine.run_dir} was written with {n_groups} "
                              f"groups, not {mode.groups}")
    flight = _fresh_flight(len(engine.data.blocks), n_groups)
    for name in ("cversion", "started", "busy", "finish", "dispatches"):
        getattr(flight, name)[:] = rest[f"stale/{name}"]
    flight.clock = float(rest["stale/clock"])
    for b in range(len(flight.contrib)):
        if f"stale/grad/{b}" in rest:
            flight.contrib[b] = (rest[f"stale/loss/{b}"][()], rest[f"stale/grad/{b}"],
                                 int(rest[f"stale/n/{b}"]))
    flight.params_at = {int(k.rsplit("/", 1)[1]): v for k, v in rest.items()
                        if k.startswith("stale/params/")}
    return flight


def mode_options(mode: BoundedStaleness | None,
                 records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The mode under its CLI names (``config.toml``); with ``records``, the summary's part:
    the staleness the steps added, mean and max over the run."""
    if mode is None:
        return {}
    out: dict[str, Any] = {"mode": "async", "max_staleness": int(mode.max_staleness),
                           "arrival": mode.arrival}
    if records is not None:
        steps = [r for r in records if "staleness_max" in r]
        out.update({"groups": mode.groups} if mode.groups else {})
        out["staleness_mean"] = (float(np.mean([r["staleness_mean"] for r in steps]))
                                 if steps else None)
        out["staleness_max"] = max((r["staleness_max"] for r in steps), default=None)
    return out
