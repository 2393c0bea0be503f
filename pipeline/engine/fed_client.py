"""Federated training, worker side: the tasks pinned to a client's worker, and their settings.

These functions run inside tasks placed by ``client-<id>`` resources. They read a client's rows
through the worker's :class:`fedpipe.engine.placement.ClientCache` (the rows never leave the worker),
call the pure NumPy client code of :mod:`fedpipe.tasks.local`, :mod:`fedpipe.tasks.reduce` and
:mod:`fedpipe.tasks.aggregate`, and return only model-sized reports. Per-client state (SCAFFOLD's
``c_i``) stays in the same cache.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cloudpickle
import numpy as np
from fedpipe.engine import placement
from fedpipe.tasks import aggregate, aggregators, local, reduce
from fedpipe.tasks.aggregate import Stage
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer
from fedpipe.tasks.privacy import CLIENT_ID, client_tag

# ClientSpec.partition of a run on site-local stores (engine/sites.py): there each worker is
# another party's machine, so nothing of one client's may be sent to another's worker.
SITES = "sites"


class ClientSpec(NamedTuple):
    """Everything a worker needs to train or evaluate its clients (the same every round)."""

    url: str
    partition: str
    version: str  # of the partition's rows (placement.rows_version): keys the worker's cache
    test_fraction: float
    seed: int
    model: Model
    epochs: int
    batch_size: int
    lr: float | Callable[[int], float]
    client_transforms: tuple[Optimizer, ...]  # the strategy's, chained before its client
    stages: tuple[Stage, ...]
    token: str
    client_optimizer: Optimizer | None = None  # None: sgd at lr (the strategy's ``client``)
    # Each worker's clients, placed once per run with the spec (see Members); empty: tasks
    # name their clients themselves.
    groups: tuple[tuple[str, ...], ...] = ()


class Members(NamedTuple):
    """Some clients of group ``group`` of the run's :attr:`ClientSpec.groups`: all of them, or
    those at positions ``picked``. A round's task carries this instead of the client ids,
    which at 1,000 clients were a thousand strings a round that the scheduler kept and the
    driver's memory grew by (issue 12)."""

    group: int
    picked: np.ndarray | None = None


def members(spec: ClientSpec, clients: Sequence[str] | Members) -> Sequence[str]:
    """The client ids a task works on, in group order."""
    if not isinstance(clients, Members):
        return clients
    group = spec.groups[clients.group]
    return group if clients.picked is None else [group[i] for i in clients.picked]


class PackedSpec(NamedTuple):
    """A :class:`ClientSpec` pickled once per run: tasks carry bytes, workers unpickle once."""

    token: str
    blob: bytes


@functools.lru_cache(maxsize=8)
def pack_spec(spec: ClientSpec) -> PackedSpec:
    """Pickle the spec once; pickling the model's closures on every submit costs ~20 ms."""
    return PackedSpec(spec.token, cloudpickle.dumps(spec))


def unpack(spec: ClientSpec | PackedSpec) -> ClientSpec:
    """The run's :class:`ClientSpec`, unpickled once per worker process and cached."""
    if isinstance(spec, ClientSpec):
        return spec
    specs = placement.worker_cache().specs
    if spec.token not in specs:
        specs[spec.token] = cloudpickle.loads(spec.blob)
    return specs[spec.token]


def _train_client(spec: ClientSpec, client: str, params: np.ndarray, round_: int,
                  stage_states: dict, control: np.ndarray | None) -> dict:
    started = time.perf_counter()
    (X, y, _, _), was_read = placement.client_rows(spec.url, spec.partition, client,
                                                   test_fraction=spec.test_fraction,
                                                   seed=spec.seed, run=spec.token,
                                                   version=spec.version)
    cache = placement.worker_cache()
    # lr is None when the strategy's client optimizer carries its own rate
    lr = 0.0 if spec.lr is None else local.round_lr(spec.lr, round_)
    mine = dict(cache.state.get((spec.token, client), {}))
    result = local.local_train(
        spec.model, params, X, y, epochs=spec.epochs, batch_size=spec.batch_size, lr=lr,
        rng=local.client_rng(spec.seed, round_, client), carry=local.carry_of(mine, control),
        optimizer=aggregate.client_optimizer(spec.client_transforms, spec.client_optimizer, lr))
    mine |= result.kept
    # The client's own stage state (top-k's residual) and its tag ride along under LOCAL keys
    # and are taken out again before anything leaves the worker.
    local_in = {k: v for k, v in mine.items() if k.startswith(aggregate.LOCAL)}
    local_in[CLIENT_ID] = np.asarray(client_tag(client), dtype=np.uint64)
    packet, rejected = aggregate.client_side(spec.stages, stage_states,
                                             {**result.packet, **local_in})
    if packet is not None:
        packet, local_out = aggregate.split_local(packet)
        mine |= {k: v for k, v in local_out.items() if k != CLIENT_ID}
    if mine:
        cache.state[(spec.token, client)] = mine
    # Time to finish (rows read, local epochs, client stages) and what leaves the worker (as
    # encoded by a compression stage): the live page and the report show both per client.
    metrics = {**result.metrics, "read": was_read,
               "seconds": time.perf_counter() - started,
               "update_bytes": aggregate.wire_bytes(packet) if packet else 0}
    return aggregate.client_report(client, packet, metrics, rejected)


def train_group(spec: ClientSpec | PackedSpec, clients: Sequence[str] | Members, params: np.ndarray,
                round_: int, stage_states: dict, control: np.ndarray | None) -> dict:
    """Train the given clients of this worker, in order, and merge their reports.

    Equal, bit for bit, to one task per client followed by :func:`fedpipe.tasks.aggregate.add_reports`
    over the same clients in the same order.
    """
    spec = unpack(spec)
    reports = [_train_client(spec, c, params, round_, stage_states, control)
               for c in members(spec, clients)]
    return aggregate.add_reports(*reports)


def eval_group(spec: ClientSpec | PackedSpec, clients: Sequence[str] | Members, params: np.ndarray) -> dict:
    """Test-row sums of the given clients of this worker (their rows never leave it).

    Each client's packet is ``{"sums": reduce.eval_sums(...)}``, the data-parallel engine's
    vector of :data:`fedpipe.tasks.reduce.EVAL_FIELDS`, so clients add up in any order to the round's
    test metrics; its record holds the same metrics of its own rows (none without test rows).
    """
    spec = unpack(spec)
    reports = []
    for client in members(spec, clients):
        (_, _, X, y), _ = placement.client_rows(spec.url, spec.partition, client,
                                                test_fraction=spec.test_fraction,
                                                seed=spec.seed, run=spec.token,
                                                version=spec.version)
        sums = reduce.eval_sums(spec.model, params, (X, y))
        record = reduce.finish_metrics(sums, spec.model.task)
        reports.append(aggregate.client_report(client, {"sums": sums}, record))
    return aggregate.add_reports(*reports)


def round_group(spec: ClientSpec | PackedSpec, evaluated: Sequence[str] | Members,
                trained: Sequence[str] | Members | None, params: np.ndarray, round_: int, stage_states: dict,
                control: np.ndarray | None) -> dict:
    """One round's work of this worker in one task: train on ``params`` and evaluate them.

    ``params`` is the global model of round ``round_``, i.e. the result of round
    ``round_ - 1``, whose test metrics are due: evaluating it here saves the round trip an
    evaluation of its own would cost. Training goes first so that a client whose rows were
    lost (a restarted worker) reports the re-read in its training record, as before.
    Neither job changes what the other reads, so ``"train"`` is :func:`train_group`'s report
    bit for bit (None without ``trained`` clients) and ``"eval"`` :func:`eval_group`'s.
    """
    train = (train_group(spec, trained, params, round_, stage_states, control)
             if trained else None)
    return {"eval": eval_group(spec, evaluated, params), "train": train}


def add_round_parts(*parts: dict) -> dict:
    """:func:`round_group` reports merged part by part, left to right (the tree's add)."""
    return {name: aggregate.add_reports(*present) if present else None
            for name in ("eval", "train")
            for present in [[p[name] for p in parts if p[name] is not None]]}


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


# A coordinate-wise robust rule (median, trimmed mean) by column blocks where the rows are: the
# pieces of a leaf's report, for the tasks of fed_round._column_sum. A leaf is a train_group
# report or a round_group one ({"eval": ..., "train": ...}).


def train_report(report: dict) -> dict | None:
    """The training part of a leaf's (or a merged) report: a round_group report's ``"train"``,
    a train_group report itself."""
    return report["train"] if "train" in report and "clients" not in report else report


def rows_block(report: dict, j: int, blocks: int, n_params: int):
    """Column block ``j`` of the leaf's stacked training rows."""
    train = train_report(report)
    return aggregators.column_block(None if train is None else train["packet"], j, blocks,
                                    n_params)


def without_rows(report: dict) -> dict:
    """The leaf's report with its training rows replaced by their count (what the driver gets)."""
    train = train_report(report)
    if train is None:
        return report
    slim = {**train, "packet": aggregators.without_rows(train["packet"])}
    return {**report, "train": slim} if train is not report else slim
