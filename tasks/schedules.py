"""Learning-rate schedules: ``Schedule = Callable[[int], float]`` mapping a step to a rate.

``step`` counts the updates already applied, so ``schedule(0)`` is the rate of the first update.
Each factory validates its arguments and returns a plain function (picklable by cloudpickle).
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def _check_rate(lr: float) -> float:
    lr = float(lr)
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    return lr


def _check_steps(name: str, value: int) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def constant(lr: float) -> Schedule:
    """The same rate at every step."""
    lr = _check_rate(lr)

    def schedule(step: int) -> float:
        return lr

    return schedule


def step_decay(lr: float, every: int = 10, factor: float = 0.5) -> Schedule:
    """``lr * factor ** (step // every)``: multiply the rate by ``factor`` every ``every`` steps."""
    lr = _check_rate(lr)
    every = _check_steps("every", every)
    if not 0 < factor <= 1:
        raise ValueError(f"factor must be in (0, 1], got {factor}")

    def schedule(step: int) -> float:
        return lr * factor ** (int(step) // every)

    return schedule


def exponential(lr: float, rate: float = 0.96, decay_steps: int = 1) -> Schedule:
    """``lr * rate ** (step / decay_steps)``: smooth geometric decay."""
    lr = _check_rate(lr)
    decay_steps = _check_steps("decay_steps", decay_steps)
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")

    def schedule(step: int) -> float:
        return lr * rate ** (int(step) / decay_steps)

    return schedule


def inverse_time(lr: float, decay: float = 1.0, decay_steps: int = 1) -> Schedule:
    """``lr / (1 + decay * step / decay_steps)``: the classic Robbins-Monro style decay.

    References
    ----------
    Robbins & Monro (1951), "A stochastic approximation method", Ann. Math. Statist.
    """
    lr = _check_rate(lr)
    decay_steps = _check_steps("decay_steps", decay_steps)
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")

    def schedule(step: int) -> float:
        return lr / (1.0 + decay * int(step) / decay_steps)

    return schedule


def cosine(lr: float, total_steps: int, final: float = 0.0) -> Schedule:
    """Cosine decay from ``lr`` at step 0 to ``final`` at ``total_steps`` (then held there).

    References
    ----------
    Loshchilov & Hutter (2017), "SGDR: Stochastic gradient descent with warm restarts", ICLR.
    """
    lr = _check_rate(lr)
    total_steps = _check_steps("total_steps", total_steps)
    if not 0 <= final <= lr:
        raise ValueError(f"final must be in [0, lr], got {final}")

    def schedule(step: int) -> float:
        progress = min(int(step), total_steps) / total_steps
        return final + 0.5 * (lr - final) * (1.0 + math.cos(math.pi * progress))

    return schedule


def as_schedule(lr: float | Schedule) -> Schedule:
    """A schedule from a number (constant) or a schedule (returned unchanged)."""
    return lr if callable(lr) else constant(lr)
