"""The fixed-order reduction tree: one root, same bits whatever the number of workers."""

import numpy as np
import pytest
from fedpipe.cluster import connect, dashboard_link, peak_worker_memory
from fedpipe.engine.graph import GATHER_AT_MOST, fetch_sum, fold_tree, tree_depth, tree_sum
from fedpipe.tasks.reduce import add_sums


def _leaves(dask_client, n):
    rng = np.random.default_rng(0)
    parts = [(float(rng.standard_normal()) * 1e8, rng.standard_normal(5), 3) for _ in range(n)]
    return parts, dask_client.scatter(parts, hash=False)


@pytest.mark.parametrize("n,fan_in", [(1, 8), (7, 2), (20, 8), (65, 4)])
def test_tree_sum_matches_serial_sum(dask_client, n, fan_in):
    parts, futures = _leaves(dask_client, n)
    loss, grad, count = tree_sum(dask_client, futures, fan_in=fan_in).result()
    assert count == 3 * n
    np.testing.assert_allclose(grad, sum(p[1] for p in parts), rtol=1e-12)
    assert loss == pytest.approx(sum(p[0] for p in parts), rel=1e-12)


def test_tree_keys_name_the_group(dask_client):
    _, futures = _leaves(dask_client, 10)
    root = tree_sum(dask_client, futures, fan_in=3, key_prefix="sum-test")
    assert root.key[0].startswith("sum-test-")
    assert root.key[1] == tree_depth(10, 3) - 1


@pytest.mark.parametrize("n", [1, GATHER_AT_MOST, GATHER_AT_MOST + 1, 20])
def test_fetch_sum_has_the_bits_of_the_serial_tree(dask_client, n):
    # Few leaves are added on the driver, many by a tree on the workers: same order, same bits.
    parts = [np.random.default_rng(i).standard_normal(40) * 10.0 ** (i % 7) for i in range(n)]
    futures = dask_client.scatter(parts, hash=False)
    total = fetch_sum(dask_client, futures, add_sums, timeout=30)
    serial = fold_tree(parts, 8, lambda _level, _j, group: add_sums(*group))
    assert total.tobytes() == serial.tobytes()


def test_tree_sum_is_bit_identical_across_clusters():
    parts = [np.random.default_rng(i).standard_normal(50) * 10.0 ** (i % 9) for i in range(30)]
    results = []
    for workers in (1, 3):
        with connect(workers=workers, threads=1, processes=False, dashboard_address=":0") as dc:
            results.append(tree_sum(dc, [dc.scatter(p) for p in parts], fan_in=4).result())
    assert results[0].tobytes() == results[1].tobytes()


def test_add_sums_rejects_nothing():
    with pytest.raises(ValueError):
        add_sums()
    with pytest.raises(ValueError):
        tree_sum(None, [])


def test_connect_reports(dask_client):
    assert dashboard_link(dask_client) is None or "status" in dashboard_link(dask_client)
    assert peak_worker_memory(dask_client) > 1_000_000
