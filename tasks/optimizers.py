"""First-order optimizers as pure ``init``/``update`` pairs (optax style).

``update(grads, state, params) -> (updates, new_state)``; the new parameters are
``apply_updates(params, updates) = params + updates``. State is a ``dict`` of NumPy arrays (a
0-d int64 ``"step"`` included), so it saves with ``np.savez`` and a reloaded state continues
identically. ``update`` never mutates its arguments. ``lr`` is a float or a
:data:`fedpipe.tasks.schedules.Schedule` evaluated at ``state["step"]`` (0 for the first update).

Every update is ``-lr(step) * direction`` where the direction does not depend on the rate; the
conformance check :func:`fedpipe.tasks.checks.check_optimizer` relies on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .schedules import Schedule, as_schedule

State = dict[str, np.ndarray]


class Optimizer(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``update(grads, state, params) -> (updates, new_state)``."""

    init: Callable[[np.ndarray], State]
    update: Callable[[np.ndarray, State, np.ndarray], tuple[np.ndarray, State]]


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


def sgd(lr: float | Schedule) -> Optimizer:
    """Plain (stochastic) gradient descent: ``update = -lr * g``.

    FedAvg's server step is ``sgd(1.0)`` applied to minus the averaged client delta.
    """
    schedule = as_schedule(lr)

    def update(grads, state, params=None):
        rate = schedule(int(state["step"]))
        return -rate * np.asarray(grads, dtype=np.float64), {"step": _step(state)}

    return Optimizer(_zeros_state(), update)


def momentum(lr: float | Schedule, beta: float = 0.9, nesterov: bool = False) -> Optimizer:
    """Heavy-ball momentum, ``v = beta * v + g``, ``update = -lr * v``; with ``nesterov`` the
    look-ahead form ``update = -lr * (g + beta * v)``.

    References
    ----------
    Polyak (1964), "Some methods of speeding up the convergence of iteration methods".
    Nesterov (1983), "A method for solving the convex programming problem with convergence
    rate O(1/k^2)"; Sutskever, Martens, Dahl & Hinton (2013), ICML (the form used here).
    """
    schedule = as_schedule(lr)
    _check_beta("beta", beta)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        velocity = beta * state["velocity"] + g
        direction = g + beta * velocity if nesterov else velocity
        rate = schedule(int(state["step"]))
        return -rate * direction, {"velocity": velocity, "step": _step(state)}

    return Optimizer(_zeros_state("velocity"), update)


def nesterov(lr: float | Schedule, beta: float = 0.9) -> Optimizer:
    """Nesterov momentum: ``momentum(lr, beta, nesterov=True)``.

    References
    ----------
    Nesterov (1983); Sutskever, Martens, Dahl & Hinton (2013), ICML.
    """
    return momentum(lr, beta, nesterov=True)


def adagrad(lr: float | Schedule, eps: float = 1e-8, initial_accumulator: float = 0.0
            ) -> Optimizer:
    """AdaGrad: ``G += g**2``, ``update = -lr * g / (sqrt(G) + eps)``.

    References
    ----------
    Duchi, Hazan & Singer (2011), "Adaptive subgradient methods for online learning and
    stochastic optimization", JMLR 12.
    """
    schedule = as_schedule(lr)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        acc = state["sum_sq"] + g * g
        rate = schedule(int(state["step"]))
        return -rate * g / (np.sqrt(acc) + eps), {"sum_sq": acc, "step": _step(state)}

    return Optimizer(_zeros_state("sum_sq", fill=initial_accumulator), update)


def rmsprop(lr: float | Schedule, decay: float = 0.9, eps: float = 1e-8) -> Optimizer:
    """RMSprop: ``v = decay * v + (1 - decay) * g**2``, ``update = -lr * g / (sqrt(v) + eps)``.

    References
    ----------
    Tieleman & Hinton (2012), Lecture 6.5 "rmsprop", COURSERA: Neural Networks for ML.
    """
    schedule = as_schedule(lr)
    _check_beta("decay", decay)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        nu = decay * state["nu"] + (1.0 - decay) * g * g
        rate = schedule(int(state["step"]))
        return -rate * g / (np.sqrt(nu) + eps), {"nu": nu, "step": _step(state)}

    return Optimizer(_zeros_state("nu"), update)


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
    schedule = as_schedule(lr)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_eps(eps)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        t = int(state["step"]) + 1
        mu = b1 * state["mu"] + (1.0 - b1) * g
        nu = b2 * state["nu"] + (1.0 - b2) * g * g
        direction = (mu / (1.0 - b1**t)) / (np.sqrt(nu / (1.0 - b2**t)) + eps)
        if weight_decay:
            if params is None:
                raise ValueError("adam with weight_decay needs params in update()")
            direction = direction + weight_decay * np.asarray(params, dtype=np.float64)
        return -schedule(t - 1) * direction, {"mu": mu, "nu": nu, "step": _step(state)}

    return Optimizer(_zeros_state("mu", "nu"), update)


def adamw(lr: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> Optimizer:
    """AdamW: :func:`adam` with decoupled weight decay on by default.

    References
    ----------
    Loshchilov & Hutter (2019), "Decoupled weight decay regularization", ICLR.
    """
    return adam(lr, b1, b2, eps, weight_decay)


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
    schedule = as_schedule(lr)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_eps(eps)

    def update(grads, state, params=None):
        g = np.asarray(grads, dtype=np.float64)
        g2 = g * g
        mu = b1 * state["mu"] + (1.0 - b1) * g
        nu = state["nu"] - (1.0 - b2) * np.sign(state["nu"] - g2) * g2
        rate = schedule(int(state["step"]))
        return -rate * mu / (np.sqrt(nu) + eps), {"mu": mu, "nu": nu, "step": _step(state)}

    init_mu_nu = _zeros_state("mu", "nu")

    def init(params: np.ndarray) -> State:
        state = init_mu_nu(params)
        state["nu"] += initial_accumulator
        return state

    return Optimizer(init, update)
