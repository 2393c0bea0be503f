"""Aggregation of client updates as a flat chain of stages around one sum.

A *packet* is a dict of float64 arrays that add up key by key (``delta``, ``n``, counters a stage
wants summed). A :class:`Stage` has a client part, ``before_sum``, run on the client's worker, and
a server part, ``after_sum``, run on the server after the tree-reduction sum. Each stage carries
its own server-side state (broadcast to its client part every round) and reports its own
measurements. ``before_sum`` parts run in chain order, ``after_sum`` parts in reverse order, so
each stage finishes its own work around the sum (TFF's nested factories, written flat)::

    chain = (validate(), weighted_mean())       # later: clip, compress, mask, noise
    client: validate -> weighted_mean.before    |  sum over clients  |  server: weighted_mean.after

The round loop only calls :func:`client_side`, :func:`add_packets` and :func:`server_side`, so new
stages (clipping, compression, secure masking, noise) need no change to it.

Two reductions, chosen by the stage that needs them (``Stage.reduction``), never by the loop:

* ``"sum"`` (the default): packet entries add up key by key;
* ``"gather"``: a robust rule (median, Krum, ...) needs every update at once, so its client part
  moves the delta under a key starting with :data:`GATHER`, whose entries :func:`add_packets`
  stacks row by row (in the tree's fixed order) instead of adding.

Per-client state that must stay on the client's worker (top-k's error-feedback residual) rides
along the packet under keys starting with :data:`LOCAL`: the worker puts the client's stored
entries in before :func:`client_side` and takes them out again with :func:`split_local`, so they
never reach the sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from . import optimizers
from .optimizers import Optimizer, State

Packet = dict[str, np.ndarray]
StageState = dict[str, np.ndarray]

GATHER = "gather/"  # packet keys stacked by add_packets (reduction="gather"), not added
LOCAL = "local/"  # per-client entries kept on the client's worker, never sent
WIRE_BYTES = "wire_bytes"  # bytes of the delta as encoded by a compression stage


class RejectedUpdate(ValueError):
    """A client stage refused an update; the message says why (logged, the round goes on)."""


class StageSpec(dict):
    """A stage's name and hyperparameters: a dict that hashes by its content, so a chain
    holding it can still key a cache (the run's packed spec is cached per chain)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(repr(sorted(self.items(), key=lambda kv: kv[0])))


class Stage(NamedTuple):
    """One aggregation stage.

    Attributes
    ----------
    name : str
        Unique within a chain; prefixes the stage's measurements and packet counters.
    init : Callable[[int], dict]
        ``init(n_params) -> state``: the stage's server-side state.
    before_sum : Callable[[Packet, dict], Packet]
        Client part: ``before_sum(packet, state) -> packet``; may raise :class:`RejectedUpdate`.
    after_sum : Callable[[Packet, dict], tuple[Packet, dict, dict]]
        Server part: ``after_sum(total, state) -> (packet, new_state, measurements)``.
    reduction : str
        ``"sum"``, or ``"gather"`` for a stage whose server part needs every update (it puts
        them under :data:`GATHER` keys).
    spec : dict, optional
        How the stage was built (``{"kind": "clip", "clip": 1.0}``): what a config, a check
        of the chain or the privacy accountant reads, instead of probing the functions.
    """

    name: str
    init: Callable[[int], StageState]
    before_sum: Callable[[Packet, StageState], Packet]
    after_sum: Callable[[Packet, StageState], tuple[Packet, StageState, dict[str, float]]]
    reduction: str = "sum"
    spec: StageSpec | None = None


def init_states(stages: Sequence[Stage], n_params: int) -> dict[str, StageState]:
    """Initial server-side state of every stage, keyed by stage name."""
    return {stage.name: stage.init(n_params) for stage in stages}


def client_side(stages: Sequence[Stage], states: dict[str, StageState],
                packet: Packet) -> tuple[Packet | None, str | None]:
    """Run every stage's client part in chain order on one client's packet.

    Returns
    -------
    (packet, None) or (None, reason)
        A rejected update is dropped from the sum, with the reason for the round's log.
    """
    try:
        for stage in stages:
            packet = stage.before_sum(packet, states[stage.name])
    except RejectedUpdate as exc:
        return None, f"{stage.name}: {exc}"
    return packet, None


def add_packets(*packets: Packet) -> Packet:
    """Key-wise sum of packets, left to right (the reduction tree's add: same order, same bits)."""
    if not packets:
        raise ValueError("add_packets needs at least one packet")
    keys = packets[0].keys()
    for packet in packets[1:]:
        if keys != packet.keys():
            raise ValueError(f"packets with different keys: {sorted(keys)} vs {sorted(packet)}")
    total = dict(packets[0])
    for key in keys:
        if key.startswith(GATHER):  # one copy into the (K, d) matrix, not one per add: O(K d)
            total[key] = np.concatenate([packet[key] for packet in packets])
            continue
        for packet in packets[1:]:
            total[key] = total[key] + packet[key]
    return total


def split_local(packet: Packet) -> tuple[Packet, StageState]:
    """``(packet without its LOCAL entries, those entries)``: what is sent, what stays."""
    local = {k: v for k, v in packet.items() if k.startswith(LOCAL)}
    return {k: v for k, v in packet.items() if not k.startswith(LOCAL)}, local


def wire_bytes(packet: Packet) -> int:
    """Bytes a client sends: every entry's, the delta counted as encoded when a stage says so."""
    sizes = {k: int(np.asarray(v).nbytes) for k, v in packet.items() if k != WIRE_BYTES}
    if WIRE_BYTES in packet:
        delta_key = next((k for k in sizes if k in ("delta", f"{GATHER}delta")), None)
        if delta_key is not None:
            sizes[delta_key] = int(packet[WIRE_BYTES])
    return sum(sizes.values())


def check_chain(stages: Sequence[Stage]) -> None:
    """Refuse a chain whose stages cannot work together (ValueError naming them)."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    gathers = [s.name for s in stages if s.reduction == "gather"]
    if len(gathers) > 1:
        raise ValueError(f"one gathering aggregator per chain, got {gathers}")
    bad = [s.reduction for s in stages if s.reduction not in ("sum", "gather")]
    if bad:
        raise ValueError(f"unknown reduction(s) {bad}: 'sum' or 'gather'")


def server_side(stages: Sequence[Stage], states: dict[str, StageState],
                total: Packet) -> tuple[Packet, dict[str, StageState], dict[str, float]]:
    """Run every stage's server part in reverse chain order on the summed packet.

    Returns
    -------
    packet, new_states, measurements
        Measurements are keyed ``"<stage>/<name>"``.
    """
    new_states = dict(states)
    measurements: dict[str, float] = {}
    for stage in reversed(stages):
        total, new_states[stage.name], found = stage.after_sum(total, states[stage.name])
        measurements.update({f"{stage.name}/{k}": float(v) for k, v in found.items()})
    return total, new_states, measurements


# --------------------------------------------------------------------------------------------
# stages


def validate(name: str = "validate") -> Stage:
    """Reject updates of the wrong shape or with NaN/inf before they reach the sum.

    Counts accepted updates in the packet (``<name>/accepted``) so the server can report them.
    """

    def init(n_params: int) -> StageState:
        return {"n_params": np.asarray(n_params)}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        delta = np.asarray(packet.get("delta"))
        if delta.shape != (int(state["n_params"]),):
            raise RejectedUpdate(f"update has shape {delta.shape}, "
                                 f"expected ({int(state['n_params'])},)")
        for key, value in packet.items():
            if not np.isfinite(value).all():  # the method skips np.all's dispatch (~4 us a call)
                raise RejectedUpdate(f"update has non-finite values in '{key}'")
        return {**packet, f"{name}/accepted": np.asarray(1.0)}

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        accepted = total.pop(f"{name}/accepted")
        return total, state, {"accepted": float(accepted)}

    return Stage(name, init, before_sum, after_sum, spec=StageSpec(kind="validate"))


def weighted_mean(name: str = "weighted_mean") -> Stage:
    """Weight each client's delta by its row count ``n_i``; divide the sum by ``sum n_i``.

    A SCAFFOLD ``control`` entry is summed unweighted (the server divides it by the number of
    clients, see :func:`scaffold_control`).

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (weights n_k / n).
    """

    def init(n_params: int) -> StageState:
        return {}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        return {**packet, "delta": packet["delta"] * packet["n"]}

    def after_sum(total: Packet, state: StageState):
        weight = float(total["n"])
        if weight <= 0:
            raise ValueError("weighted mean over clients with no rows")
        return {**total, "delta": total["delta"] / weight}, state, {"weight": weight}

    return Stage(name, init, before_sum, after_sum, spec=StageSpec(kind="weighted_mean"))


def default_chain() -> tuple[Stage, ...]:
    """The chain every strategy uses unless told otherwise: validate, then weighted mean."""
    return (validate(), weighted_mean())


# --------------------------------------------------------------------------------------------
# server step


def server_step(optimizer: Optimizer, params: np.ndarray, opt_state: State,
                mean_delta: np.ndarray) -> tuple[np.ndarray, State]:
    """Apply the server optimizer to minus the averaged client delta.

    FedAvg is ``sgd(1.0)`` (params + mean delta); FedAvgM, FedAdam, FedYogi and FedAdagrad are
    ``momentum``, ``adam``, ``yogi`` and ``adagrad`` on the same pseudo-gradient.

    References
    ----------
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).
    """
    updates, new_state = optimizer.update(-mean_delta, opt_state, params)
    return params + updates, new_state


def scaffold_control(control: np.ndarray, control_sum: np.ndarray, n_clients: int) -> np.ndarray:
    """SCAFFOLD server control variate: ``c + (1/N) * sum of sampled clients' changes``.

    References
    ----------
    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ICML 2020 (Algorithm 1, line 17).
    """
    return control + control_sum / float(n_clients)


# --------------------------------------------------------------------------------------------
# strategies: a federated algorithm as plain data (no methods, no per-round state)


class Strategy(NamedTuple):
    """A federated algorithm as data: what clients run, how updates meet, what the server does.

    A round: every sampled client runs ``client`` for ``local_epochs`` from the global params
    (its optimizer state starts fresh each round), the packets go through ``stages`` around one
    fixed-order sum, and ``server`` steps on minus the averaged delta (:func:`server_step`).
    Data-parallel gradient descent is the special case ``client=sgd(1.0)``, one full-batch
    step, ``weighted_mean``, ``server=`` the data-parallel optimizer.

    Attributes
    ----------
    name : str
    server : Optimizer
        Applied to minus the averaged delta by :func:`server_step`.
    client : Optimizer, optional
        The clients' local optimizer; None: ``sgd`` at :func:`fedpipe.engine.federate.federate`'s
        ``lr`` (a float, or a schedule over rounds).
    local_epochs : int, optional
        Local epochs per round; None: ``federate``'s ``local_epochs``.
    stages : tuple of Stage, optional
        The aggregation chain; None: ``federate``'s ``stages`` or :func:`default_chain`.
    client_transforms : tuple of Optimizer
        Chained before the client's optimizer (:func:`client_optimizer`): FedProx's
        :func:`~fedpipe.tasks.optimizers.add_proximal`, SCAFFOLD's
        :func:`~fedpipe.tasks.optimizers.control_variates`. What they keep between rounds stays
        on the client's worker.
    """

    name: str
    server: Optimizer
    client: Optimizer | None = None
    local_epochs: int | None = None
    stages: tuple[Stage, ...] | None = None
    client_transforms: tuple[Optimizer, ...] = ()


def client_optimizer(transforms: Sequence[Optimizer], client: Optimizer | None,
                     lr: float) -> Optimizer | None:
    """A client's optimizer for a round: ``transforms`` then ``client`` (``sgd(lr)`` if None).

    None when there is nothing but the default sgd, which :func:`fedpipe.tasks.local.local_train`
    runs inline (same bits, less time).
    """
    if not transforms:
        return client
    return optimizers.chain(*transforms, client if client is not None else optimizers.sgd(lr))


def server_control(transforms: Sequence[Optimizer]) -> bool:
    """Whether the clients' transforms read a control variate the server keeps (SCAFFOLD)."""
    return any(f"{optimizers.SERVER}control" in t.init(np.zeros(1)) for t in transforms)


def fedavg(server_lr: float = 1.0) -> Strategy:
    """FedAvg: ``sgd(server_lr)`` on minus the weighted mean delta (1.0 = plain averaging).

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017.
    """
    return Strategy("fedavg", optimizers.sgd(server_lr))


def fedprox(mu: float = 0.01, server_lr: float = 1.0) -> Strategy:
    """FedProx: FedAvg's server, clients add the proximal term ``mu/2 ||w - w_global||^2``.

    References
    ----------
    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    """
    return Strategy("fedprox", optimizers.sgd(server_lr),
                    client_transforms=(optimizers.add_proximal(mu),))


def fedavgm(server_lr: float = 1.0, beta: float = 0.9) -> Strategy:
    """FedAvgM: server momentum on the averaged delta.

    References
    ----------
    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution", 2019;
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    return Strategy("fedavgm", optimizers.momentum(server_lr, beta))


def fedadam(server_lr: float = 0.01, eps: float = 1e-3) -> Strategy:
    """FedAdam: Adam on the server (``eps`` = the paper's adaptivity tau).

    References
    ----------
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    return Strategy("fedadam", optimizers.adam(server_lr, eps=eps))


def fedyogi(server_lr: float = 0.01, eps: float = 1e-3) -> Strategy:
    """FedYogi: Yogi on the server.

    References
    ----------
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    return Strategy("fedyogi", optimizers.yogi(server_lr, eps=eps))


def fedadagrad(server_lr: float = 0.01, eps: float = 1e-3) -> Strategy:
    """FedAdagrad: AdaGrad on the server.

    References
    ----------
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    return Strategy("fedadagrad", optimizers.adagrad(server_lr, eps=eps))


def scaffold(server_lr: float = 1.0) -> Strategy:
    """SCAFFOLD: control variates correct client drift; server step ``x += lr_g * mean delta``.

    References
    ----------
    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ICML 2020.
    """
    return Strategy("scaffold", optimizers.sgd(server_lr),
                    client_transforms=(optimizers.control_variates(),))


# --------------------------------------------------------------------------------------------
# round reports: what a worker sends back (one packet plus small per-client records)


def client_report(client: str, packet: Packet | None, metrics: dict[str, float],
                  rejected: str | None = None) -> dict:
    """One client's contribution to a round: its packet (None if rejected) and its metrics."""
    record = dict(metrics)
    if rejected:
        record["rejected"] = rejected
    return {"packet": packet, "clients": {str(client): record}}


def add_reports(*reports: dict) -> dict:
    """Merge round reports left to right: packets summed (rejected ones skipped), records joined.

    The reduction tree's add for federated rounds; the same order gives the same bits.
    """
    packets = [r["packet"] for r in reports if r["packet"] is not None]
    clients: dict[str, dict] = {}
    for report in reports:
        clients.update(report["clients"])
    return {"packet": add_packets(*packets) if packets else None, "clients": clients}


def weighted_average(records: dict[str, dict], key: str, weight: str = "n") -> float | None:
    """``sum(w_i * x_i) / sum(w_i)`` of a per-client metric (None when no client has it)."""
    pairs = [(r[key], r[weight]) for r in records.values() if key in r and r.get(weight)]
    total = sum(w for _, w in pairs)
    return sum(x * w for x, w in pairs) / total if total else None


def __getattr__(name: str):
    # fp.stages.secure_sum lives in .secure, loaded on first use: the chain's other stages (and
    # the workers unpickling them) need no cryptography package.
    if name == "secure_sum":
        from .secure import secure_sum

        return secure_sum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
