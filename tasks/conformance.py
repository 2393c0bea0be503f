"""Conformance suites for the federated extension points: aggregation stages and strategies.

scikit-learn's ``estimator_checks`` style, beside :func:`fedpipe.tasks.checks.check_model` and
:func:`~fedpipe.tasks.checks.check_optimizer`: :func:`stage_checks` and :func:`strategy_checks`
yield ``(name, check)`` pairs, each check a function of no arguments that raises
``AssertionError``; :func:`check_stage` and :func:`check_strategy` run them all and name the
one that broke::

    check_stage(my_stage)          # AssertionError: check_stage 'server_part' of stage 'x': ...
    check_strategy(my_strategy)

A stage is run the way the round loop runs it, in one process: each client's worker puts its
kept entries (``LOCAL`` keys, its client tag) into the packet, runs the client part and takes
them out again; the packets are added in a fixed order (or stacked, for ``"gather"``); the
server part runs on the total. A strategy is run for a few rounds on a small least-squares
problem by :func:`simulate`, the serial reference of what the federated loop computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import models, optimizers
from .aggregate import (
    GATHER,
    LOCAL,
    Packet,
    RejectedUpdate,
    Stage,
    StageState,
    Strategy,
    add_packets,
    check_chain,
    client_optimizer,
    client_side,
    default_chain,
    init_states,
    scaffold_control,
    server_control,
    server_side,
    server_step,
    split_local,
)
from .checks import (
    _check_resume,
    _check_spec,
    _check_state,
    _fail,
    _quadratic,
    _roundtrip,
    check_optimizer,
)
from .local import carry_of, client_rng, local_train
from .optimizers import Optimizer
from .privacy import CLIENT_ID, client_tag

Check = tuple[str, Callable[[], None]]
Reduce = Callable[[list[Packet]], Packet]


def _run_checks(suite: str, what: str, checks: Iterator[Check]) -> None:
    for name, check in checks:
        try:
            check()
        except AssertionError as exc:
            raise AssertionError(f"{suite} {name!r} of {what}: {exc}") from None
        except Exception as exc:  # a crash inside the extension is a broken contract too
            raise AssertionError(f"{suite} {name!r} of {what}: raised "
                                 f"{type(exc).__name__}: {exc}") from exc


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                           for k, v in value.items())


def _is_packet(value: Any) -> bool:
    # Sums of 0-d arrays are NumPy scalars: a packet's entries are arrays or those.
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, (np.ndarray, np.generic)) for k, v in value.items())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(a[k], b[k])
        for k in a)


def _copy(d: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# stages


def update_packets(n_params: int = 6, clients: int = 5, seed: int = 0) -> list[Packet]:
    """Model-update packets as clients send them: ``delta`` (norms around 1) and rows ``n``."""
    rng = np.random.default_rng(seed)
    return [{"delta": rng.normal(size=n_params) / np.sqrt(n_params) * rng.uniform(0.5, 2.0),
             "n": np.asarray(float(rng.integers(5, 50)))} for _ in range(clients)]


def _client_part(stage: Stage, state: StageState, packet: Packet, kept: dict,
                 client: int) -> tuple[Packet, dict]:
    """What one client's worker does: its kept entries in, the client part, kept entries out."""
    tag = {CLIENT_ID: np.asarray(client_tag(str(client)), dtype=np.uint64)}
    try:
        out = stage.before_sum({**packet, **kept, **tag}, state)
    except RejectedUpdate as exc:
        _fail(f"the client part rejected an ordinary update: {exc}")
    if not _is_packet(out):
        _fail(f"before_sum must return a dict of str -> ndarray, got {type(out).__name__}")
    sent, local = split_local(out)
    return sent, {k: v for k, v in local.items() if k != CLIENT_ID}


def _round(stage: Stage, state: StageState, packets: Sequence[Packet], kept: list[dict],
           reduce: Reduce) -> tuple[list[Packet], Packet, tuple]:
    """One round of one stage: ``(sent packets, their total, after_sum's result)``; ``kept``
    (each client's entries that stay on its worker) is updated in place, as a worker's is."""
    sent = []
    for c, packet in enumerate(packets):
        out, kept[c] = _client_part(stage, state, packet, kept[c], c)
        sent.append(out)
    total = reduce(sent)
    result = stage.after_sum(dict(total), state)
    if not (isinstance(result, tuple) and len(result) == 3):
        _fail("after_sum must return (packet, new_state, measurements)")
    return sent, total, result


def stage_checks(stage: Stage, *, n_params: int = 6, packets: Sequence[Packet] | None = None,
                 reduce: Reduce | None = None) -> Iterator[Check]:
    """The named checks of :func:`check_stage`, one ``(name, check)`` pair at a time.

    Parameters
    ----------
    stage : Stage
    n_params : int
        Length of the parameter vector (``init``'s argument; the deltas' length).
    packets : list of dict, optional
        The clients' packets as they reach this stage; default :func:`update_packets`.
    reduce : callable, optional
        ``reduce(sent_packets) -> total``: what happens between the client and the server
        parts; default :func:`~fedpipe.tasks.aggregate.add_packets` in client order (a secure
        aggregation stage needs the masking protocol here).
    """
    packets = list(packets) if packets is not None else update_packets(n_params)
    reduce = reduce or (lambda sent: add_packets(*sent))

    def fresh() -> tuple[StageState, list[dict]]:
        return stage.init(n_params), [{} for _ in packets]

    def spec() -> None:
        if stage.spec is None:
            return  # a stage may not say how it was built: its runs then cannot be repeated
        if not isinstance(stage.spec, dict) or "kind" not in stage.spec:
            _fail(f"spec must be a dict with a 'kind', got {stage.spec!r}")
        if json.loads(json.dumps(stage.spec)) != stage.spec:
            _fail(f"spec {stage.spec!r} is not plain JSON (tuples, non-string keys?)")

    def reduction() -> None:
        if not (isinstance(stage.name, str) and stage.name):
            _fail("a stage needs a non-empty name (it prefixes its measurements)")
        if stage.reduction not in ("sum", "gather"):
            _fail(f"reduction must be 'sum' or 'gather', got {stage.reduction!r}")

    def state_in() -> None:
        state = stage.init(n_params)
        if not _is_state(state):
            _fail(f"init({n_params}) must return a dict of str -> ndarray (it is checkpointed)")
        if not _same(_roundtrip(state), state):
            _fail("the initial state does not survive np.savez / np.load unchanged")

    def client_part() -> None:
        state, kept = fresh()
        before = (_copy(state), [_copy(p) for p in packets])
        sent = [_client_part(stage, state, p, kept[c], c)[0] for c, p in enumerate(packets)]
        if not (_same(state, before[0]) and all(map(_same, packets, before[1]))):
            _fail("before_sum mutated the packet or the state it was given")
        if any(s.keys() != sent[0].keys() for s in sent):
            _fail("clients' packets leave with different keys: the sum cannot add them")
        fresh_rows = [k for k in sent[0] if k.startswith(GATHER)
                      and not any(k in p for p in packets)]
        if stage.reduction == "sum" and fresh_rows:
            _fail(f"a 'sum' stage adds gathered entries {fresh_rows}: declare 'gather'")
        if stage.reduction == "gather":
            rows = [k for k in sent[0] if k.startswith(GATHER)]
            if not rows or any(np.ndim(s[k]) < 1 or np.shape(s[k])[0] != 1
                               for s in sent for k in rows):
                _fail(f"a 'gather' stage must send its update as one row under a '{GATHER}' key")

    def server_part() -> None:
        state, kept = fresh()
        _, total, (out, _, _) = _round(stage, state, packets, kept, reduce)
        if not _is_packet(out):
            _fail("after_sum's packet must be a dict of str -> ndarray")
        plain = {k.removeprefix(GATHER) for k in packets[0]}
        if set(out) != plain:
            _fail(f"the server part must hand back the clients' entries {sorted(plain)} and "
                  f"take away what its client part added: it gives {sorted(out)}")
        if "delta" in out and not (np.shape(out["delta"]) == (n_params,)
                                   and np.isfinite(out["delta"]).all()):
            _fail(f"the aggregate delta must be finite with shape ({n_params},), got "
                  f"{np.shape(out['delta'])}")

    def measurements() -> None:
        state, kept = fresh()
        found = _round(stage, state, packets, kept, reduce)[2][2]
        if not isinstance(found, dict):
            _fail(f"measurements must be a dict of name -> number, got {type(found).__name__}")
        for key, value in found.items():
            if not (isinstance(key, str) and key) or not np.isfinite(float(value)):
                _fail(f"measurement {key!r} = {value!r} is not a named finite number")

    def state_out() -> None:
        state, kept = fresh()
        before = _copy(state)
        new = _round(stage, state, packets, kept, reduce)[2][1]
        if not _same(state, before):
            _fail("after_sum mutated the state it was given (return a new one)")
        if not _is_state(new) or new.keys() != state.keys():
            _fail(f"the state out has keys {sorted(new) if _is_state(new) else new!r}, "
                  f"the state in {sorted(state)}: a checkpoint must load into either")
        for k in state:
            if np.shape(new[k]) != np.shape(state[k]) or new[k].dtype != state[k].dtype:
                _fail(f"state[{k!r}] changes from {state[k].dtype}{np.shape(state[k])} to "
                      f"{new[k].dtype}{np.shape(new[k])} in a round")
        _round(stage, new, packets, kept, reduce)  # the state out runs the next round

    def determinism() -> None:
        start = stage.init(n_params)  # once: a key drawn from OS entropy is part of the state

        def rounds(resume: bool) -> tuple:
            state, kept = _copy(start), [{} for _ in packets]
            got = []
            for _ in range(2):
                _, _, (out, state, found) = _round(stage, state, packets, kept, reduce)
                got.append((out, found))
                state = _roundtrip(state) if resume else state
            return got, state

        (first, s1), (again, s2) = rounds(False), rounds(True)
        for r, ((o1, m1), (o2, m2)) in enumerate(zip(first, again, strict=True)):
            if not _same(o1, o2) or m1 != m2:
                _fail(f"round {r} from the same state (reloaded from np.savez) and packets "
                      "gives other bits: randomness must come from the state or the seeds")
        if not _same(s1, s2):
            _fail("the same rounds leave a different state")

    yield from [("spec", spec), ("reduction", reduction), ("state_in", state_in),
                ("client_part", client_part), ("server_part", server_part),
                ("measurements", measurements), ("state_out", state_out),
                ("determinism", determinism)]


def check_stage(stage: Stage, **options: Any) -> None:
    """Check that ``stage`` honours the :class:`~fedpipe.tasks.aggregate.Stage` contract.

    Named checks (see :func:`stage_checks` for ``options``): ``spec`` (None or plain JSON with
    a ``kind``), ``reduction`` (``"sum"`` or ``"gather"``; a gathering stage sends one row),
    ``state_in`` (``init`` gives a dict of arrays that survives ``np.savez``),
    ``client_part`` (``before_sum`` mutates nothing, never rejects an ordinary update, and every
    client's packet leaves with the same keys), ``server_part`` (``after_sum`` on the sum hands
    back the clients' entries and removes its own; a finite ``delta`` of the right length),
    ``measurements`` (named finite numbers), ``state_out`` (a new state of the same keys,
    shapes and dtypes that runs the next round) and ``determinism`` (the same state and packets
    give the same bits, also through a checkpoint).

    Raises
    ------
    AssertionError
        ``check_stage '<check>' of stage '<name>': <what broke>``.
    """
    _run_checks("check_stage", f"stage {stage.name!r}", stage_checks(stage, **options))


# --------------------------------------------------------------------------------------------
# strategies


def regression_clients(clients: int = 4, n_features: int = 3,
                       seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Small least-squares clients of different sizes and shifted features (non-IID)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n_features)
    out = []
    for c in range(clients):
        X = rng.normal(loc=0.3 * c, size=(int(rng.integers(12, 30)), n_features))
        out.append((X, X @ w + 0.5 + 0.1 * rng.normal(size=len(X))))
    return out


def simulate(strategy: Strategy, model: models.Model, data: Sequence[tuple[np.ndarray,
             np.ndarray]], *, rounds: int, seed: int = 0, lr: float = 0.05,
             batch_size: int = 8) -> np.ndarray:
    """The parameters after ``rounds`` of ``strategy`` with every client in every round.

    The serial reference of the federated loop: each client trains from the global params
    (its stream from ``(seed, round, client)``), the chain's client parts run with each
    client's kept entries, packets are added in client order, the server parts and the server
    optimizer run; what the client transforms keep (SCAFFOLD's ``c_i``) is kept per client. ``lr`` is the default sgd
    client's rate (a strategy whose ``client`` is set carries its own).
    """
    stages = strategy.stages if strategy.stages is not None else default_chain()
    params = model.init(seed)
    opt_state, states = strategy.server.init(params), init_states(stages, model.n_params)
    control = (np.zeros(model.n_params) if server_control(strategy.client_transforms)
               else None)
    client = client_optimizer(strategy.client_transforms, strategy.client, lr)
    kept: list[dict] = [{} for _ in data]
    for r in range(rounds):
        sent = []
        for c, (X, y) in enumerate(data):
            result = local_train(model, params, X, y, epochs=strategy.local_epochs or 1,
                                 batch_size=batch_size, lr=lr, rng=client_rng(seed, r, str(c)),
                                 optimizer=client, carry=carry_of(kept[c], control))
            kept[c].update(result.kept)
            mine = {k: v for k, v in kept[c].items() if k.startswith(LOCAL)}
            tag = {CLIENT_ID: np.asarray(client_tag(str(c)), dtype=np.uint64)}
            packet, rejected = client_side(stages, states, {**result.packet, **mine, **tag})
            if packet is None:
                _fail(f"round {r}: client {c}'s update was rejected: {rejected}")
            packet, local = split_local(packet)
            kept[c].update({k: v for k, v in local.items() if k != CLIENT_ID})
            sent.append(packet)
        total, states, _ = server_side(stages, states, add_packets(*sent))
        params, opt_state = server_step(strategy.server, params, opt_state, total["delta"])
        if control is not None:
            control = scaffold_control(control, total["control"], len(data))
    return params


def _rebuild(optimizer: Optimizer) -> Callable[[Any], Optimizer] | None:
    """``make_opt(lr)`` for check_optimizer from a named optimizer's spec, or None."""
    spec = optimizers.describe(optimizer)
    if not spec or spec.get("kind") not in optimizers.OPTIMIZERS or "lr" not in spec:
        return None
    args = {k: v for k, v in spec.items() if k not in ("kind", "lr")}
    return lambda lr: optimizers.OPTIMIZERS[spec["kind"]](lr, **args)


def _check_an_optimizer(optimizer: Any, role: str) -> None:
    if not isinstance(optimizer, Optimizer):
        _fail(f"the {role} optimizer must be an Optimizer, got {type(optimizer).__name__}")
    make = _rebuild(optimizer)
    if make is not None and optimizers.describe(make(0.1)) is not None:
        check_optimizer(make)
        if optimizers.describe(make(optimizers.describe(optimizer)["lr"])) != optimizer.spec:
            _fail(f"the {role} optimizer's spec {optimizer.spec!r} does not rebuild it")
        return
    # One the suite cannot rebuild at other rates: the checks that need no rate change.
    _, grad = _quadratic(5, np.random.default_rng(0))
    p0 = np.linspace(-1.0, 1.0, 5)
    _check_state(f"{role} optimizer after init", optimizer.init(p0), 0)
    _check_resume(lambda lr: optimizer, grad, p0)
    _check_spec(lambda lr: optimizer, grad, p0)


def strategy_checks(strategy: Strategy, *, model: models.Model | None = None,
                    data: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                    rounds: int = 3, lr: float = 0.05) -> Iterator[Check]:
    """The named checks of :func:`check_strategy`, one ``(name, check)`` pair at a time.

    ``model`` and ``data`` (one ``(X, y)`` per client) default to a linear model on
    :func:`regression_clients`; ``lr`` is the default sgd client's rate.
    """
    data = list(data) if data is not None else regression_clients()
    model = model or models.linear(data[0][0].shape[1])

    def plain_data() -> None:
        if not isinstance(strategy, Strategy):
            _fail(f"a strategy is a Strategy value, got {type(strategy).__name__}")
        if not (isinstance(strategy.name, str) and strategy.name):
            _fail("a strategy needs a non-empty name")
        if Strategy(**strategy._asdict()) != strategy:
            _fail("a strategy must be rebuilt from its fields alone")
        if not (isinstance(strategy.client_transforms, tuple)
                and all(isinstance(t, Optimizer) for t in strategy.client_transforms)):
            _fail("client_transforms must be a tuple of Optimizer transforms")

    def server_optimizer() -> None:
        _check_an_optimizer(strategy.server, "server")

    def client_optimizer() -> None:
        if strategy.client is not None:
            _check_an_optimizer(strategy.client, "client")

    def local_epochs() -> None:
        epochs = strategy.local_epochs
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                                   or epochs < 1):
            _fail(f"local_epochs must be None or an int >= 1, got {epochs!r}")

    def stages() -> None:
        if strategy.stages is None:
            return
        if not (isinstance(strategy.stages, tuple)
                and all(isinstance(s, Stage) for s in strategy.stages)):
            _fail("stages must be None or a tuple of Stage")
        try:
            check_chain(strategy.stages)
        except ValueError as exc:
            _fail(str(exc))
        for stage in strategy.stages:
            check_stage(stage, n_params=model.n_params)

    def rebuildable() -> None:
        specs = {"server": optimizers.describe(strategy.server),
                 "client": None if strategy.client is None else optimizers.describe(
                     strategy.client)}
        if specs["server"] is None or (strategy.client is not None and specs["client"] is None):
            return  # an optimizer of your own cannot say how it was built: not repeatable
        rebuilt = strategy._replace(
            server=optimizers.from_spec(json.loads(json.dumps(specs["server"]))),
            client=None if strategy.client is None else optimizers.from_spec(
                json.loads(json.dumps(specs["client"]))))
        ours = simulate(strategy, model, data, rounds=rounds, lr=lr)
        if not np.array_equal(ours, simulate(rebuilt, model, data, rounds=rounds, lr=lr)):
            _fail("the strategy rebuilt from its optimizers' specs computes other parameters")

    def determinism() -> None:
        first = simulate(strategy, model, data, rounds=rounds, lr=lr)
        if not np.array_equal(first, simulate(strategy, model, data, rounds=rounds, lr=lr)):
            _fail("two runs from the same seed differ: state hidden in the strategy?")
        if not np.isfinite(first).all():
            _fail(f"{rounds} rounds give non-finite parameters")

    def decreases_loss() -> None:
        def objective(p):
            loss = sum(model.loss_and_grad(p, X, y)[0] for X, y in data)
            return loss / sum(len(y) for _, y in data) + model.penalty(p)[0]

        start, end = model.init(0), simulate(strategy, model, data, rounds=rounds, lr=lr)
        if not objective(end) < objective(start):
            _fail(f"{rounds} rounds on a least-squares problem did not decrease the loss "
                  f"({objective(start):.6g} -> {objective(end):.6g})")

    yield from [("plain_data", plain_data), ("server_optimizer", server_optimizer),
                ("client_optimizer", client_optimizer), ("local_epochs", local_epochs),
                ("stages", stages), ("rebuildable", rebuildable), ("determinism", determinism),
                ("decreases_loss", decreases_loss)]


def check_strategy(strategy: Strategy, **options: Any) -> None:
    """Check that ``strategy`` is a federated algorithm as plain data that runs.

    Named checks (see :func:`strategy_checks` for ``options``): ``plain_data`` (a
    :class:`~fedpipe.tasks.aggregate.Strategy` rebuilt from its fields; its
    ``client_transforms`` a tuple of Optimizer transforms), ``server_optimizer`` and ``client_optimizer`` (pass
    :func:`~fedpipe.tasks.checks.check_optimizer`, rebuilt at other rates from their spec when
    they have one), ``local_epochs`` (None or an int >= 1), ``stages`` (a valid chain whose
    every stage passes :func:`check_stage`), ``rebuildable`` (the strategy rebuilt from its
    optimizers' JSON specs computes the same bits), ``determinism`` (two runs from one seed
    agree: no state hidden in the strategy) and ``decreases_loss`` (a few rounds of
    :func:`simulate` lower a least-squares loss).

    Raises
    ------
    AssertionError
        ``check_strategy '<check>' of strategy '<name>': <what broke>``.
    """
    name = getattr(strategy, "name", strategy)
    _run_checks("check_strategy", f"strategy {name!r}", strategy_checks(strategy, **options))
