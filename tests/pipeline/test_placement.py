"""Client -> worker placement: balanced mapping, resource discovery, worker-side row cache."""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed import wait
from fedpipe.data import store
from fedpipe.engine import placement
from fedpipe.errors import TrainingError
from test_federate_support import partitioned_store


def test_assign_clients_is_deterministic_and_balanced_by_rows():
    rows = {str(i): 10 + (i * 37) % 90 for i in range(40)}
    groups = placement.assign_clients(rows, 3)
    assert groups == placement.assign_clients(dict(reversed(list(rows.items()))), 3)
    assert sorted(c for g in groups for c in g) == sorted(rows)
    loads = [sum(rows[c] for c in g) for g in groups]
    assert max(loads) - min(loads) <= max(rows.values())
    assert placement.assign_clients({"a": 5}, 4) == [["a"]]  # no empty workers
    with pytest.raises(TrainingError, match="--workers must be at least 1"):
        placement.assign_clients(rows, 0)


def test_sort_clients_numeric_first():
    assert placement.sort_clients(["10", "2", "b", "1"]) == ["1", "2", "10", "b"]


@pytest.fixture(scope="module")
def cluster():
    groups = [["0", "1"], ["2"]]
    with placement.simulation_cluster(groups, processes=False, dashboard_address=":0") as dc:
        yield dc, groups


def _worker_name(dask_worker=None) -> str:
    from distributed import get_worker

    return get_worker().name


def test_one_graph_wave_runs_each_task_on_its_group_worker(cluster):
    dc, groups = cluster
    calls = {f"local-wave-{j}": (_worker_name, placement.pin_group(g))
             for j, g in enumerate(groups)}
    futures = placement.submit_pinned(dc, calls)
    names = dc.gather(futures)  # first: the graph reaches the scheduler on the batched stream
    restrictions = dc.run_on_scheduler(
        lambda dask_scheduler: {str(k): ts.resource_restrictions
                                for k, ts in dask_scheduler.tasks.items() if "wave" in str(k)})
    assert restrictions == {"local-wave-0": {"client-0": 1}, "local-wave-1": {"client-2": 1}}
    holders = {w["name"]: w["resources"] for w in dc.scheduler_info()["workers"].values()}
    for group, name in zip(groups, names, strict=True):
        assert all(f"client-{c}" in holders[name] for c in group)


def test_discover_groups_clients_by_the_workers_that_carry_them(cluster):
    dc, groups = cluster
    assert placement.discover(dc, ["2", "0", "1"]) == groups
    with pytest.raises(TrainingError, match=r"no worker carries resource client-7, client-9 "
                                            r"\(2 workers for 4 clients\)"):
        placement.discover(dc, ["0", "1", "7", "9"])


def test_unplaceable_task_fails_after_the_no_workers_timeout(cluster):
    dc, _ = cluster
    placement.set_no_workers_timeout(dc, 0.5)
    try:
        fut = dc.submit(sum, [1, 2], resources=placement.resources_of(["nobody"]), pure=False)
        start = time.perf_counter()
        wait([fut], timeout=10)
        assert fut.status == "error" and time.perf_counter() - start < 5
    finally:
        placement.set_no_workers_timeout(dc, None)


def test_client_rows_are_read_once_on_the_pinned_worker(cluster, tmp_path):
    dc, groups = cluster
    url = partitioned_store(str(tmp_path / "s.zarr"), clients=3, chunk_rows=50, name="p",
                            source="synthetic:classification?n_samples=300&n_features=4&seed=0")

    def rows_of(client):
        (X, y, Xt, yt), was_read = placement.client_rows(url, "p", client, test_fraction=0.2,
                                                         seed=0)
        return X.shape, len(yt), was_read

    for expected_read in (True, False):
        shape, n_test, was_read = dc.submit(rows_of, "2", pure=False,
                                            resources=placement.resources_of(["2"])).result()
        assert was_read is expected_read
    info = store.read_info(url)
    assert shape[0] + n_test == info.partitions["p"]["clients"]["2"]["n_rows"]
    workers = dc.cluster.workers
    holder = [w for w in workers.values() if "client-2" in w.state.total_resources][0]
    others = [w for w in workers.values() if w is not holder]
    assert {k[2] for k in placement.worker_cache(holder).rows} == {"2"}
    assert all(not placement.worker_cache(w).rows for w in others)


def _cache_sizes(dask_worker) -> dict[str, int]:
    cache = placement.worker_cache(dask_worker)
    return {"rows": len(cache.rows), "state": len(cache.state), "info": len(cache.info),
            "specs": len(cache.specs)}


def test_repartitioned_store_is_read_afresh_and_a_run_frees_its_cache(cluster, tmp_path):
    from fedpipe.data.partition import partition
    from fedpipe.engine.federate import federate
    from fedpipe.tasks import aggregate, models

    dc, _ = cluster
    url = partitioned_store(str(tmp_path / "s.zarr"), clients=3, chunk_rows=50, name="p",
                            source="synthetic:classification?n_samples=300&n_features=4&seed=5")
    kwargs = dict(rounds=2, lr=0.2, batch_size=16, partition="p", strategy=aggregate.scaffold())
    during: list[dict] = []

    def look(record):
        during.append(dc.run(_cache_sizes))

    def total(sizes, what):
        return sum(s[what] for s in sizes.values())

    before = dc.run(_cache_sizes)  # other tests' entries, if any
    first = federate(url, models.softmax(4, 2), dask_client=dc, on_record=look, **kwargs)
    assert [total(s, "rows") - total(before, "rows") for s in during] == [3, 3]
    assert [total(s, "state") - total(before, "state") for s in during] == [3, 3]
    assert dc.run(_cache_sizes) == before  # the run's rows and state are gone
    partition(url, clients=3, seed=1, name="p")  # same name, same client ids, other rows
    second = federate(url, models.softmax(4, 2), dask_client=dc, **kwargs)
    with placement.simulation_cluster([["0", "1"], ["2"]], processes=False,
                                      dashboard_address=":0") as fresh:
        reference = federate(url, models.softmax(4, 2), dask_client=fresh, **kwargs)
    np.testing.assert_array_equal(second.params, reference.params)  # the new rows were used
    assert not np.array_equal(first.params, second.params)


def test_cache_frees_rows_only_when_no_run_uses_them(cluster, tmp_path):
    dc, _ = cluster
    url = partitioned_store(str(tmp_path / "s.zarr"), clients=3, chunk_rows=50, name="p",
                            source="synthetic:classification?n_samples=300&n_features=4&seed=6")

    def use_then_free(client, runs, free):
        for run in runs:
            placement.client_rows(url, "p", client, test_fraction=0.2, seed=0, run=run)
        cache = placement.worker_cache()
        version = placement.rows_version(store.read_info(url), "p")
        return [cache.free(run) for run in free], sum(k[0] == version for k in cache.rows)

    pin = placement.resources_of(["2"])
    freed, left = dc.submit(use_then_free, "2", ["a", "b"], ["a"], pure=False,
                            resources=pin).result()
    assert (freed, left) == ([0], 1)  # run b still uses the rows
    freed, left = dc.submit(use_then_free, "2", [], ["b"], pure=False, resources=pin).result()
    assert (freed, left) == ([1], 0)
