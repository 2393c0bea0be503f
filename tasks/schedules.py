"""Learning-rate schedules: ``Schedule = Callable[[int], float]`` mapping a step to a rate.

``step`` counts the updates already applied, so ``schedule(0)`` is the rate of the first update.
Each factory validates its arguments and returns a :class:`NamedSchedule`: a callable that
keeps the name and arguments it was built with (``schedule.spec``), so that a run's
configuration is written by printing it and :func:`from_spec` builds it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Schedule = Callable[[int], float]


@dataclass(frozen=True, eq=False)  # hashed by identity, as the plain function it wraps
class NamedSchedule:
    """A schedule function with its spec, e.g. ``{"kind": "cosine", "lr": 0.1, ...}``."""

    fn: Callable[[int], float]
    spec: dict[str, Any]

    def __call__(self, step: int) -> float:
        return self.fn(step)


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

    return NamedSchedule(schedule, {"kind": "constant", "lr": lr})


def step_decay(lr: float, every: int = 10, factor: float = 0.5) -> Schedule:
    """``lr * factor ** (step // every)``: multiply the rate by ``factor`` every ``every`` steps."""
    lr = _check_rate(lr)
    every = _check_steps("every", every)
    if not 0 < factor <= 1:
        raise ValueError(f"factor must be in (0, 1], got {factor}")

    def schedule(step: int) -> float:
        return lr * factor ** (int(step) // every)

    return NamedSchedule(schedule, {"kind": "step_decay", "lr": lr, "every": every,
                                    "factor": float(factor)})


def exponential(lr: float, rate: float = 0.96, decay_steps: int = 1) -> Schedule:
    """``lr * rate ** (step / decay_steps)``: smooth geometric decay."""
    lr = _check_rate(lr)
    decay_steps = _check_steps("decay_steps", decay_steps)
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")

    def schedule(step: int) -> float:
        return lr * rate ** (int(step) / decay_steps)

    return NamedSchedule(schedule, {"kind": "exponential", "lr": lr, "rate": float(rate),
                                    "decay_steps": decay_steps})


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

    return NamedSchedule(schedule, {"kind": "inverse_time", "lr": lr, "decay": float(decay),
                                    "decay_steps": decay_steps})


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

    return NamedSchedule(schedule, {"kind": "cosine", "lr": lr, "total_steps": total_steps,
                                    "final": float(final)})


def as_schedule(lr: float | Schedule) -> Schedule:
    """A schedule from a number (constant) or a schedule (returned unchanged)."""
    return lr if callable(lr) else constant(lr)


BUILDERS: dict[str, Callable[..., NamedSchedule]] = {
    "constant": constant, "step_decay": step_decay, "exponential": exponential,
    "inverse_time": inverse_time, "cosine": cosine}


def describe(schedule: float | Schedule) -> float | dict[str, Any] | None:
    """A number as itself, a schedule as its spec; ``None`` for a function that has none."""
    if not callable(schedule):
        return float(schedule)
    spec = getattr(schedule, "spec", None)
    return dict(spec) if isinstance(spec, dict) else None


def from_spec(spec: float | dict[str, Any]) -> float | NamedSchedule:
    """What :func:`describe` gave, built again (a number stays a number).

    Raises
    ------
    ValueError
        An unknown ``kind`` or arguments its factory refuses.
    """
    if not isinstance(spec, dict):
        return float(spec)
    args = dict(spec)
    kind = args.pop("kind", None)
    if kind not in BUILDERS:
        raise ValueError(f"unknown schedule kind {kind!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](**args)
