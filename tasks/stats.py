"""Per-column statistics of row chunks, their merge, and the preprocessing they drive.

Statistics are plain sums (count, sum, sum of squares, min, max), so partial results from
any number of chunks merge exactly in any tree order. All functions are NaN-aware: a NaN is
a missing value, counted out of ``count`` and ignored by ``min``/``max``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Stats = dict[str, np.ndarray]
FIELDS = ("count", "sum", "sumsq", "min", "max")


def chunk_stats(X: np.ndarray) -> Stats:
    """Column-wise count, sum, sum of squares, min and max of one chunk, ignoring NaN.

    A column with no finite value has ``min = +inf`` and ``max = -inf`` so merging stays exact.
    """
    X = np.asarray(X, dtype=np.float64)
    if not np.isnan(X).any():  # the common case: a few passes fewer
        return {
            "count": np.full(X.shape[1], X.shape[0], dtype=np.int64),
            "sum": X.sum(axis=0),
            "sumsq": np.einsum("ij,ij->j", X, X),
            "min": X.min(axis=0, initial=np.inf),
            "max": X.max(axis=0, initial=-np.inf),
        }
    present = ~np.isnan(X)
    filled = np.where(present, X, 0.0)
    return {
        "count": present.sum(axis=0).astype(np.int64),
        "sum": filled.sum(axis=0),
        "sumsq": np.square(filled).sum(axis=0),
        "min": np.where(present, X, np.inf).min(axis=0, initial=np.inf),
        "max": np.where(present, X, -np.inf).max(axis=0, initial=-np.inf),
    }


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Merge two partial statistics; associative and commutative."""
    return {
        "count": a["count"] + b["count"],
        "sum": a["sum"] + b["sum"],
        "sumsq": a["sumsq"] + b["sumsq"],
        "min": np.minimum(a["min"], b["min"]),
        "max": np.maximum(a["max"], b["max"]),
    }


def merge_many(parts: Sequence[Stats]) -> Stats:
    """Merge a non-empty sequence of partial statistics (one node of a fan-in tree)."""
    if not parts:
        raise ValueError("merge_many needs at least one partial result")
    out = parts[0]
    for part in parts[1:]:
        out = merge_stats(out, part)
    return out


def mean_std(stats: Stats) -> tuple[np.ndarray, np.ndarray]:
    """Column means and population standard deviations; a constant or empty column gets std 1.

    Uses ``(sumsq - sum**2 / n) / n`` clipped at zero: exact enough for standardisation of
    data whose mean is not many orders of magnitude above its spread.
    """
    n = np.maximum(stats["count"], 1).astype(np.float64)
    mean = stats["sum"] / n
    var = np.maximum(stats["sumsq"] - stats["sum"] * mean, 0.0) / n
    std = np.sqrt(var)
    return mean, np.where(std > 0, std, 1.0)


def chunk_histogram(X: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Per-column counts of non-NaN values in ``bins`` equal-width bins over ``[lo, hi]``.

    Returns an ``int64`` array of shape ``(n_features, bins)``; histograms of chunks add up.
    """
    X = np.asarray(X, dtype=np.float64)
    width = np.where(hi > lo, hi - lo, 1.0)
    pos = np.floor((X - lo) / width * bins)
    counts = np.zeros((X.shape[1], bins), dtype=np.int64)
    for j in range(X.shape[1]):
        col = pos[:, j]
        col = col[~np.isnan(col)].astype(np.int64)
        counts[j] = np.bincount(np.clip(col, 0, bins - 1), minlength=bins)
    return counts


def median_from_histogram(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Approximate column medians by linear interpolation inside the median's bin.

    The error is at most one bin width, ``(hi - lo) / bins``. A column without values gets NaN.
    """
    n_features, bins = counts.shape
    medians = np.full(n_features, np.nan)
    width = (hi - lo) / bins
    for j in range(n_features):
        total = int(counts[j].sum())
        if total == 0:
            continue
        cum = np.cumsum(counts[j])
        # the median is the mean of the two middle ranks; each is placed inside its own bin, so
        # empty bins between them (sparse data) cannot push the estimate out of the bound
        at = [_rank_in_bins(cum, counts[j], r) for r in ((total - 1) // 2, total // 2)]
        medians[j] = lo[j] + 0.5 * sum(at) * width[j] if hi[j] > lo[j] else lo[j]
    return medians


def _rank_in_bins(cum: np.ndarray, counts: np.ndarray, rank: int) -> float:
    # position, in bins from lo, of the value of 0-based ``rank``: spread evenly in its bin
    k = int(np.searchsorted(cum, rank + 1))
    before = cum[k - 1] if k > 0 else 0
    return k + (rank - before + 0.5) / counts[k]


def preprocess(
    X: np.ndarray,
    stats: Stats,
    *,
    impute: str = "none",
    standardize: bool = False,
    median: np.ndarray | None = None,
) -> np.ndarray:
    """Apply imputation then standardisation to one chunk; returns a new float64 array.

    Parameters
    ----------
    X : numpy.ndarray
        Chunk of shape ``(rows, features)``; NaN marks a missing value.
    stats : dict
        Merged statistics of the whole column set (see :func:`chunk_stats`).
    impute : {"none", "mean", "median"}
        Value that replaces NaN; ``"median"`` needs ``median``.
    standardize : bool
        Subtract the column mean and divide by its standard deviation.
    median : numpy.ndarray, optional
        Column medians, e.g. from :func:`median_from_histogram`.
    """
    out = np.array(X, dtype=np.float64, copy=True)
    mean, std = mean_std(stats)
    if impute != "none":
        fill = mean if impute == "mean" else median
        if fill is None:
            raise ValueError("median imputation needs the column medians")
        rows, cols = np.nonzero(np.isnan(out))
        out[rows, cols] = np.nan_to_num(fill, nan=0.0)[cols]
    if standardize:
        out -= mean
        out /= std
    return out
