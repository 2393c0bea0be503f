"""Input encoding of a trained model: categorical one-hot columns, imputation, standardisation.

A :class:`Preprocess` is the store's preprocessing reduced to three vectors, so the same
arithmetic runs on a worker's chunk, in an exported ONNX graph (``Where(IsNaN)``, ``Sub``,
``Div``) and in a scikit-learn ``Pipeline``: ``(where(isnan(x), fill, x) - shift) / scale``.
It gives the same bits as :func:`fedpipe.tasks.stats.preprocess` on the same statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import stats as stats_math


class Preprocess(NamedTuple):
    """Per-column ``fill`` (``None``: no imputation), ``shift`` and ``scale`` (float64)."""

    fill: np.ndarray | None
    shift: np.ndarray
    scale: np.ndarray
    standardize: bool


def from_stats(stats: stats_math.Stats, *, impute: str, standardize: bool,
               median: np.ndarray | None = None) -> Preprocess:
    """The :class:`Preprocess` that :func:`fedpipe.tasks.stats.preprocess` applies with ``stats``."""
    mean, std = stats_math.mean_std(stats)
    fill = None
    if impute != "none":
        fill = mean if impute == "mean" else median
        if fill is None:
            raise ValueError("median imputation needs the column medians")
        fill = np.nan_to_num(np.asarray(fill, dtype=np.float64), nan=0.0)
    if not standardize:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    return Preprocess(fill, mean, std, bool(standardize))


def apply(pre: Preprocess, X: np.ndarray) -> np.ndarray:
    """A new float64 array: NaN replaced by ``fill``, then ``(x - shift) / scale``.

    Without ``fill`` a NaN stays NaN (the caller decides whether that is an error).
    """
    out = np.array(X, dtype=np.float64, copy=True)
    if pre.fill is not None:
        rows, cols = np.nonzero(np.isnan(out))
        out[rows, cols] = pre.fill[cols]
    if pre.standardize:
        out -= pre.shift
        out /= pre.scale
    return out


def category_key(value: object) -> str:
    """The text a category is matched by: ``3``, ``3.0`` and ``"3"`` are one category."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    return str(value)


def codes(values: np.ndarray, categories: Sequence) -> np.ndarray:
    """Index of each value in ``categories``; ``-1`` for a value not in it (or missing)."""
    lookup = {category_key(c): i for i, c in enumerate(categories)}
    values = np.asarray(values, dtype=object).reshape(-1)
    if not len(values):
        return np.empty(0, dtype=np.int64)
    missing = np.array([v is None or (isinstance(v, float) and v != v) for v in values])
    keys = np.array([category_key(v) for v in values])
    uniq, inverse = np.unique(keys, return_inverse=True)
    mapped = np.array([lookup.get(u, -1) for u in uniq], dtype=np.int64)
    return np.where(missing, -1, mapped[inverse])


def one_hot(index: np.ndarray, n_categories: int) -> np.ndarray:
    """``(n, n_categories)`` float64 indicator rows; an index of ``-1`` gives a row of zeros.

    An unseen category thus contributes nothing, as scikit-learn's
    ``OneHotEncoder(handle_unknown="ignore")`` does.
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    out = np.zeros((len(index), n_categories))
    seen = index >= 0
    out[np.nonzero(seen)[0], index[seen]] = 1.0
    return out
