"""First-order optimizers as pure ``init``/``update`` pairs (optax style).

``update(grads, state, params) -> (updates, new_state)``; the new parameters are
``apply_updates(params, updates) = params + updates``. State is a ``dict`` of NumPy arrays (a
0-d int64 ``"step"`` included), so it saves with ``np.savez`` and a reloaded state continues
identically. ``update`` never mutates its arguments. ``lr`` is a float or a
:data:`fedpipe.tasks.schedules.Schedule` evaluated at ``state["step"]`` (0 for the first update).

Each optimizer is a :func:`chain` of small transforms (``adam(lr)`` is
``chain(scale_by_adam(), scale_by_learning_rate(lr))``), and every factory keeps its name and
arguments in ``Optimizer.spec``, a plain JSON-able dict: :func:`describe` gives it and
:func:`from_spec` builds the optimizer again, so writing a run's configuration is printing it.

Every update is ``-lr(step) * direction`` where the direction does not depend on the rate; the
conformance check :func:`fedpipe.tasks.checks.check_optimizer` relies on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import schedules
from .schedules import Schedule, as_schedule

State = dict[str, np.ndarray]


class Optimizer(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``update(grads, state, params) -> (updates, new_state)``."""

    init: Callable[[np.ndarray], State]
    update: Callable[[np.ndarray, State, np.ndarray], tuple[np.ndarray, State]]
    spec: dict[str, Any] | None = None  # how it was built; None: it cannot say (see describe)

    def __hash__(self) -> int:
        # The functions identify an optimizer; ``spec`` is a dict (unhashable) that follows.
        return hash(tuple(self)[:-1])


def apply_updates(params: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """``params + updates`` as a new float64 array."""
    return np.asarray(params, dtype=np.float64) + updates


def _step(state: State) -> np.ndarray:
    return np.asarray(int(state["step"]) + 1, dtype=np.int64)


def _zeros_state(*names: str, fill: float = 0.0) -> Callable[[np.ndarray], State]:
    def init(params: np.ndarray) -> State:
        state = {name: np.full(np.shape(params), fill, dtype=np.float64) for name in names}
        state["step"] = np.asarray(0, dtype=np.int64)
        return state

    return init


def _check_beta(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_eps(eps: float) -> None:
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _rate_spec(lr: float | Schedule) -> float | dict[str, Any] | None:
    return schedules.describe(lr)


def _named(kind: str, transforms: list[Optimizer], **args: Any) -> Optimizer:
    """``chain(*transforms)`` that remembers it was built as ``kind(**args)``."""
    specs = [_rate_spec(v) if k == "lr" else v for k, v in args.items()]
    known = all(v is not None for v in specs)
    return chain(*transforms)._replace(
        spec={"kind": kind, **dict(zip(args, specs, strict=True))} if known else None)


# ---------------------------------------------------------------------------------------------
# transforms: each is an Optimizer on its own; chain() runs them in order on one flat state


def chain(*transforms: Optimizer) -> Optimizer:
    """The transforms applied one after another, in the order given (optax's ``chain``).

    Their states share one flat dict (so a checkpoint stays ``opt/<key>`` arrays) and one
    ``"step"``; two transforms with the same state key are refused at ``init``.
    """
    def init(params: np.ndarray) -> State:
        state: State = {"step": np.asarray(0, dtype=np.int64)}
        for t in transforms:
            part = {k: v for k, v in t.init(params).items() if k != "step"}
            if clash := part.keys() & state.keys():
                raise ValueError(f"chain: two transforms keep state under {sorted(clash)}")
            state.update(part)
        return state

    def update(grads, state, params=None):
        new: State = {}
        for t in transforms:
            grads, part = t.update(grads, state, params)
            new.update(part)
        new["step"] = _step(state)
        return np.asarray(grads, dtype=np.float64), new

    specs = [t.spec for t in transforms]
    known = all(s is not None for s in specs)
    return Optimizer(init, update, {"kind": "chain", "transforms": specs} if known else None)


def _stateless(kind: str, fn: Callable[[np.ndarray, State, Any], np.ndarray],
               **args: Any) -> Optimizer:
    def update(grads, state, params=None):
        return fn(np.asarray(grads, dtype=np.float64), state, params), {"step": _step(state)}

    known = all(v is not None for v in args.values())  # a schedule function has no spec
    return Optimizer(_zeros_state(), update, {"kind": kind, **args} if known else None)


def scale(factor: float) -> Optimizer:
    """``updates = factor * g`` (``scale(-lr)`` turns a direction into a descent step)."""
    factor = float(factor)
    return _stateless("scale", lambda g, state, p: factor * g, factor=factor)


def scale_by_schedule(schedule: Schedule) -> Optimizer:
    """``updates = schedule(step) * g``."""
    spec = _rate_spec(schedule)

    def fn(g, state, params):
        return schedule(int(state["step"])) * g

    return _stateless("scale_by_schedule", fn, schedule=spec)


def scale_by_learning_rate(lr: float | Schedule) -> Optimizer:
    """``updates = -lr(step) * g``: the one place the six optimizers apply their rate."""
    schedule, spec = as_schedule(lr), _rate_spec(lr)

    def fn(g, state, params):
        return -schedule(int(state["step"])) * g

    return _stateless("scale_by_learning_rate", fn, lr=spec)


def add_decayed_weights(weight_decay: float) -> Optimizer:
    """``updates = g + weight_decay * params`` (decoupled weight decay; needs ``params``)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    weight_decay = float(weight_decay)

    def fn(g, state, params):
        if params is None:
            raise ValueError("add_decayed_weights (adam's weight_decay) needs params in update()")
        return g + weight_decay * np.asarray(params, dtype=np.float64)

    return _stateless("add_decayed_weights", fn, weight_decay=weight_decay)


def clip_by_global_norm(max_norm: float) -> Optimizer:
    """Scale ``g`` down so that its Euclidean norm is at most ``max_norm``.

    References
    ----------
    Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent neural
    networks", ICML.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    max_norm = float(max_norm)

    def fn(g, state, params):
        norm = float(np.sqrt(g @ g))
        return g * (max_norm / norm) if norm > max_norm else g

    return _stateless("clip_by_global_norm", fn, max_norm=max_norm)


def trace(beta: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Momentum direction: ``v = beta * v + g``; ``v`` (or ``g + beta * v`` with Nesterov)."""
    _check_beta("beta", beta)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        velocity = beta * state["velocity"] + g
        direction = g + beta * velocity if nesterov else velocity
        return direction, {"velocity": velocity, "step": _step(state)}

    return Optimizer(_zeros_state("velocity"), update,
                     {"kind": "trace", "beta": float(beta), "nesterov": bool(nesterov)})


def scale_by_rss(eps: float = 1e-8, initial_accumulator: float = 0.0) -> Optimizer:
    """AdaGrad's direction: ``G += g**2``, ``g / (sqrt(G) + eps)``."""
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        acc = state["sum_sq"] + g * g
        return g / (np.sqrt(acc) + eps), {"sum_sq": acc, "step": _step(state)}

    return Optimizer(_zeros_state("sum_sq", fill=initial_accumulator), update,
                     {"kind": "scale_by_rss", "eps": float(eps),
                      "initial_accumulator": float(initial_accumulator)})


def scale_by_rms(decay: float = 0.9, eps: float = 1e-8) -> Optimizer:
    """RMSprop's direction: ``v = decay * v + (1 - decay) * g**2``, ``g / (sqrt(v) + eps)``."""
    _check_beta("decay", decay)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        nu = decay * state["nu"] + (1.0 - decay) * g * g
        return g / (np.sqrt(nu) + eps), {"nu": nu, "step": _step(state)}

    return Optimizer(_zeros_state("nu"), update,
                     {"kind": "scale_by_rms", "decay": float(decay), "eps": float(eps)})


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam's bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``."""
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        t = int(state["step"]) + 1
        mu = b1 * state["mu"] + (1.0 - b1) * g
        nu = b2 * state["nu"] + (1.0 - b2) * g * g
        direction = (mu / (1.0 - b1**t)) / (np.sqrt(nu / (1.0 - b2**t)) + eps)
        return direction, {"mu": mu, "nu": nu, "step": _step(state)}

    return Optimizer(_zeros_state("mu", "nu"), update,
                     {"kind": "scale_by_adam", "b1": float(b1), "b2": float(b2),
                      "eps": float(eps)})


def scale_by_yogi(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3,
                  initial_accumulator: float = 1e-6) -> Optimizer:
    """Yogi's direction ``m / (sqrt(v) + eps)``, ``v -= (1 - b2) * sign(v - g**2) * g**2``."""
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        g2 = g * g
        mu = b1 * state["mu"] + (1.0 - b1) * g
        nu = state["nu"] - (1.0 - b2) * np.sign(state["nu"] - g2) * g2
        return mu / (np.sqrt(nu) + eps), {"mu": mu, "nu": nu, "step": _step(state)}

    init_mu_nu = _zeros_state("mu", "nu")

    def init(params: np.ndarray) -> State:
        state = init_mu_nu(params)
        state["nu"] += initial_accumulator
        return state

    return Optimizer(init, update, {"kind": "scale_by_yogi", "b1": float(b1), "b2": float(b2),
                                    "eps": float(eps),
                                    "initial_accumulator": float(initial_accumulator)})


# ---------------------------------------------------------------------------------------------
# client transforms: a federated client's own terms, chained before its optimizer. Their state
# may hold three kinds of key besides their own: CLIENT keys stay with the client between rounds
# (on its worker: a client's optimizer state otherwise starts fresh each round), SERVER keys are
# set from what the server sends each round, REPORT keys go back with the update.

CLIENT = "client/"
SERVER = "server/"
REPORT = "report/"


def add_proximal(mu: float) -> Optimizer:
    """FedProx's proximal term: ``g + mu * (params - anchor)``, the anchor the round's start.

    A client's optimizer is initialised from the global parameters it receives each round, so
    ``init`` keeps them as the anchor of ``mu/2 ||w - w_global||^2``.

    References
    ----------
    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    """
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    mu = float(mu)

    def init(params: np.ndarray) -> State:
        return {"proximal/anchor": np.array(params, dtype=np.float64, copy=True),
                "step": np.asarray(0, dtype=np.int64)}

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("add_proximal needs params in update()")
        g = np.asarray(grads, dtype=np.float64)
        if mu:
            g = g + mu * (np.asarray(params, dtype=np.float64) - state["proximal/anchor"])
        return g, {"proximal/anchor": state["proximal/anchor"], "step": _step(state)}

    return Optimizer(init, update, {"kind": "add_proximal", "mu": mu})


def control_variates() -> Optimizer:
    """SCAFFOLD's drift correction: ``g + c - c_i``, and the client's next ``c_i``.

    ``c`` is the server's control variate (``server/control``) and ``c_i`` the client's own
    (``client/control``, kept on its worker). The new ``c_i`` is the mean of the gradients the
    client saw this round: with plain sgd at a constant rate that is the paper's option II,
    ``c_i - c + (x - y_i) / (K lr)``, and with any other client optimizer it is still the
    client's own gradient estimate. ``report/control`` is the change ``c_i+ - c_i`` the server
    averages into ``c``.

    References
    ----------
    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ICML 2020 (Algorithm 1, option II).
    """
    init = _zeros_state("server/control", "client/control", "scaffold/start", "report/control")

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        k = int(state["step"])
        # client/control is c_i when the round starts and the running mean of g after: the
        # round's correction uses the c_i it started with.
        start = state["client/control"] if k == 0 else state["scaffold/start"]
        seen = state["client/control"]
        mean = g.copy() if k == 0 else seen + (g - seen) / (k + 1)
        return g + state["server/control"] - start, {
            "server/control": state["server/control"], "client/control": mean,
            "scaffold/start": start, "report/control": mean - start, "step": _step(state)}

    return Optimizer(init, update, {"kind": "control_variates"})


# ---------------------------------------------------------------------------------------------
# optimizers


def sgd(lr: float | Schedule) -> Optimizer:
    """Plain (stochastic) gradient descent: ``update = -lr * g``.

    FedAvg's server step is ``sgd(1.0)`` applied to minus the averaged client delta.
    """
    return _named("sgd", [scale_by_learning_rate(lr)], lr=lr)


def momentum(lr: float | Schedule, beta: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Heavy-ball momentum, ``v = beta * v + g``, ``update = -lr * v``; with ``nesterov`` the
    look-ahead form ``update = -lr * (g + beta * v)``.

    References
    ----------
    Polyak (1964), "Some methods of speeding up the convergence of iteration methods".
    Nesterov (1983), "A method for solving the convex programming problem with convergence
    rate O(1/k^2)"; Sutskever, Martens, Dahl & Hinton (2013), ICML (the form used here).
    """
    return _named("momentum", [trace(beta, nesterov), scale_by_learning_rate(lr)], lr=lr,
                  beta=float(beta), nesterov=bool(nesterov))


def nesterov(lr: float | Schedule, beta: float = 0.9) -> Optimizer:
    """Nesterov momentum: ``momentum(lr, beta, nesterov=True)``.

    References
    ----------
    Nesterov (1983); Sutskever, Martens, Dahl & Hinton (2013), ICML.
    """
    return _named("nesterov", [trace(beta, True), scale_by_learning_rate(lr)], lr=lr,
                  beta=float(beta))


def adagrad(lr: float | Schedule, eps: float = 1e-8, initial_accumulator: float = 0.0
            ) -> Optimizer:
    """AdaGrad: ``G += g**2``, ``update = -lr * g / (sqrt(G) + eps)``.

    References
    ----------
    Duchi, Hazan & Singer (2011), "Adaptive subgradient methods for online learning and
    stochastic optimization", JMLR 12.
    """
    return _named("adagrad", [scale_by_rss(eps, initial_accumulator),
                              scale_by_learning_rate(lr)],
                  lr=lr, eps=float(eps), initial_accumulator=float(initial_accumulator))


def rmsprop(lr: float | Schedule, decay: float = 0.9, eps: float = 1e-8) -> Optimizer:
    """RMSprop: ``v = decay * v + (1 - decay) * g**2``, ``update = -lr * g / (sqrt(v) + eps)``.

    References
    ----------
    Tieleman & Hinton (2012), Lecture 6.5 "rmsprop", COURSERA: Neural Networks for ML.
    """
    return _named("rmsprop", [scale_by_rms(decay, eps), scale_by_learning_rate(lr)], lr=lr,
                  decay=float(decay), eps=float(eps))


def _adam_transforms(lr, b1, b2, eps, weight_decay) -> list[Optimizer]:
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []  # refuses < 0
    return [scale_by_adam(b1, b2, eps), *decay, scale_by_learning_rate(lr)]


def adam(lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> Optimizer:
    """Adam with bias correction; ``weight_decay > 0`` gives AdamW's decoupled decay.

    ``update = -lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * params)``: the decay is
    applied to the parameters directly, not through the gradient moments (and, as in optax,
    scaled by the learning rate). ``params`` is required when ``weight_decay > 0``.

    References
    ----------
    Kingma & Ba (2015), "Adam: A method for stochastic optimization", ICLR.
    Loshchilov & Hutter (2019), "Decoupled weight decay regularization", ICLR.
    """
    return _named("adam", _adam_transforms(lr, b1, b2, eps, weight_decay), lr=lr,
                  b1=float(b1), b2=float(b2), eps=float(eps), weight_decay=float(weight_decay))


def adamw(lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> Optimizer:
    """AdamW: :func:`adam` with decoupled weight decay on by default.

    References
    ----------
    Loshchilov & Hutter (2019), "Decoupled weight decay regularization", ICLR.
    """
    return _named("adamw", _adam_transforms(lr, b1, b2, eps, weight_decay), lr=lr,
                  b1=float(b1), b2=float(b2), eps=float(eps), weight_decay=float(weight_decay))


def yogi(lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3,
         initial_accumulator: float = 1e-6) -> Optimizer:
    """Yogi: Adam whose second moment moves additively,
    ``v = v - (1 - b2) * sign(v - g**2) * g**2``, so it cannot grow too fast when gradients
    shrink. ``update = -lr * m / (sqrt(v) + eps)`` (no bias correction, as in the paper's
    algorithm and in FedYogi).

    References
    ----------
    Zaheer, Reddi, Sachan, Kale & Kumar (2018), "Adaptive methods for nonconvex optimization",
    NeurIPS. Reddi et al. (2021), "Adaptive federated optimization", ICLR (FedYogi).
    """
    return _named("yogi", [scale_by_yogi(b1, b2, eps, initial_accumulator),
                           scale_by_learning_rate(lr)],
                  lr=lr, b1=float(b1), b2=float(b2), eps=float(eps),
                  initial_accumulator=float(initial_accumulator))


# ---------------------------------------------------------------------------------------------
# specs

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adagrad": adagrad,
    "rmsprop": rmsprop, "adam": adam, "adamw": adamw, "yogi": yogi}
"""The named optimizers, by the ``kind`` of their spec (the CLI's ``--optimizer`` names)."""

TRANSFORMS: dict[str, Callable[..., Optimizer]] = {
    "scale": scale, "scale_by_schedule": scale_by_schedule,
    "scale_by_learning_rate": scale_by_learning_rate,
    "add_decayed_weights": add_decayed_weights, "clip_by_global_norm": clip_by_global_norm,
    "trace": trace, "scale_by_rss": scale_by_rss, "scale_by_rms": scale_by_rms,
    "scale_by_adam": scale_by_adam, "scale_by_yogi": scale_by_yogi,
    "add_proximal": add_proximal, "control_variates": control_variates}


def describe(optimizer: Optimizer) -> dict[str, Any] | None:
    """How ``optimizer`` was built, e.g. ``{"kind": "adam", "lr": 0.01, "b1": 0.9, ...}``.

    ``None`` for an optimizer that cannot say (one of your own, or a learning-rate function
    that is not a :mod:`~fedpipe.tasks.schedules` factory's).
    """
    spec = getattr(optimizer, "spec", None)
    return None if spec is None else dict(spec)


def from_spec(spec: dict[str, Any]) -> Optimizer:
    """The optimizer (or transform, or chain) ``spec`` describes, built again.

    Raises
    ------
    ValueError
        An unknown ``kind`` or arguments its factory refuses.
    """
    args = dict(spec)
    kind = args.pop("kind", None)
    if kind == "chain":
        return chain(*(from_spec(t) for t in args["transforms"]))
    factory = OPTIMIZERS.get(kind) or TRANSFORMS.get(kind)
    if factory is None:
        raise ValueError(f"unknown optimizer kind {kind!r} "
                         f"(known: chain, {', '.join([*OPTIMIZERS, *TRANSFORMS])})")
    for key in ("lr", "schedule"):
        if key in args:
            args[key] = schedules.from_spec(args[key])
    return factory(**args)
