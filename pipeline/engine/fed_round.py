"""Federated training, driver side of one round: submit the clients' tasks, sum, step the server.

A round is one wave of pinned per-worker tasks (``local-…``), one fetch of their merged report
(with a ``sum-…`` tree on the workers when there are many leaves), then the server part of the
aggregation chain and the server optimizer on the driver. Clients late for the deadline, on a
dead worker, or with a rejected update are dropped from the round and logged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from distributed import Client, Future, wait
from fedpipe import poison, resilience
from fedpipe.engine import placement
from fedpipe.engine.fed_client import (
    SITES,
    ClientSpec,
    Members,
    add_round_parts,
    eval_group,
    pack_spec,
    round_group,
    rows_block,
    train_group,
    train_report,
    without_rows,
)
from fedpipe.engine.graph import GATHER_AT_MOST, fetch_sum
from fedpipe.errors import TrainingError
from fedpipe.tasks import aggregate, aggregators, reduce, sampling

log = logging.getLogger("fedpipe")

# After the deadline, the finished leaves' results must arrive within this (a healthy worker
# hands one over in milliseconds; a hung one never does).
FETCH_GRACE = 1.0


class ServerState(NamedTuple):
    """The run's state on the driver; a checkpoint is exactly this plus per-client state."""

    params: np.ndarray
    opt_state: dict[str, np.ndarray]
    stage_states: dict[str, dict[str, np.ndarray]]
    control: np.ndarray | None
    round: int
    seed: int


class Sampling(NamedTuple):
    """Who takes part in a round and how long the round may take."""

    fraction: float | None = None
    count: int | None = None
    min_clients: int = 1
    deadline: float | None = None
    retries: int = 1


def _of(spec: ClientSpec, j: int, group: Sequence[str],
        chosen: set[str] | None = None) -> Sequence[str] | Members | None:
    """What a task of group ``j`` is told of its clients: all of them, those ``chosen`` (None:
    none chosen), by position in the spec's groups when the run placed them there."""
    mine = list(group) if chosen is None else [c for c in group if c in chosen]
    if not mine or not spec.groups:
        return mine or None
    if len(mine) == len(group):
        return Members(j)
    return Members(j, np.array([i for i, c in enumerate(group) if c in chosen], np.int32))


class _Leaves(NamedTuple):
    futures: list[Future]
    clients: list[list[str]]


def _submit_train(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                  sampled: set[str], state: ServerState, params_f: np.ndarray, attempt: int,
                  batch_clients: bool) -> _Leaves:
    r = state.round
    work = [(j, group, [c for c in group if c in sampled]) for j, group in enumerate(groups)]
    work = [(f"{spec.token}-r{r}-a{attempt}-g{j}", group, mine, j)
            for j, group, mine in work if mine]
    if batch_clients:  # one wave: a single graph of one pinned task per worker
        calls = {f"local-{tag}": (functools.partial(train_group, pack_spec(spec),
                                                    _of(spec, j, group, sampled), params_f,
                                                    r, state.stage_states, state.control),
                                  placement.pin_group(group))
                 for tag, group, _, j in work}
        return _Leaves(placement.submit_pinned(dask_client, calls), [m for _, _, m, _ in work])
    futures = []
    for tag, _, mine, _ in work:
        per_client = [
            dask_client.submit(train_group, pack_spec(spec), [c], params_f, r,
                               state.stage_states, state.control, key=f"local-{tag}-c{c}",
                               resources=placement.resources_of([c]), pure=False)
            for c in mine]
        futures.append(dask_client.submit(aggregate.add_reports, *per_client, key=f"agg-{tag}"))
    return _Leaves(futures, [m for _, _, m, _ in work])


class _Columns(NamedTuple):
    """A coordinate-wise gathering rule to run by column blocks where each leaf's rows are."""

    rule: Any
    n_params: int
    pins: dict[Any, dict[str, float]]  # leaf key -> resources of its worker


def _columns(spec: ClientSpec, leaves: _Leaves) -> _Columns | None:
    rule = aggregators.column_rule(spec.stages)
    # Site-local workers belong to different parties: one client's update columns must not
    # go to another's worker, so there the rows go to the driver (the server) as before.
    if rule is None or len(leaves.futures) < 2 or spec.partition == SITES:
        return None
    return _Columns(rule, spec.model.n_params, {
        f.key: placement.resources_of(list(clients)[:1])
        for f, clients in zip(leaves.futures, leaves.clients, strict=True)})


def _collect(dask_client: Client, leaves: _Leaves, deadline: float | None, r: int,
             what: str, add=aggregate.add_reports,
             columns: _Columns | None = None) -> tuple[dict | None, dict[str, str]]:
    """Sum the leaves that finish by the deadline; name the clients of the others.

    The sum over all leaves is asked for at once, so a round where every client makes it
    costs one round trip; only when a leaf is late or failed are the finished ones re-summed.
    """
    start = time.monotonic()
    with contextlib.suppress(Exception):  # late (TimeoutError) or a failed leaf: sorted out below
        return _sum_leaves(dask_client, leaves.futures, deadline, what, add, columns), {}
    remaining = None if deadline is None else max(0.0, deadline - (time.monotonic() - start))
    with contextlib.suppress(TimeoutError):
        wait(leaves.futures, timeout=remaining)
    done, dropped = [], {}
    # a worker may hang after finishing its task: only results it still hands over count
    finished = [f for f in leaves.futures if f.status == "finished"]
    usable = {f.key for f, ok in zip(finished, resilience.fetchable(
        dask_client, finished, FETCH_GRACE), strict=True) if ok}
    for fut, owners in zip(leaves.futures, leaves.clients, strict=True):
        if fut.key in usable:
            done.append(fut)
            continue
        reason = ("late" if fut.status in ("pending", "finished")
                  else f"failed ({_error_name(fut)})")
        if reason == "failed (KilledWorker)":  # it would kill workers again next round
            raise poison.client_error(fut.exception(timeout=1), owners)
        if reason == "failed (StoreError)":  # a missing or corrupt chunk is fatal, not a fault
            raise fut.exception(timeout=1)
        dropped.update(dict.fromkeys(owners, reason))
        fut.cancel()  # a late result is discarded, never waited for
    if dropped:
        log.warning("round %d %s: dropped %d client(s): %s", r, what, len(dropped),
                    _short(dropped))
    if not done:
        return None, dropped
    return _sum_leaves(dask_client, done, None, what, add, columns), dropped


def _sum_leaves(dask_client: Client, futures: Sequence[Future], timeout: float | None,
                what: str, add=aggregate.add_reports, columns: _Columns | None = None) -> dict:
    """The leaves' merged report, by the one reduction of :func:`fedpipe.engine.graph.fetch_sum`
    (or, for a coordinate-wise robust rule over several leaves, :func:`_column_sum`)."""
    if columns is not None and len(futures) >= 2:
        return _column_sum(dask_client, futures, timeout, what, add, columns)
    return fetch_sum(dask_client, futures, add, timeout, f"sum-{what}")


def _column_sum(dask_client: Client, futures: Sequence[Future], timeout: float | None,
                what: str, add, columns: _Columns) -> dict:
    """The leaves' merged report with the rule applied by column blocks on the workers.

    Block ``j`` of every leaf's stacked rows goes to leaf ``j``'s worker, which applies the rule
    to them (in leaf order, as the stacked rows would be): the driver fetches each leaf's report
    without its rows and one result per block, instead of every row (80 MB a round at 1,000
    clients x 10,000 parameters) and the rule's work on its own. Same bits: the rule is
    coordinate-wise.
    """
    n, tag = len(futures), uuid.uuid4().hex[:12]
    pins = [columns.pins.get(f.key) or None for f in futures]
    takes = [[dask_client.submit(rows_block, f, j, n, columns.n_params, resources=pin,
                                 key=(f"take-{what}-{tag}", i, j)) for j in range(n)]
             for i, (f, pin) in enumerate(zip(futures, pins, strict=True))]
    rests = [dask_client.submit(without_rows, f, resources=pin, key=(f"rest-{what}-{tag}", i))
             for i, (f, pin) in enumerate(zip(futures, pins, strict=True))]
    blocks = [dask_client.submit(aggregators.rule_on_blocks, columns.rule,
                                 *(row[j] for row in takes), resources=pins[j],
                                 key=(f"columns-{what}-{tag}", j)) for j in range(n)]
    parts = resilience.fetch(dask_client, rests + blocks, timeout)
    report = add(*parts[:n])
    train = train_report(report)
    if train is not None and train["packet"] is not None:
        train["packet"] = aggregators.join_columns(train["packet"], parts[n:])
    return report


def _error_name(fut: Future) -> str:
    with contextlib.suppress(Exception):
        exc = fut.exception(timeout=1)
        return type(exc).__name__
    return fut.status


def _short(dropped: dict[str, str]) -> str:
    items = [f"{c} ({why})" for c, why in list(dropped.items())[:5]]
    return ", ".join(items) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")


def train_round(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                 clients: Sequence[str], state: ServerState, sampling_: Sampling,
                 server_optimizer: Any, batch_clients: bool) -> tuple[ServerState, dict]:
    """One round: sample, train on the workers, sum, step the server (retried below min)."""
    new_state, record, _ = _round(dask_client, spec, groups, clients, state, sampling_,
                                  server_optimizer, batch_clients, evaluate_first=False)
    return new_state, record


def evaluate_and_train(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                       clients: Sequence[str], state: ServerState, sampling_: Sampling,
                       server_optimizer: Any,
                       batch_clients: bool) -> tuple[ServerState, dict, dict]:
    """:func:`train_round`, and :func:`evaluate` of the params it starts from, in one trip.

    The params a round starts from are the previous round's result: the third value is what
    ``evaluate(..., state.params, state.round - 1, ...)`` returns, computed by the same tasks
    that train (:func:`fedpipe.engine.fed_client.round_group`), so an evaluated round costs one
    Dask round trip, not two. The new state and the record are :func:`train_round`'s, bit for
    bit.
    """
    return _round(dask_client, spec, groups, clients, state, sampling_, server_optimizer,
                  batch_clients, evaluate_first=True)


def _round(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
           clients: Sequence[str], state: ServerState, sampling_: Sampling,
           server_optimizer: Any, batch_clients: bool,
           evaluate_first: bool) -> tuple[ServerState, dict, dict | None]:
    r = state.round
    sampled = sampling.sample_clients(clients, r, state.seed, fraction=sampling_.fraction,
                                      count=sampling_.count)
    evaluation = None
    # Fused tasks sum over every group; with a tree (many leaves) a group without sampled
    # clients would regroup the training sum and change its bits, so then evaluate apart.
    fused = evaluate_first and batch_clients and (
        len(groups) <= GATHER_AT_MOST or all(set(g) & set(sampled) for g in groups))
    if evaluate_first and not fused:
        evaluation = evaluate(dask_client, spec, groups, state.params, r - 1, sampling_.deadline)
    # The params travel inside each task's spec, not via scatter(broadcast=True): right after a
    # worker dies the scheduler still lists it and a broadcast waits on 30 s connect timeouts,
    # holding the round past its deadline. One task per worker group keeps the copies few.
    params_f = state.params
    for attempt in range(sampling_.retries + 1):
        if fused and attempt == 0:
            report, dropped, evaluation = _evaluate_and_train(dask_client, spec, groups,
                                                              set(sampled), state,
                                                              sampling_.deadline)
        else:
            leaves = _submit_train(dask_client, spec, groups, set(sampled), state, params_f,
                                   attempt, batch_clients)
            report, dropped = _collect(dask_client, leaves, sampling_.deadline, r, "train",
                                       columns=_columns(spec, leaves))
        records = report["clients"] if report else {}
        rejected = {c: rec["rejected"] for c, rec in records.items() if "rejected" in rec}
        accepted = len(records) - len(rejected)
        if accepted >= sampling_.min_clients:
            break
        log.warning("round %d: %d client update(s) accepted, fewer than min_clients=%d%s", r,
                    accepted, sampling_.min_clients,
                    "; retrying" if attempt < sampling_.retries else "")
    else:
        raise TrainingError(
            f"round {r}: only {accepted} of {len(sampled)} sampled clients returned a valid update "
            f"after {sampling_.retries + 1} attempt(s), fewer than --min-clients "
            f"{sampling_.min_clients} (dropped: {_short(dropped) or 'none'})")
    if rejected:
        log.warning("round %d: rejected update(s): %s", r, _short(rejected))
    total, stage_states, measurements = aggregate.server_side(spec.stages, state.stage_states,
                                                              report["packet"])
    params, opt_state = aggregate.server_step(server_optimizer, state.params,
                                              state.opt_state, total["delta"])
    control = state.control
    if control is not None:  # the clients' control_variates transform reports its changes
        control = aggregate.scaffold_control(control, total["control"], len(clients))
    new_state = ServerState(params, opt_state, stage_states, control, r + 1, state.seed)
    record = {"round": r, "sampled": len(sampled), "aggregated": accepted,
              "dropped": dropped, "rejected": rejected, "aggregation": measurements,
              "train_loss": aggregate.weighted_average(
                  {c: rec for c, rec in records.items() if c not in rejected}, "train_loss"),
              # Only rejected clients' records are copied: a new dict per client per round cost
              # ~5 ms a round at 1,000 clients (mostly collector passes over the history).
              "clients": {c: {k: v for k, v in rec.items() if k != "rejected"}
                          if c in rejected else rec for c, rec in records.items()}}
    return new_state, record, evaluation


def _evaluate_and_train(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                        sampled: set[str], state: ServerState,
                        deadline: float | None) -> tuple[dict | None, dict[str, str], dict]:
    """One task per group evaluates ``state.params`` on all its clients, then trains the sampled.

    Returns the training report and its dropped clients as :func:`_collect` would for the
    training tasks alone, and the evaluation as :func:`evaluate` returns it.
    """
    r = state.round
    calls = {f"local-{spec.token}-r{r}-a0-g{j}": (
        functools.partial(round_group, pack_spec(spec), _of(spec, j, g), _of(spec, j, g, sampled),
                          state.params, r, state.stage_states, state.control),
        placement.pin_group(g)) for j, g in enumerate(groups)}
    leaves = _Leaves(placement.submit_pinned(dask_client, calls), [list(g) for g in groups])
    both, dropped = _collect(dask_client, leaves, deadline, r, "round", add=add_round_parts,
                             columns=_columns(spec, leaves))
    both = both or {"train": None, "eval": None}
    train_dropped = {c: why for c, why in dropped.items() if c in sampled}
    return both["train"], train_dropped, _evaluation(spec, both["eval"], dropped)


def evaluate(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
              params: np.ndarray, r: int, deadline: float | None) -> dict:
    """Test metrics of ``params`` summed over the clients' own test rows (kept on workers)."""
    calls = {f"eval-{spec.token}-r{r}-g{j}": (functools.partial(eval_group, pack_spec(spec),
                                                                 _of(spec, j, g), params),
                                              placement.pin_group(g))
             for j, g in enumerate(groups)}
    futures = placement.submit_pinned(dask_client, calls)
    report, dropped = _collect(dask_client, _Leaves(futures, [list(g) for g in groups]),
                               deadline, r, "eval")
    return _evaluation(spec, report, dropped)


def _evaluation(spec: ClientSpec, report: dict | None, dropped: dict[str, str]) -> dict:
    if report is None:
        return {"eval_dropped": dropped}
    # The data-parallel engine's metrics of the summed sums: same names, same formulas.
    out: dict[str, Any] = reduce.finish_metrics(report["packet"]["sums"], spec.model.task)
    out["eval_clients"] = report["clients"]
    if dropped:
        out["eval_dropped"] = dropped
    return out
