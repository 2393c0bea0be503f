"""Buffered asynchronous federated training (FedBuff): the driver loop, no round barrier.

At most ``C`` clients train at once, each a pinned ``local-…`` task (the synchronous rounds'
:func:`fedpipe.engine.fed_client.train_group`, on the same workers and cached rows) started
from the newest model version. As each finishes, its update is weighted by its staleness
(:mod:`fedpipe.tasks.fedbuff`) into a buffer, or dropped when it is too stale, and an idle
client takes its slot on the newest version. Every ``K`` buffered updates go through the
server part of the aggregation chain and the server optimizer, exactly as a round's sum does,
and make the next version. The versions that in-flight clients started from are kept (their
params and stage states) until the last of those clients is handled: a checkpoint records them
with the in-flight work, so a resumed run re-submits that work from the same bases.

With ``clock="virtual"`` each task has a simulated duration (the mode's client speeds) and
updates are handled in simulated arrival order, waiting for the Dask result of the next one
to arrive; the run is then a function of its seed, bit for bit, and resumable bit-identical.
With ``clock="wall"`` updates are handled as Dask delivers them (``as_completed``).

References
----------
Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from distributed import Client, Future, as_completed
from fedpipe import poison
from fedpipe.engine import fed_state, placement, runlog
from fedpipe.engine.fed_client import ClientSpec, pack_spec, train_group
from fedpipe.engine.fed_round import ServerState, evaluate
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.tasks import aggregate, fedbuff
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.fedbuff import Buffered

log = logging.getLogger("fedpipe")


class Work(NamedTuple):
    """One client task in flight: the ``dispatch``-th of the run (its key and RNG stream)."""

    dispatch: int
    client: str
    base: int  # the model version it trains from
    start: float  # clock time it was dispatched
    finish: float  # simulated arrival (virtual clock); nan on the wall clock


class AsyncState(NamedTuple):
    """The async run's state on the driver (what its checkpoint holds, the buffer being empty).

    ``server.round`` is the current model version; ``versions`` maps each version some
    in-flight client started from (and the current one) to its ``(params, stage_states)``.
    """

    server: ServerState
    clock: float
    dispatched: int
    inflight: tuple[Work, ...]
    versions: dict[int, tuple[np.ndarray, dict]]


def check_chain(chain: Sequence[Stage], strategy: Strategy) -> None:
    """Refuse, in one line naming the flag, what the async loop does not support."""
    kinds = {(s.spec or {}).get("kind") for s in chain}
    refused = [(aggregate.server_control(strategy.client_transforms),
                "--strategy scaffold: its control variates assume rounds"),
               (any(hasattr(s.before_sum, "secagg") for s in chain),
                "--secure-aggregation: its masks need a round's fixed set of clients"),
               (bool(kinds & {"gaussian_noise", "dp_mean"}),
                "--dp: the privacy accountant counts rounds of sampled clients"),
               (any((s.spec or {}).get("kind") == "topk" for s in chain),
                "--compress topk: its per-client residuals are not in the async checkpoint")]
    for bad, why in refused:
        if bad:
            raise ValidationError(f"--mode async does not support {why}")


def run_buffered(dc: Client, spec: ClientSpec, groups, clients: Sequence[str],
                 rows: dict[str, int], strategy: Strategy, mode: Buffered, *, versions: int,
                 eval_every: int, run_dir, checkpoint_every: int, on_record,
                 resume: bool) -> tuple[ServerState, list[dict], dict]:
    """Run FedBuff up to model version ``versions``; returns the final state, history, summary."""
    if mode.max_concurrency > len(clients):
        raise ValidationError(f"--max-concurrency {mode.max_concurrency} exceeds the "
                              f"{len(clients)} clients")
    server = fed_state.initial_state(spec.model, strategy, spec.stages, spec.seed)
    st = AsyncState(server, 0.0, 0, (), {0: (server.params, server.stage_states)})
    if resume:
        st = _resume(run_dir, spec, server)
    loop = _Loop(dc, spec, placement.sort_clients(clients), mode,
                 fedbuff.durations(mode.speeds, rows, spec.seed), strategy)
    history: list[dict] = []
    st = loop.run(st, versions, eval_every, groups, run_dir, checkpoint_every, on_record,
                  history)
    if run_dir is not None:
        _checkpoint(run_dir, spec, st, strategy, mode)
    summary = fed_state.summary(history, st.server, strategy, spec, clients, run_dir)
    summary["rounds"] = summary.pop("rounds_run")  # one record per version, no rounds
    summary |= {"mode": mode.spec, "version": st.server.round, "clock": st.clock,
                "updates_dropped_stale": sum(r["dropped_stale"] for r in history),
                "updates_failed": sum(r["failed"] for r in history),
                "staleness_mean": _mean_staleness(history)}
    return st.server, history, summary


class _Loop:
    """The event loop over in-flight client tasks (a class only to share its run's settings)."""

    def __init__(self, dc: Client, spec: ClientSpec, clients: list[str], mode: Buffered,
                 durations: dict[str, float], strategy: Strategy) -> None:
        self.dc, self.spec, self.clients, self.mode = dc, spec, clients, mode
        self.durations, self.strategy = durations, strategy
        self.futures: dict[int, Future] = {}
        self.arrivals = as_completed() if mode.clock == "wall" else None
        self.t0 = time.monotonic()

    def run(self, st: AsyncState, versions: int, eval_every: int, groups, run_dir,
            checkpoint_every: int, on_record, history: list[dict]) -> AsyncState:
        for work in st.inflight:  # resumed work runs again from its recorded base
            self._submit(work, st.versions[work.base])
        st = self._fill(st)
        buffer: list[tuple[Work, dict, dict]] = []  # (work, weighted packet, record)
        counts = {"dropped_stale": 0, "failed": 0}
        dropped: dict[str, str] = {}
        started = time.perf_counter()
        while st.server.round < versions:
            work, report, st = self._next(st)
            staleness = st.server.round - work.base
            if report is None:
                counts["failed"] += 1
                dropped[work.client] = "failed"
            elif fedbuff.too_stale(staleness, self.mode.max_staleness):
                counts["dropped_stale"] += 1
                dropped[work.client] = f"stale ({staleness} versions)"
            else:
                record = report["clients"][work.client] | {"staleness": staleness,
                                                           "base": work.base}
                packet = report["packet"]
                if packet is not None:
                    weight = fedbuff.staleness_weight(staleness, self.mode.staleness_exponent)
                    packet = fedbuff.weigh(packet, weight)
                buffer.append((work, packet, record))
            if len(buffer) == self.mode.buffer_size:
                st, record = self._aggregate(st, buffer, counts, dropped)
                record["seconds"] = time.perf_counter() - started
                v = st.server.round
                if v % eval_every == 0 or v == versions:
                    evaluation = evaluate(self.dc, self.spec, groups, st.server.params, v - 1,
                                          None)
                    evaluation.pop("eval_clients", None)
                    record |= evaluation
                due = checkpoint_every and v % checkpoint_every == 0 and v < versions
                st = _prune(st)
                runlog.emit(run_dir, on_record, record, (lambda st=st: _checkpoint(
                    run_dir, self.spec, st, self.strategy, self.mode)) if due else None)
                history.append({k: x for k, x in record.items() if k != "clients"})
                buffer, counts, dropped = [], {"dropped_stale": 0, "failed": 0}, {}
                started = time.perf_counter()
            st = self._fill(_prune(st))
        for future in self.futures.values():  # the run is over: in-flight work is discarded
            future.cancel()
        return st

    def _fill(self, st: AsyncState) -> AsyncState:
        """Dispatch idle clients on the newest version until ``C`` are in flight."""
        busy = {w.client for w in st.inflight}
        inflight, n = list(st.inflight), st.dispatched
        while len(inflight) < self.mode.max_concurrency:
            client = fedbuff.pick_client([c for c in self.clients if c not in busy],
                                         st.server.seed, n)
            finish = (st.clock + self.durations[client] if self.mode.clock == "virtual"
                      else math.nan)
            work = Work(n, client, st.server.round, st.clock, finish)
            self._submit(work, st.versions[st.server.round])
            inflight.append(work)
            busy.add(client)
            n += 1
        return st._replace(inflight=tuple(inflight), dispatched=n)

    def _submit(self, work: Work, base: tuple[np.ndarray, dict]) -> None:
        params, stage_states = base
        future = self.dc.submit(train_group, pack_spec(self.spec), [work.client], params,
                                work.dispatch, stage_states, None,
                                key=f"local-{self.spec.token}-d{work.dispatch}-c{work.client}",
                                resources=placement.resources_of([work.client]), pure=False)
        self.futures[work.dispatch] = future
        if self.arrivals is not None:
            self.arrivals.add(future)

    def _next(self, st: AsyncState) -> tuple[Work, dict | None, AsyncState]:
        """The next update to arrive (simulated or real order) and the state without it."""
        if self.arrivals is None:
            work = min(st.inflight, key=lambda w: (w.finish, w.dispatch))
            clock = work.finish
        else:
            key = next(self.arrivals).key
            work = next(w for w in st.inflight if self.futures[w.dispatch].key == key)
            clock = time.monotonic() - self.t0
        future = self.futures.pop(work.dispatch)
        report = None
        try:
            report = future.result()
        except Exception as exc:  # a dead worker loses only this client's in-flight update
            if type(exc).__name__ == "KilledWorker":
                raise poison.client_error(exc, [work.client]) from None
            if type(exc).__name__ == "StoreError":
                raise
            log.warning("async: client %s (task %d) failed: %s", work.client, work.dispatch,
                        type(exc).__name__)
        rest = tuple(w for w in st.inflight if w.dispatch != work.dispatch)
        return work, report, st._replace(inflight=rest, clock=clock)

    def _aggregate(self, st: AsyncState, buffer, counts: dict, dropped: dict):
        """One server step on the buffer: the chain's server part, the server optimizer."""
        packets = [p for _, p, _ in buffer if p is not None]
        records = {w.client: rec for w, _, rec in buffer}
        rejected = {c: rec["rejected"] for c, rec in records.items() if "rejected" in rec}
        server = st.server
        if not packets:  # every buffered update was rejected: the version stays
            raise TrainingError(f"version {server.round}: all {len(buffer)} buffered updates "
                                f"were rejected: {_short(rejected)}")
        total, stage_states, measurements = aggregate.server_side(
            self.spec.stages, server.stage_states, aggregate.add_packets(*packets))
        params, opt_state = aggregate.server_step(self.strategy.server, server.params,
                                                  server.opt_state, total["delta"])
        v = server.round
        server = ServerState(params, opt_state, stage_states, None, v + 1, server.seed)
        staleness = [rec["staleness"] for _, _, rec in buffer]
        record = {"round": v, "version": v + 1, "virtual_time" if self.mode.clock == "virtual"
                  else "clock_time": st.clock, "aggregated": len(packets),
                  "staleness": fedbuff.staleness_summary(staleness), **counts,
                  "dropped": dict(dropped), "rejected": rejected, "aggregation": measurements,
                  "in_flight": len(st.inflight), "train_loss": aggregate.weighted_average(
                      {c: r for c, r in records.items() if c not in rejected}, "train_loss"),
                  "clients": records}
        versions = {**st.versions, v + 1: (params, stage_states)}
        return st._replace(server=server, versions=versions), record


def _short(named: dict[str, str]) -> str:
    items = [f"{c} ({why})" for c, why in list(named.items())[:5]]
    return ", ".join(items) + (f" and {len(named) - 5} more" if len(named) > 5 else "")


def _prune(st: AsyncState) -> AsyncState:
    """Keep only the versions still referenced: in-flight bases and the current one."""
    keep = {w.base for w in st.inflight} | {st.server.round}
    return st._replace(versions={v: x for v, x in st.versions.items() if v in keep})


def _mean_staleness(history: list[dict]) -> float | None:
    pairs = [(r["staleness"]["mean"], r["aggregated"]) for r in history
             if r["staleness"]["mean"] is not None]
    total = sum(n for _, n in pairs)
    return sum(m * n for m, n in pairs) / total if total else None


def _checkpoint(run_dir, spec: ClientSpec, st: AsyncState, strategy: Strategy,
                mode: Buffered) -> None:
    """``checkpoint.npz``: server state, the kept versions, the in-flight work, the clock."""
    server = st.server
    extra = {f"stage/{name}/{k}": v for name, s in server.stage_states.items()
             for k, v in s.items()}
    for v, (params, stages) in st.versions.items():
        extra[f"version/{v}/params"] = params
        extra |= {f"version/{v}/stage/{name}/{k}": x for name, s in stages.items()
                  for k, x in s.items()}
    meta = {"round": server.round, "seed": server.seed, "strategy": strategy.name,
            "partition": spec.partition, "mode": mode.spec, "clock": st.clock,
            "dispatched": st.dispatched, "inflight": [list(w) for w in st.inflight]}
    runlog.save_state(run_dir, server.params, server.opt_state, meta, extra)


def _resume(run_dir, spec: ClientSpec, fresh: ServerState) -> AsyncState:
    loaded = runlog.load_state(run_dir)
    if loaded is None:
        raise ValidationError(f"--resume: no checkpoint.npz in {run_dir}")
    params, opt_state, arrays, meta = loaded
    if "inflight" not in meta:
        raise ValidationError(f"--resume: the checkpoint in {run_dir} is a synchronous run's: "
                              "resume it without --mode async")
    if meta.get("partition") != spec.partition or int(meta["n_params"]) != fresh.params.size:
        raise ValidationError(f"--resume: checkpoint in {run_dir} is for partition "
                              f"{meta.get('partition')!r} with {meta['n_params']} params")

    def stages_of(prefix: str) -> dict:
        return {name: {k[len(f"{prefix}{name}/"):]: v for k, v in arrays.items()
                       if k.startswith(f"{prefix}{name}/")} for name in fresh.stage_states}

    versions = {int(k.split("/")[1]): (v, stages_of(f"version/{k.split('/')[1]}/stage/"))
                for k, v in arrays.items() if k.startswith("version/") and k.endswith("/params")}
    inflight = tuple(Work(int(d), str(c), int(b), float(s), float(f))
                     for d, c, b, s, f in meta["inflight"])
    runlog.rewind(run_dir, "round", int(meta["round"]))
    log.info("resuming async run at version %d from %s", meta["round"], run_dir)
    server = ServerState(params, opt_state, stages_of("stage/"), None, int(meta["round"]),
                         int(meta["seed"]))
    return AsyncState(server, float(meta["clock"]), int(meta["dispatched"]), inflight, versions)
