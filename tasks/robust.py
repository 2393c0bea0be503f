"""Byzantine-robust aggregation rules: functions of the stacked client updates ``(K, d)``.

Each rule is a pure function of every update at once (hence the ``"gather"`` reduction of
:mod:`fedpipe.tasks.aggregators`, which wraps them as stages). The bounds below are those of
the papers; above them a rule can be moved arbitrarily far and the docs show it.

=================  ==============================  ==========================
rule               tolerates f Byzantine of K      cost
=================  ==============================  ==========================
coordinate median  f < K/2 (per coordinate)        O(K d) (introselect)
trimmed mean       f <= floor(beta K) < K/2        O(K d)
Krum / Multi-Krum  2f + 2 < K                      O(K^2 d)
centered clipping  f/K < 0.1-ish (see the paper)   O(iters K d)
=================  ==============================  ==========================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PARALLEL_AT = 1 << 21  # K * d from which coordinate blocks are selected in parallel threads


def _stack(updates: np.ndarray) -> np.ndarray:
    x = np.asarray(updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (K, d) array, got shape {x.shape}")
    return x


def _by_coordinate_blocks(rule: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                          threads: int | None = None) -> np.ndarray:
    """``rule`` (a coordinate-wise function of a ``(K, b)`` block) over column blocks of ``x``.

    NumPy's partition releases the GIL, so the blocks can use every core (no gain could be
    measured on the loaded 2-core benchmark machine); the result is the same bits as
    ``rule(x)`` because no coordinate depends on another.
    """
    threads = threads or min(os.cpu_count() or 1, 8)
    k, d = x.shape
    if threads == 1 or k * d < PARALLEL_AT:
        return rule(x)
    step = -(-d // (4 * threads))  # a few blocks per thread evens out a loaded machine
    out = np.empty(d)

    def one(start: int) -> None:
        out[start:start + step] = rule(x[:, start:start + step])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(0, d, step)))
    return out


def coordinate_median(updates: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Coordinate-wise median; ``overwrite`` lets it reorder ``updates`` in place (no copy).

    References
    ----------
    Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018.
    """
    return _by_coordinate_blocks(
        lambda block: np.median(block, axis=0, overwrite_input=overwrite), _stack(updates))


def trimmed_mean(updates: np.ndarray, f: int, overwrite: bool = False) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``f`` largest and ``f`` smallest values;
    ``overwrite`` lets it reorder ``updates`` in place (no copy).

    References
    ----------
    Yin et al., ICML 2018 (coordinate-wise trimmed mean).
    """
    x = _stack(updates)
    k = x.shape[0]
    if not 0 <= f < k / 2:
        raise ValueError(f"trimmed mean of {k} updates cannot drop {f} from each end")
    if f == 0:
        return x.mean(axis=0)

    def rule(block: np.ndarray) -> np.ndarray:
        # partition puts the f smallest first and the f largest last, in O(K d)
        if overwrite:  # the same selection, in place
            block.partition((f - 1, k - f), axis=0)
            return block[f:k - f].mean(axis=0)
        return np.partition(block, (f - 1, k - f), axis=0)[f:k - f].mean(axis=0)

    return _by_coordinate_blocks(rule, x)


def _pairwise_sq(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", x, x)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    # a huge update overflows its distances (inf - inf = nan): it is simply far from everyone
    d2 = np.nan_to_num(d2, nan=np.inf)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Each update's sum of squared distances to its ``K - f - 2`` nearest other updates."""
    x = _stack(updates)
    k = x.shape[0]
    if not 0 <= f or k - f - 2 < 0:
        raise ValueError(f"Krum needs K >= f + 2, got K={k}, f={f}")
    d2 = _pairwise_sq(x)
    nearest = np.sort(d2, axis=1)[:, 1:k - f - 1]  # column 0 is the update itself
    return nearest.sum(axis=1)


def multi_krum(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """Mean of the ``m`` updates with the lowest Krum scores (``m = K - f`` by default; ties
    go to the lower index). ``m = 1`` is Krum.

    References
    ----------
    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017.
    """
    x = _stack(updates)
    m = x.shape[0] - f if m is None else int(m)
    if not 1 <= m <= x.shape[0]:
        raise ValueError(f"Multi-Krum selects between 1 and {x.shape[0]} updates, got m={m}")
    chosen = np.argsort(krum_scores(x, f), kind="stable")[:m]
    return x[np.sort(chosen)].mean(axis=0)


def krum(updates: np.ndarray, f: int) -> np.ndarray:
    """The single update with the lowest Krum score (Blanchard et al., NeurIPS 2017)."""
    return multi_krum(updates, f, m=1)


def centered_clipping(updates: np.ndarray, center: np.ndarray, tau: float,
                      iterations: int = 1) -> np.ndarray:
    """``v <- v + mean_i clip_tau(x_i - v)``, ``iterations`` times, from ``center``.

    References
    ----------
    Karimireddy, He & Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021 (centered clipping, Algorithm 2).
    """
    x = _stack(updates)
    if not tau > 0 or iterations < 1:
        raise ValueError(f"need tau > 0 and iterations >= 1, got {tau}, {iterations}")
    v = np.asarray(center, dtype=np.float64)
    for _ in range(iterations):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.maximum(norms, np.finfo(float).tiny))
        v = v + (diff * scale[:, None]).mean(axis=0)
    return v
