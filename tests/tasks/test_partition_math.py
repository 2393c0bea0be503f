"""Partition math: every row in exactly one client, sizes, skew, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from fedpipe.tasks import partition as P


def _labels(n=3000, k=5, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=n)


def _assert_partition(assignment, n, clients, min_size=1):
    assert assignment.shape == (n,) and assignment.dtype == np.int64
    assert assignment.min() >= 0 and assignment.max() < clients  # every row in exactly one client
    sizes = np.bincount(assignment, minlength=clients)
    assert sizes.sum() == n and sizes.min() >= min_size


@pytest.mark.parametrize("clients", [1, 7, 50])
def test_iid_is_balanced_and_deterministic(clients):
    a = P.iid(1003, clients, seed=4)
    _assert_partition(a, 1003, clients)
    sizes = np.bincount(a)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(a, P.iid(1003, clients, seed=4))
    assert clients == 1 or not np.array_equal(a, P.iid(1003, clients, seed=5))


@pytest.mark.parametrize(("n_rows", "clients"), [(1003, 1), (1003, 7), (1003, 1003), (50, 13)])
def test_iid_deals_the_permutation_as_array_split_does(n_rows, clients):
    # The definition partitions were made with: an unchanged seed keeps its assignment.
    expected = np.empty(n_rows, dtype=np.int64)
    perm = np.random.default_rng(11).permutation(n_rows)
    for k, rows in enumerate(np.array_split(perm, clients)):
        expected[rows] = k
    np.testing.assert_array_equal(P.iid(n_rows, clients, seed=11), expected)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels()
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        values = []
        for seed in range(5):
            a = P.dirichlet(labels, 10, alpha, seed, min_size=0)
            _assert_partition(a, len(labels), 10, min_size=0)
            values.append(P.label_skew(P.label_histograms(labels, a, 10, 5)))
        skews.append(np.mean(values))
    assert skews[0] < 0.1 < skews[1] < skews[2]
    np.testing.assert_array_equal(P.dirichlet(labels, 10, 0.5, 3), P.dirichlet(labels, 10, 0.5, 3))


def test_dirichlet_min_size_is_honoured_or_an_error():
    labels = _labels(400)
    _assert_partition(P.dirichlet(labels, 8, 0.3, 0, min_size=10), 400, 8, min_size=10)
    with pytest.raises(ValueError, match=r"client \d+ gets \d+ rows \(< min_size 45\)"):
        P.dirichlet(labels, 8, 0.05, 0, min_size=45, tries=5)


def test_quantity_sizes_follow_the_power_law():
    a = P.quantity(10_000, 10, alpha=1.5, seed=2, min_size=5)
    _assert_partition(a, 10_000, 10, min_size=5)
    sizes = np.sort(np.bincount(a))[::-1]
    ratio = sizes[0] / sizes[1]
    assert ratio == pytest.approx(2**1.5, rel=0.05)
    flat = np.bincount(P.quantity(10_000, 10, alpha=0.01, seed=2))
    assert flat.max() / flat.min() < 1.1


def test_by_values_keeps_equal_values_together():
    values = np.repeat([3.0, 1.0, 2.0, 9.0], [10, 20, 30, 40])
    a = P.by_values(values, 4)
    _assert_partition(a, 100, 4)
    for v in np.unique(values):
        assert len(np.unique(a[values == v])) == 1
    two = P.by_values(values, 2)
    assert set(two[values <= 2.0]) == {0} and set(two[values >= 3.0]) == {1}
    with pytest.raises(ValueError, match="4 distinct values, fewer than 5 clients"):
        P.by_values(values, 5)


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda: P.iid(5, 6, 0), r"clients \(6\) is larger than the number of rows \(5\)"),
     (lambda: P.iid(5, 0, 0), "clients must be >= 1"),
     (lambda: P.dirichlet(np.zeros(10), 2, 0.0, 0), "alpha must be > 0"),
     (lambda: P.quantity(10, 2, -1.0, 0), "alpha must be > 0"),
     (lambda: P.quantity(10, 3, 1.0, 0, min_size=4), "3 clients x min_size 4")],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_quantile_bins_and_histograms():
    y = np.linspace(0, 1, 1000)
    labels, edges = P.quantile_bins(y, 10)
    assert len(edges) == 11 and np.all(np.bincount(labels) == 100)
    hist = P.label_histograms(labels, np.zeros(1000, dtype=int), 1, 10)
    assert hist.shape == (1, 10) and hist.sum() == 1000
    assert P.label_skew(hist) == 0.0
