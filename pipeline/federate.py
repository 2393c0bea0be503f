"""Federated training: the round loop, on clients pinned to their own workers.

Every round: sample clients by ``(seed, round)`` -> broadcast the global params -> each worker
trains its resident sampled clients on rows cached on that worker and runs the client part of
the aggregation chain -> a fixed-order tree sums the packets on the workers -> the driver runs
the server part and the server optimizer -> clients evaluate the new params on their test rows.
Clients late for the deadline, on a dead worker, or with a rejected update are dropped from the
round and logged. All state of the run sits in one :class:`ServerState` on the driver (what the
checkpoint writes), except per-client state (SCAFFOLD's ``c_i``), kept on the client's worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import cloudpickle
import numpy as np
from distributed import Client, Future, wait

from pipeline import placement, rundir, store
from pipeline.errors import TrainingError, ValidationError
from pipeline.graph import tree_sum
from tasks import aggregate, local, sampling
from tasks.aggregate import Stage, Strategy
from tasks.models import Model

log = logging.getLogger("fedpipe")

# How long a task may wait for its client's worker when no --deadline bounds the round.
DEFAULT_NO_WORKER_TIMEOUT = 60.0
# Leaves fetched and merged on the driver rather than summed by a tree of tasks on the workers.
GATHER_AT_MOST = 2
FAN_IN = 8


class ClientSpec(NamedTuple):
    """Everything a worker needs to train or evaluate its clients (the same every round)."""

    url: str
    partition: str
    test_fraction: float
    seed: int
    model: Model
    epochs: int
    batch_size: int
    lr: float | Callable[[int], float]
    mu: float
    scaffold: bool
    stages: tuple[Stage, ...]
    token: str


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


class PackedSpec(NamedTuple):
    """A :class:`ClientSpec` pickled once per run: tasks carry bytes, workers unpickle once."""

    token: str
    blob: bytes


@functools.lru_cache(maxsize=8)
def pack_spec(spec: ClientSpec) -> PackedSpec:
    """Pickle the spec once; pickling the model's closures on every submit costs ~20 ms."""
    return PackedSpec(spec.token, cloudpickle.dumps(spec))


# --------------------------------------------------------------------------------------------
# worker side (runs inside tasks pinned by client resources)


def _unpack(spec: ClientSpec | PackedSpec) -> ClientSpec:
    if isinstance(spec, ClientSpec):
        return spec
    specs = placement.worker_cache().specs
    if spec.token not in specs:
        specs[spec.token] = cloudpickle.loads(spec.blob)
    return specs[spec.token]


def _train_client(spec: ClientSpec, client: str, params: np.ndarray, round_: int,
                  stage_states: dict, control: np.ndarray | None) -> dict:
    (X, y, _, _), was_read = placement.client_rows(spec.url, spec.partition, client,
                                                   test_fraction=spec.test_fraction,
                                                   seed=spec.seed, run=spec.token)
    cache = placement.worker_cache()
    pair = None
    if spec.scaffold:
        mine = cache.state.get((spec.token, client), {}).get("control", np.zeros_like(params))
        pair = (control, mine)
    result = local.local_train(
        spec.model, params, X, y, epochs=spec.epochs, batch_size=spec.batch_size,
        lr=local.round_lr(spec.lr, round_), mu=spec.mu, control=pair,
        rng=local.client_rng(spec.seed, round_, client))
    if result.control is not None:
        cache.state[(spec.token, client)] = {"control": result.control}
    packet, rejected = aggregate.client_side(spec.stages, stage_states, result.packet)
    metrics = {**result.metrics, "read": was_read}
    return aggregate.client_report(client, packet, metrics, rejected)


def train_group(spec: ClientSpec | PackedSpec, clients: Sequence[str], params: np.ndarray,
                round_: int, stage_states: dict, control: np.ndarray | None) -> dict:
    """Train the given clients of this worker, in order, and merge their reports.

    Equal, bit for bit, to one task per client followed by :func:`tasks.aggregate.add_reports`
    over the same clients in the same order.
    """
    spec = _unpack(spec)
    reports = [_train_client(spec, c, params, round_, stage_states, control) for c in clients]
    return aggregate.add_reports(*reports)


def eval_group(spec: ClientSpec | PackedSpec, clients: Sequence[str], params: np.ndarray) -> dict:
    """Test-row sums of the given clients of this worker (their rows never leave it)."""
    spec = _unpack(spec)
    reports = []
    for client in clients:
        (_, _, X, y), _ = placement.client_rows(spec.url, spec.partition, client,
                                                test_fraction=spec.test_fraction,
                                                seed=spec.seed, run=spec.token)
        sums = local.evaluate_sums(spec.model, params, X, y)
        record = {f"test_{k}": v for k, v in local.metrics_from_sums(sums, spec.model.task).items()}
        reports.append(aggregate.client_report(client, sums, record))
    return aggregate.add_reports(*reports)


def get_client_state(token: str, clients: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per-client state held on this worker for run ``token`` (for the checkpoint)."""
    cache = placement.worker_cache()
    return {c: cache.state[(token, c)] for c in clients if (token, c) in cache.state}


def put_client_state(token: str, states: dict[str, dict[str, np.ndarray]]) -> int:
    """Restore per-client state on this worker (on resume)."""
    cache = placement.worker_cache()
    for client, state in states.items():
        cache.state[(token, client)] = state
    return len(states)


# --------------------------------------------------------------------------------------------
# driver side: one round


class _Leaves(NamedTuple):
    futures: list[Future]
    clients: list[list[str]]


def _submit_train(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                  sampled: set[str], state: ServerState, params_f: np.ndarray, attempt: int,
                  batch_clients: bool) -> _Leaves:
    futures, owners = [], []
    r = state.round
    for j, group in enumerate(groups):
        mine = [c for c in group if c in sampled]
        if not mine:
            continue
        tag = f"{spec.token}-r{r}-a{attempt}-g{j}"
        if batch_clients:
            fut = dask_client.submit(train_group, pack_spec(spec), mine, params_f, r,
                                     state.stage_states, state.control, key=f"local-{tag}",
                                     resources=placement.pin_group(group), pure=False)
        else:
            per_client = [
                dask_client.submit(train_group, pack_spec(spec), [c], params_f, r,
                                   state.stage_states, state.control, key=f"local-{tag}-c{c}",
                                   resources=placement.resources_of([c]), pure=False)
                for c in mine]
            fut = dask_client.submit(aggregate.add_reports, *per_client, key=f"agg-{tag}")
        futures.append(fut)
        owners.append(mine)
    return _Leaves(futures, owners)


def _collect(dask_client: Client, leaves: _Leaves, deadline: float | None, r: int,
             what: str) -> tuple[dict | None, dict[str, str]]:
    """Sum the leaves that finish by the deadline; name the clients of the others.

    The sum over all leaves is asked for at once, so a round where every client makes it
    costs one round trip; only when a leaf is late or failed are the finished ones re-summed.
    """
    start = time.monotonic()
    with contextlib.suppress(Exception):  # late (TimeoutError) or a failed leaf: sorted out below
        return _sum_leaves(dask_client, leaves.futures, deadline, what), {}
    remaining = None if deadline is None else max(0.0, deadline - (time.monotonic() - start))
    with contextlib.suppress(TimeoutError):
        wait(leaves.futures, timeout=remaining)
    done, dropped = [], {}
    for fut, owners in zip(leaves.futures, leaves.clients, strict=True):
        if fut.status == "finished":
            done.append(fut)
            continue
        reason = "late" if fut.status == "pending" else f"failed ({_error_name(fut)})"
        dropped.update(dict.fromkeys(owners, reason))
        fut.cancel()  # a late result is discarded, never waited for
    if dropped:
        log.warning("round %d %s: dropped %d client(s): %s", r, what, len(dropped),
                    _short(dropped))
    if not done:
        return None, dropped
    return _sum_leaves(dask_client, done, None, what), dropped


def _sum_leaves(dask_client: Client, futures: Sequence[Future], timeout: float | None,
                what: str) -> dict:
    """The leaves' merged report: fetched directly when few, else summed by a tree on workers.

    With a leaf or two (one per simulation worker) a ``sum-…`` task costs a scheduling hop and a
    worker-to-worker transfer more than fetching both model-sized reports (~5 ms per round on
    a loaded 2-core machine); the driver merges them with the same add in the same order, so
    the bits are those of the tree.
    """
    if len(futures) <= GATHER_AT_MOST:
        wait(futures, timeout=timeout)  # client-side wait: no extra round trip
        return aggregate.add_reports(*dask_client.gather(list(futures)))
    root = tree_sum(dask_client, futures, fan_in=FAN_IN, key_prefix=f"sum-{what}",
                    add=aggregate.add_reports)
    try:
        return root.result(timeout=timeout)
    except BaseException:
        root.cancel()
        raise


def _error_name(fut: Future) -> str:
    with contextlib.suppress(Exception):
        exc = fut.exception(timeout=1)
        return type(exc).__name__
    return fut.status


def _short(dropped: dict[str, str]) -> str:
    items = [f"{c} ({why})" for c, why in list(dropped.items())[:5]]
    return ", ".join(items) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")


def _train_round(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
                 clients: Sequence[str], state: ServerState, sampling_: Sampling,
                 server_optimizer: Any, batch_clients: bool) -> tuple[ServerState, dict]:
    r = state.round
    sampled = sampling.sample_clients(clients, r, state.seed, fraction=sampling_.fraction,
                                      count=sampling_.count)
    # The params travel inside each task's spec, not via scatter(broadcast=True): right after a
    # worker dies the scheduler still lists it and a broadcast waits on 30 s connect timeouts,
    # holding the round past its deadline. One task per worker group keeps the copies few.
    params_f = state.params
    for attempt in range(sampling_.retries + 1):
        leaves = _submit_train(dask_client, spec, groups, set(sampled), state, params_f,
                               attempt, batch_clients)
        report, dropped = _collect(dask_client, leaves, sampling_.deadline, r, "train")
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
    if spec.scaffold:
        control = aggregate.scaffold_control(control, total["control"], len(clients))
    new_state = ServerState(params, opt_state, stage_states, control, r + 1, state.seed)
    record = {"round": r, "sampled": len(sampled), "aggregated": accepted,
              "dropped": dropped, "rejected": rejected, "aggregation": measurements,
              "train_loss": aggregate.weighted_average(
                  {c: rec for c, rec in records.items() if c not in rejected}, "train_loss"),
              "clients": {c: {k: v for k, v in rec.items() if k != "rejected"}
                          for c, rec in records.items()}}
    return new_state, record


def _evaluate(dask_client: Client, spec: ClientSpec, groups: Sequence[Sequence[str]],
              params: np.ndarray, r: int, deadline: float | None) -> dict:
    params_f = params  # inside the task specs, as in _train_round
    futures = [dask_client.submit(eval_group, pack_spec(spec), g, params_f,
                                  key=f"eval-{spec.token}-r{r}-g{j}",
                                  resources=placement.pin_group(g), pure=False)
               for j, g in enumerate(groups)]
    report, dropped = _collect(dask_client, _Leaves(futures, [list(g) for g in groups]),
                               deadline, r, "eval")
    if report is None:
        return {"eval_dropped": dropped}
    metrics = local.metrics_from_sums(report["packet"], spec.model.task)
    out: dict[str, Any] = {f"test_{k}": v for k, v in metrics.items()}
    out["eval_clients"] = report["clients"]
    if dropped:
        out["eval_dropped"] = dropped
    return out


# --------------------------------------------------------------------------------------------
# driver side: the run


class FederatedRun(NamedTuple):
    """What :func:`federate` returns: final params and state, per-round history, summary."""

    params: np.ndarray
    state: ServerState
    history: list[dict]
    summary: dict


def federate(store_url: str, model: Model, *, rounds: int, strategy: Strategy | None = None,
             local_epochs: int = 1, batch_size: int = 32,
             lr: float | Callable[[int], float] = 0.1, partition: str | None = None,
             fraction: float | None = None, clients_per_round: int | None = None,
             min_clients: int = 1, deadline: float | None = None, retries: int = 1,
             stages: Sequence[Stage] | None = None, seed: int = 0, test_fraction: float = 0.2,
             eval_every: int = 1, workers: int | None = None, batch_clients: bool = True,
             dask_client: Client | None = None, scheduler: str | None = None,
             out: str | None = None, checkpoint_every: int = 0, resume: bool = False,
             on_record: Callable[[dict], None] | None = None) -> FederatedRun:
    """Federated training of ``model`` on the clients of a partition of a fedpipe store.

    Parameters
    ----------
    store_url : str
        fedpipe zarr store holding the partition.
    model : tasks.models.Model
        The model (built for the store's features and classes).
    rounds : int
        Rounds to run (a resumed run continues up to this number).
    strategy : tasks.aggregate.Strategy, optional
        ``fedavg()`` (default), ``fedprox(mu)``, ``fedavgm``, ``fedadam``, ``fedyogi``,
        ``fedadagrad`` or ``scaffold``.
    local_epochs, batch_size, lr
        Client training: epochs of mini-batch SGD, batch size, step size (float or a schedule
        evaluated at the round number).
    partition : str, optional
        Partition name; default the store's only partition.
    fraction, clients_per_round : optional
        Clients sampled per round (a share in (0, 1] or a number); default all.
    min_clients : int
        Fewest accepted updates a round needs; fewer -> retried ``retries`` times, then
        :class:`TrainingError`.
    deadline : float, optional
        Seconds a round waits for its clients; late ones are dropped and logged.
    stages : sequence of Stage, optional
        Aggregation chain; default ``(validate(), weighted_mean())``.
    seed, test_fraction
        Run seed (sampling, batch order) and the share of each client's rows held out.
    eval_every : int
        Evaluate on the clients' test rows every this many rounds (and after the last one).
    workers : int, optional
        Simulation workers (default 2) when fedpipe starts its own cluster.
    batch_clients : bool
        One task per worker per round (True) or one per client (False); the same result.
    dask_client, scheduler : optional
        Use this client's cluster, or connect to a scheduler address; either way the workers
        must carry ``client-<id>`` resources (they are discovered, no cluster is started).
    out : str, optional
        Run directory (``metrics.jsonl``, ``params.npz``, ``summary.json``, checkpoints).
    checkpoint_every : int
        Write ``checkpoint.npz`` every this many rounds (0: only at the end).
    resume : bool
        Continue from ``out/checkpoint.npz``; ends bit-identical to an uninterrupted run.
    on_record : callable, optional
        Called with each round's metrics record after it is appended to ``metrics.jsonl``.

    Returns
    -------
    FederatedRun

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (FederatedAveraging, the loop this runs).
    """
    info = store.read_info(store_url)
    partition = _resolve_partition(info, partition)
    client_rows = {str(c): int(m["n_rows"])
                   for c, m in info.partitions[partition]["clients"].items()}
    clients = placement.sort_clients(list(client_rows))
    _check_partition(info, partition, client_rows)
    sampling_ = _check_sampling(len(clients), fraction, clients_per_round, min_clients,
                                deadline, retries)
    _check_positive(rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
                    eval_every=eval_every)
    if resume and out is None:
        raise ValidationError("--resume needs --out RUN_DIR (the run to continue)")
    strategy = strategy or aggregate.fedavg()
    stages = tuple(stages) if stages is not None else aggregate.default_chain()
    spec = ClientSpec(str(store_url), partition, float(test_fraction), int(seed), model,
                      int(local_epochs), int(batch_size), lr, strategy.mu, strategy.scaffold,
                      stages, uuid.uuid4().hex[:12])
    run_dir = rundir.prepare(out, resume=resume) if out is not None else None
    if run_dir is not None:
        rundir.write_config(run_dir, {
            "command": "federate", "store": str(store_url), "model": model.name,
            "partition": partition, "strategy": strategy.name, "mu": strategy.mu,
            "rounds": rounds, "local_epochs": local_epochs, "batch_size": batch_size,
            "lr": lr if not callable(lr) else "schedule", "fraction": fraction,
            "clients_per_round": clients_per_round, "min_clients": min_clients,
            "deadline": deadline, "seed": seed, "test_fraction": test_fraction,
            "eval_every": eval_every, "workers": workers, "scheduler": scheduler,
            "stages": [s.name for s in stages]})
    with _cluster(dask_client, scheduler, workers, client_rows) as (dc, groups):
        placement.set_no_workers_timeout(dc, deadline or DEFAULT_NO_WORKER_TIMEOUT)
        state = _initial_state(model, strategy, stages, seed)
        if resume:
            state = _resume(dc, run_dir, spec, groups, state)
        state, history = _loop(dc, spec, groups, clients, state, sampling_, strategy, rounds,
                               eval_every, batch_clients, run_dir, checkpoint_every, on_record)
        if run_dir is not None:
            _checkpoint(dc, run_dir, spec, groups, state, strategy)
    summary = _summary(history, state, strategy, spec, clients, run_dir)
    if run_dir is not None:
        rundir.write_params(run_dir, model.unpack(state.params))
        rundir.write_summary(run_dir, summary)
    return FederatedRun(state.params, state, history, summary)


def _loop(dc: Client, spec: ClientSpec, groups, clients, state: ServerState,
          sampling_: Sampling, strategy: Strategy, rounds: int, eval_every: int,
          batch_clients: bool, run_dir, checkpoint_every: int,
          on_record) -> tuple[ServerState, list[dict]]:
    history: list[dict] = []
    while state.round < rounds:
        r, start = state.round, time.perf_counter()
        with _span(f"round-{r}"):
            state, record = _train_round(dc, spec, groups, clients, state, sampling_,
                                         strategy.server_optimizer, batch_clients)
            if (r + 1) % eval_every == 0 or r + 1 == rounds:
                evaluation = _evaluate(dc, spec, groups, state.params, r, sampling_.deadline)
                for client, rec in evaluation.pop("eval_clients", {}).items():
                    record["clients"].setdefault(client, {}).update(rec)
                record.update(evaluation)
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if run_dir is not None:
            rundir.append_metrics(run_dir, record)
            if checkpoint_every and state.round % checkpoint_every == 0 and state.round < rounds:
                _checkpoint(dc, run_dir, spec, groups, state, strategy)
        if on_record is not None:
            on_record(record)
    return state, history


@contextlib.contextmanager
def _span(name: str) -> Iterator[None]:
    # distributed.span groups a round's tasks on the dashboard; harmless without one.
    from distributed import span

    with span(name):
        yield


@contextlib.contextmanager
def _cluster(dask_client: Client | None, scheduler: str | None, workers: int | None,
             client_rows: dict[str, int]) -> Iterator[tuple[Client, list[list[str]]]]:
    """The cluster to run on and the client groups that share a worker."""
    if dask_client is not None:
        yield dask_client, placement.discover(dask_client, list(client_rows))
        return
    if scheduler is not None:
        from pipeline.cluster import connect

        with connect(scheduler=scheduler) as dc:
            yield dc, placement.discover(dc, list(client_rows))
        return
    groups = placement.assign_clients(client_rows, min(workers or 2, len(client_rows)))
    with placement.simulation_cluster(groups) as dc:
        yield dc, placement.discover(dc, list(client_rows))


def _initial_state(model: Model, strategy: Strategy, stages: Sequence[Stage],
                   seed: int) -> ServerState:
    params = model.init(seed)
    control = np.zeros_like(params) if strategy.scaffold else None
    return ServerState(params, strategy.server_optimizer.init(params),
                       aggregate.init_states(stages, model.n_params), control, 0, int(seed))


# --------------------------------------------------------------------------------------------
# checkpoint / resume


def _checkpoint(dc: Client, run_dir, spec: ClientSpec, groups, state: ServerState,
                strategy: Strategy) -> None:
    arrays: dict[str, np.ndarray] = {"params": state.params}
    arrays |= {f"opt/{k}": v for k, v in state.opt_state.items()}
    arrays |= {f"stage/{name}/{k}": v for name, st in state.stage_states.items()
               for k, v in st.items()}
    if state.control is not None:
        arrays["control"] = state.control
        for client, st in _fetch_client_state(dc, spec, groups).items():
            arrays |= {f"client/{client}/{k}": v for k, v in st.items()}
    meta = {"round": state.round, "seed": state.seed, "strategy": strategy.name,
            "partition": spec.partition, "n_params": int(state.params.size)}
    rundir.save_checkpoint(run_dir, arrays, meta)


def _fetch_client_state(dc: Client, spec: ClientSpec, groups) -> dict:
    futures = [dc.submit(get_client_state, spec.token, g, key=f"state-{spec.token}-get-g{j}",
                         resources=placement.pin_group(g), pure=False)
               for j, g in enumerate(groups)]
    merged: dict = {}
    for part in dc.gather(futures):
        merged.update(part)
    return merged


def _resume(dc: Client, run_dir, spec: ClientSpec, groups, fresh: ServerState) -> ServerState:
    loaded = rundir.load_checkpoint(run_dir)
    if loaded is None:
        raise ValidationError(f"--resume: no checkpoint.npz in {run_dir}")
    arrays, meta = loaded
    if meta.get("partition") != spec.partition or int(meta["n_params"]) != fresh.params.size:
        raise ValidationError(f"--resume: checkpoint in {run_dir} is for partition "
                              f"{meta.get('partition')!r} with {meta['n_params']} params")
    opt_state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    stage_states = {name: {k.split("/", 2)[2]: v for k, v in arrays.items()
                           if k.startswith(f"stage/{name}/")} for name in fresh.stage_states}
    per_client: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("client/"):
            _, client, name = key.split("/", 2)
            per_client.setdefault(client, {})[name] = value
    futures = [dc.submit(put_client_state, spec.token, {c: per_client[c] for c in g
                                                        if c in per_client},
                         key=f"state-{spec.token}-put-g{j}",
                         resources=placement.pin_group(g), pure=False)
               for j, g in enumerate(groups)]
    dc.gather(futures)
    rundir.trim_metrics(run_dir, lambda rec: rec.get("round", -1) < int(meta["round"]))
    log.info("resuming at round %d from %s", meta["round"], run_dir)
    return ServerState(arrays["params"], opt_state, stage_states, arrays.get("control"),
                       int(meta["round"]), int(meta["seed"]))


# --------------------------------------------------------------------------------------------
# checks and summary


def _resolve_partition(info: store.StoreInfo, partition: str | None) -> str:
    names = sorted(info.partitions)
    if partition is None:
        if len(names) != 1:
            raise ValidationError(
                f"store {info.url} has {len(names)} partitions ({', '.join(names) or 'none'}): "
                "name one, or give --clients K --scheme S to make one")
        return names[0]
    if partition not in info.partitions:
        raise ValidationError(f"store {info.url} has no partition {partition!r} "
                              f"(has {', '.join(names) or 'none'})")
    return partition


def _check_partition(info: store.StoreInfo, partition: str, client_rows: dict[str, int]) -> None:
    if not client_rows:
        raise ValidationError(f"partition {partition!r} of {info.url} has no clients")
    total = sum(client_rows.values())
    if total != info.n_rows:
        raise ValidationError(f"partition {partition!r} has {total} rows but store {info.url} "
                              f"has {info.n_rows}: it was made for another version of the store")


def _check_sampling(n_clients: int, fraction: float | None, count: int | None,
                    min_clients: int, deadline: float | None, retries: int) -> Sampling:
    if fraction is not None and count is not None:
        raise ValidationError("give --fraction or --clients-per-round, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValidationError(f"--fraction must be in (0, 1], got {fraction}")
    if count is not None and count < 1:
        raise ValidationError(f"--clients-per-round must be at least 1, got {count}")
    if deadline is not None and deadline <= 0:
        raise ValidationError(f"--deadline must be > 0 seconds, got {deadline}")
    if retries < 0:
        raise ValidationError(f"retries must be >= 0, got {retries}")
    per_round = sampling.sample_size(n_clients, fraction=fraction, count=count)
    if not 1 <= min_clients <= per_round:
        raise ValidationError(f"--min-clients {min_clients} must be between 1 and the "
                              f"{per_round} clients sampled per round")
    return Sampling(fraction, count, int(min_clients), deadline, int(retries))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValidationError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _summary(history: list[dict], state: ServerState, strategy: Strategy, spec: ClientSpec,
             clients: Sequence[str], run_dir) -> dict:
    seconds = [rec["seconds"] for rec in history]
    last = history[-1] if history else {}
    summary = {"command": "federate", "strategy": strategy.name, "partition": spec.partition,
               "clients": len(clients), "rounds": state.round, "rounds_run": len(history),
               "seconds_per_round": statistics.median(seconds) if seconds else None,
               "dropped": sum(len(rec.get("dropped", {})) for rec in history),
               "rejected": sum(len(rec.get("rejected", {})) for rec in history),
               "n_params": int(state.params.size)}
    summary |= {k: v for k, v in last.items() if k.startswith("test_") or k == "train_loss"}
    if run_dir is not None:
        summary["run_dir"] = str(run_dir)
    return summary
