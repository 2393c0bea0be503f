"""Column statistics: chunk results merged in any order equal NumPy's on the whole array."""

from __future__ import annotations

import numpy as np
import pytest
from fedpipe.tasks import split
from fedpipe.tasks import stats as S


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(10.0, 4.0, size=(503, 4))
    X[rng.random(X.shape) < 0.1] = np.nan
    return X


def test_merged_chunks_equal_whole_array_in_any_order():
    X = _data()
    parts = [S.chunk_stats(c) for c in np.array_split(X, 9)]
    order = np.random.default_rng(1).permutation(len(parts))
    merged = S.merge_many([parts[i] for i in order])
    pairwise = S.merge_stats(S.merge_many(parts[:4]), S.merge_many(parts[4:]))
    for out in (merged, pairwise):
        np.testing.assert_array_equal(out["count"], (~np.isnan(X)).sum(0))
        np.testing.assert_allclose(out["sum"], np.nansum(X, 0), rtol=1e-12)
        np.testing.assert_allclose(out["sumsq"], np.nansum(X**2, 0), rtol=1e-12)
        np.testing.assert_array_equal(out["min"], np.nanmin(X, 0))
        np.testing.assert_array_equal(out["max"], np.nanmax(X, 0))
    mean, std = S.mean_std(merged)
    np.testing.assert_allclose(mean, np.nanmean(X, 0), rtol=1e-12)
    np.testing.assert_allclose(std, np.nanstd(X, 0), rtol=1e-9)


def test_empty_and_constant_columns():
    X = np.array([[np.nan, 2.0], [np.nan, 2.0]])
    st = S.chunk_stats(X)
    assert st["count"].tolist() == [0, 2]
    assert st["min"][0] == np.inf and st["max"][0] == -np.inf
    mean, std = S.mean_std(st)
    assert std.tolist() == [1.0, 1.0]  # never divide by zero
    out = S.preprocess(X, st, impute="mean", standardize=True)
    assert np.isfinite(out).all() and out[:, 1].tolist() == [0.0, 0.0]


def test_histogram_median_within_one_bin():
    X = _data(3)
    st = S.merge_many([S.chunk_stats(c) for c in np.array_split(X, 5)])
    hist = sum(S.chunk_histogram(c, st["min"], st["max"], 256) for c in np.array_split(X, 5))
    assert hist.sum() == (~np.isnan(X)).sum()
    med = S.median_from_histogram(hist, st["min"], st["max"])
    width = (st["max"] - st["min"]) / 256
    assert np.all(np.abs(med - np.nanmedian(X, 0)) <= width)


def test_preprocess_imputes_then_standardises():
    X = _data(2)
    st = S.chunk_stats(X)
    med = np.nanmedian(X, 0)
    out = S.preprocess(X, st, impute="median", median=med)
    np.testing.assert_array_equal(out, np.where(np.isnan(X), med, X))
    with pytest.raises(ValueError, match="median"):
        S.preprocess(X, st, impute="median")
    assert np.isnan(S.preprocess(X, st)).sum() == np.isnan(X).sum()  # no imputation unless asked


def test_split_mask_is_deterministic_and_near_the_fraction():
    a = split.test_mask(10_000, 3, 0.25, seed=11)
    np.testing.assert_array_equal(a, split.test_mask(10_000, 3, 0.25, seed=11))
    assert not np.array_equal(a, split.test_mask(10_000, 4, 0.25, seed=11))
    assert a.mean() == pytest.approx(0.25, abs=0.02)
    assert not split.test_mask(10, 0, 0.0, 0).any()
    with pytest.raises(ValueError, match="fraction"):
        split.test_mask(10, 0, 1.0, 0)


def test_histogram_median_within_one_bin_when_the_middle_values_are_bins_apart():
    X = np.array([[0.0], [1.0], [2.0], [97.0], [98.0], [100.0]])  # the middle gap spans bins
    hist = S.chunk_histogram(X, np.array([0.0]), np.array([100.0]), 100)
    med = S.median_from_histogram(hist, np.array([0.0]), np.array([100.0]))
    assert abs(med[0] - np.median(X)) <= 1.0
