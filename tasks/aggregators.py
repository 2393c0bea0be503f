"""Aggregators: the stage that turns the clients' deltas into the one delta the server applies.

``mean()`` is the row-weighted mean (a sum). The robust rules need every update at once, so
their stages use the ``"gather"`` reduction: the client part moves its delta under
``gather/delta`` (one row), the reduction stacks the rows in its fixed order, and the server
part applies the rule of :mod:`fedpipe.tasks.robust`. They run after ``validate`` (the
finite-value filter) and after ``clip`` when the chain has one::

    chain = (validate(), clip(1.0), trimmed_mean(0.1))

A Byzantine fraction (``fraction``) is turned into a count per round, ``f = floor(fraction K)``
of the ``K`` updates that arrived.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import robust
from .aggregate import GATHER, Packet, Stage, StageSpec, StageState, weighted_mean

ROWS = f"{GATHER}delta"


def mean(name: str = "weighted_mean") -> Stage:
    """The row-weighted mean of FedAvg (a sum; the default aggregator)."""
    stage = weighted_mean(name)
    return stage._replace(spec=StageSpec(kind="mean"))


def _gathering(name: str, rule: Callable[[np.ndarray, StageState], tuple[np.ndarray, StageState]],
               spec: dict, init: Callable[[int], StageState] | None = None) -> Stage:
    def before_sum(packet: Packet, state: StageState) -> Packet:
        packet = dict(packet)
        packet[ROWS] = packet.pop("delta")[None, :]
        return packet

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        rows = total.pop(ROWS)
        total["delta"], state = rule(rows, state)
        return total, state, {"gathered": float(rows.shape[0])}

    return Stage(name, init or (lambda n: {}), before_sum, after_sum, reduction="gather",
                 spec=StageSpec(spec))


def _count(fraction: float, k: int) -> int:
    return int(math.floor(fraction * k))


def _check_fraction(fraction: float, below: float) -> None:
    if not 0.0 <= fraction < below:
        raise ValueError(f"Byzantine fraction must be in [0, {below:g}), got {fraction}")


def median(name: str = "median") -> Stage:
    """Coordinate-wise median (Yin et al., ICML 2018); robust while attackers are < K/2."""
    return _gathering(name, lambda x, s: (robust.coordinate_median(x), s), {"kind": "median"})


def trimmed_mean(fraction: float = 0.1, name: str = "trimmed_mean") -> Stage:
    """Coordinate-wise trimmed mean dropping ``floor(fraction K)`` values at each end.

    References
    ----------
    Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018.
    """
    _check_fraction(fraction, 0.5)
    return _gathering(name, lambda x, s: (robust.trimmed_mean(x, _count(fraction, len(x))), s),
                      {"kind": "trimmed_mean", "fraction": float(fraction)})


def krum(fraction: float = 0.2, name: str = "krum") -> Stage:
    """Krum with ``f = floor(fraction K)`` (needs ``2f + 2 < K``; Blanchard et al. 2017)."""
    _check_fraction(fraction, 0.5)
    return _gathering(name, lambda x, s: (robust.krum(x, _count(fraction, len(x))), s),
                      {"kind": "krum", "fraction": float(fraction)})


def multi_krum(fraction: float = 0.2, m: int | None = None, name: str = "multi_krum") -> Stage:
    """Multi-Krum: the mean of the ``m`` best-scored updates (default ``K - f``)."""
    _check_fraction(fraction, 0.5)
    return _gathering(
        name, lambda x, s: (robust.multi_krum(x, _count(fraction, len(x)), m), s),
        {"kind": "multi_krum", "fraction": float(fraction), "m": m})


def centered_clip(tau: float = 1.0, iterations: int = 3, name: str = "centered_clip") -> Stage:
    """Centered clipping around the previous round's aggregate (Karimireddy et al., ICML 2021).

    The previous aggregate is the stage's state (it is in the checkpoint).
    """
    if not tau > 0 or iterations < 1:
        raise ValueError(f"need tau > 0 and iterations >= 1, got {tau}, {iterations}")

    def rule(x: np.ndarray, state: StageState):
        v = robust.centered_clipping(x, state["center"], tau, iterations)
        return v, {**state, "center": v}

    return _gathering(name, rule, {"kind": "centered_clip", "tau": float(tau),
                                   "iterations": int(iterations)},
                      init=lambda n: {"center": np.zeros(n)})
