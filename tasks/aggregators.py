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

import functools
import math
from collections.abc import Callable

import numpy as np

from . import robust
from .aggregate import GATHER, Packet, Stage, StageSpec, StageState, weighted_mean

ROWS = f"{GATHER}delta"
# A coordinate-wise rule's result computed by column blocks where the rows are (the workers),
# and how many rows it saw: what the server part takes instead of the rows themselves.
BY_COLUMNS = "columns/delta"
ROW_COUNT = "columns/rows"


def mean(name: str = "weighted_mean") -> Stage:
    """The row-weighted mean of FedAvg (a sum; the default aggregator)."""
    stage = weighted_mean(name)
    return stage._replace(spec=StageSpec(kind="mean"))


def _gathering(name: str, rule: Callable[[np.ndarray, StageState], tuple[np.ndarray, StageState]],
               spec: dict, init: Callable[[int], StageState] | None = None,
               by_columns: Callable[[np.ndarray], np.ndarray] | None = None) -> Stage:
    def before_sum(packet: Packet, state: StageState) -> Packet:
        packet = dict(packet)
        packet[ROWS] = packet.pop("delta")[None, :]
        return packet

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        if BY_COLUMNS in total:  # reduced by column blocks on the workers: the same bits
            total["delta"] = total.pop(BY_COLUMNS)
            return total, state, {"gathered": float(total.pop(ROW_COUNT))}
        rows = total.pop(ROWS)
        total["delta"], state = rule(rows, state)
        return total, state, {"gathered": float(rows.shape[0])}

    if by_columns is not None:
        # A coordinate-wise rule, stateless: the engine may apply it to column blocks of the
        # rows where they are and send the server only the result (see column_block).
        after_sum.by_columns = by_columns
    return Stage(name, init or (lambda n: {}), before_sum, after_sum, reduction="gather",
                 spec=StageSpec(spec))


def column_rule(stages) -> Callable[[np.ndarray], np.ndarray] | None:
    """The chain's coordinate-wise gathering rule, if its aggregator has one (median, trimmed
    mean): what may run on column blocks of the rows instead of on the stacked rows."""
    rules = [getattr(s.after_sum, "by_columns", None) for s in stages if s.reduction == "gather"]
    return rules[0] if rules and rules[0] is not None else None


def column_bounds(n_params: int, blocks: int) -> list[tuple[int, int]]:
    """``blocks`` contiguous column ranges covering ``n_params`` (sizes differ by at most 1)."""
    edges = np.linspace(0, n_params, blocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def column_block(packet: Packet | None, j: int, blocks: int, n_params: int) -> np.ndarray:
    """Columns ``j`` of ``blocks`` of a summed packet's stacked rows (none: zero rows).

    A view: the block that stays on its worker is not copied (one that travels is, once).
    """
    lo, hi = column_bounds(n_params, blocks)[j]
    if packet is None or ROWS not in packet:
        return np.empty((0, hi - lo))
    return packet[ROWS][:, lo:hi]


def without_rows(packet: Packet | None) -> Packet | None:
    """A summed packet with its stacked rows replaced by their count (``ROW_COUNT``)."""
    if packet is None:
        return None
    rest = {k: v for k, v in packet.items() if k != ROWS}
    rest[ROW_COUNT] = np.asarray(float(len(packet[ROWS])) if ROWS in packet else 0.0)
    return rest


def rule_on_blocks(rule: Callable[[np.ndarray], np.ndarray], *blocks: np.ndarray) -> np.ndarray:
    """``rule`` on one column block of every part's rows, stacked in the parts' order.

    A coordinate-wise rule gives each column the bits it gives on the whole matrix.
    """
    rows = np.concatenate(blocks, axis=0)  # a new array: the rule may reorder it in place
    return rule(rows) if len(rows) else np.empty(0)  # every update rejected: nothing to add


def join_columns(packet: Packet, results: list[np.ndarray]) -> Packet:
    """``packet`` (from :func:`without_rows`, summed) with the column blocks' results joined."""
    return {**packet, BY_COLUMNS: np.concatenate(results)}


def _count(fraction: float, k: int) -> int:
    return int(math.floor(fraction * k))


def _check_fraction(fraction: float, below: float) -> None:
    if not 0.0 <= fraction < below:
        raise ValueError(f"Byzantine fraction must be in [0, {below:g}), got {fraction}")


def median(name: str = "median") -> Stage:
    """Coordinate-wise median (Yin et al., ICML 2018); robust while attackers are < K/2."""
    return _gathering(name, lambda x, s: (robust.coordinate_median(x), s), {"kind": "median"},
                      by_columns=functools.partial(robust.coordinate_median, overwrite=True))


def trimmed_mean(fraction: float = 0.1, name: str = "trimmed_mean") -> Stage:
    """Coordinate-wise trimmed mean dropping ``floor(fraction K)`` values at each end.

    References
    ----------
    Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018.
    """
    _check_fraction(fraction, 0.5)
    def rule(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
        return robust.trimmed_mean(x, _count(fraction, len(x)), overwrite)

    return _gathering(name, lambda x, s: (rule(x), s),
                      {"kind": "trimmed_mean", "fraction": float(fraction)},
                      by_columns=functools.partial(rule, overwrite=True))


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
