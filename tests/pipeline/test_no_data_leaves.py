"""Proof that a client's rows never leave its worker, even under retire/rebalance/kill.

A federated run on Nanny worker processes (a killed worker really dies and its nanny restarts
it) records every task result the scheduler sees (key, size, holders) with a scheduler plugin and
every worker-to-worker transfer from the workers' ``transfer_outgoing_log``. Between rounds the
test calls ``rebalance``, kills a worker process and gracefully retires another worker. Then:

* every Dask result that ever existed is model-sized (far smaller than any client's rows), so
  no key derived from raw rows can be moved by rebalance/retire/replicate, or be fetched;
* every transfer between workers carries only model-sized keys;
* each worker's row cache holds only clients whose ``client-<id>`` resource it carries, and the
  killed worker's clients are re-read on their restarted worker.

The same audit covers asynchronous (FedBuff) training and the site-local path.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from fedpipe.data import sites as site_tasks
from fedpipe.data import store
from fedpipe.engine import placement, sites
from fedpipe.engine.federate import federate
from fedpipe.tasks import fedbuff, models
from sites_support import ingest_site, site_rows
from test_federate_support import partitioned_store

N_FEATURES, N_CLIENTS = 20, 6
SOURCE = (f"synthetic:classification?n_samples=4800&n_features={N_FEATURES}"
          "&n_classes=2&seed=2")
# bytes: a round's report (42-param packet + a few metrics per client) is ~5 KiB; a client's
# training rows are ~100 KiB.
BOUND = 16384


class ResultRecorder(SchedulerPlugin):
    """Every key that reached memory: its size and every worker that held it."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.seen: dict[str, dict] = {}

    def transition(self, key, start, finish, *args, **kwargs):
        ts = self.scheduler.tasks.get(key)
        if finish == "memory" and ts is not None:
            entry = self.seen.setdefault(str(key), {"nbytes": 0, "holders": set()})
            entry["nbytes"] = max(entry["nbytes"], ts.nbytes)
            entry["holders"] |= {ws.address for ws in ts.who_has or ()}


def _outgoing(dask_worker):
    return [{"who": e["who"], "keys": {str(k): v for k, v in e["keys"].items()}}
            for e in dask_worker.transfer_outgoing_log]


def _cache_report(dask_worker):
    cache = placement.worker_cache(dask_worker)
    mine = {r[len(placement.RESOURCE_PREFIX):] for r in dask_worker.state.total_resources
            if r.startswith(placement.RESOURCE_PREFIX)}
    return {"cached": sorted(k[2] for k in cache.rows), "resident": sorted(mine),
            "reads": cache.reads, "pid": os.getpid()}


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("leak") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=N_CLIENTS, chunk_rows=100, name="fed")


def test_no_client_rows_leave_their_worker(fed_store):
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    row_bytes = min(rows.values()) * 0.8 * N_FEATURES * 8
    assert row_bytes > 5 * BOUND  # the size test below can tell rows from updates
    groups = placement.assign_clients(rows, 3)
    transfers: list[dict] = []
    events: dict[str, object] = {}
    with placement.simulation_cluster(groups, processes=True, dashboard_address=":0") as dc:
        recorder = ResultRecorder(dc.cluster.scheduler)
        dc.cluster.scheduler.add_plugin(recorder)
        by_worker = {w: _cache_report_of(dc, w) for w in dc.scheduler_info()["workers"]}
        victim, retiree = sorted(by_worker, key=lambda w: by_worker[w]["resident"])[:2]

        def disrupt(record):
            # round r's record (with its evaluation) arrives once round r + 1 has trained
            r = record["round"]
            events.setdefault("records", []).append(record)  # per-client records: on_record
            for logs in dc.run(_outgoing).values():
                transfers.extend(logs)
            if r == 0:
                dc.rebalance()
            elif r == 1:  # a real process death: the nanny restarts the worker, new address
                events["killed"] = by_worker[victim]["resident"]
                os.kill(by_worker[victim]["pid"], signal.SIGKILL)
            elif r == 2:  # round 3's record comes with round 4's trip: round 4 is next
                events["retired"] = by_worker[retiree]["resident"]
                dc.retire_workers([retiree], close_workers=True)
            elif r == 4:  # before the run ends and frees its rows
                events["caches"] = dc.run(_cache_report)

        run = federate(fed_store, models.softmax(N_FEATURES, 2), rounds=5, lr=0.1,
                       batch_size=32, deadline=10, dask_client=dc, on_record=disrupt)
        for logs in dc.run(_outgoing).values():
            transfers.extend(logs)
        caches = events["caches"]

    # 1. Every Dask result that ever existed is model-sized.
    assert recorder.seen, "the recorder saw no results"
    big = {k: v["nbytes"] for k, v in recorder.seen.items() if v["nbytes"] > BOUND}
    assert big == {}
    # 2. Every worker-to-worker transfer carried only model-sized keys.
    moved = {k: n for t in transfers for k, n in t["keys"].items() if n > BOUND}
    assert moved == {}
    # 3. Rows are cached only on the worker that carries the client's resource.
    assert any(report["cached"] for report in caches.values())
    for report in caches.values():
        assert set(report["cached"]) <= set(report["resident"])
    # The killed worker's clients came back and re-read their rows on their restarted worker.
    killed = events["killed"]
    restarted = [rep for rep in caches.values() if rep["resident"] == killed]
    assert restarted and restarted[0]["pid"] != by_worker[victim]["pid"]
    assert restarted[0]["reads"] == len(killed)
    reread = [c for rec in events["records"][2:] for c, m in rec["clients"].items() if m.get("read")]
    assert set(killed) <= set(reread)
    # The retired worker's clients were dropped from the last round, which still completed.
    last = run.metrics[-1]
    assert set(events["retired"]) <= set(last["dropped"])
    assert last["aggregated"] == N_CLIENTS - len(events["retired"])
    assert np.all(np.isfinite(run.params))


def test_asynchronous_rounds_move_no_client_rows(fed_store):
    """FedBuff (no round barrier, a version's tasks still in flight while the next starts):
    the same audit, on real arrival order, with a rebalance between versions."""
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    transfers: list[dict] = []
    events: dict[str, object] = {}
    mode = fedbuff.buffered(buffer_size=2, max_concurrency=4, clock="wall")
    with placement.simulation_cluster(placement.assign_clients(rows, 3), processes=False,
                                      dashboard_address="127.0.0.1:0") as dc:
        recorder = ResultRecorder(dc.cluster.scheduler)
        dc.cluster.scheduler.add_plugin(recorder)

        def disrupt(record):
            for logs in dc.run(_outgoing).values():
                transfers.extend(logs)
            if record["version"] == 2:
                dc.rebalance()
            events["caches"] = dc.run(_cache_report)

        run = federate(fed_store, models.softmax(N_FEATURES, 2), rounds=6, lr=0.1,
                       batch_size=32, mode=mode, dask_client=dc, on_record=disrupt)
        for logs in dc.run(_outgoing).values():
            transfers.extend(logs)
    assert recorder.seen and [r["version"] for r in run.metrics] == list(range(1, 7))
    assert {k: v["nbytes"] for k, v in recorder.seen.items() if v["nbytes"] > BOUND} == {}
    assert {k: n for t in transfers for k, n in t["keys"].items() if n > BOUND} == {}
    reports = events["caches"].values()
    assert any(report["cached"] for report in reports)
    assert all(set(report["cached"]) <= set(report["resident"]) for report in reports)


def _cache_report_of(dc, worker: str) -> dict:
    return dc.run(_cache_report, workers=[worker])[worker]


# Paths the driver process opened while an audit was on (sys.addaudithook cannot be removed:
# one hook for the module, switched on by _OPENED["on"]).
_OPENED: dict = {"on": False, "paths": []}


def _audit(event, args):
    if _OPENED["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED["paths"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _site_report(dask_worker):
    cache = placement.worker_cache(dask_worker)
    return {"store": os.environ.get(site_tasks.SITE_ENV), "cached": sorted(k[2] for k in cache.rows),
            "resident": sorted(r[len(placement.RESOURCE_PREFIX):]
                               for r in dask_worker.state.total_resources)}


def test_site_local_rows_and_stores_never_reach_the_driver(tmp_path):
    """The site-local path, statistics included: results and transfers are model-sized, each
    worker knows and caches only its own site, the driver process opens no site file."""
    parts = site_rows(n_sites=3, n_rows=4800, n_features=N_FEATURES, seed=1)
    urls = [ingest_site(tmp_path, f"site-{i}", X, y) for i, (X, y) in enumerate(parts)]
    assert min(len(y) for _, y in parts) * 0.8 * N_FEATURES * 8 > 5 * BOUND
    transfers: list[dict] = []
    events: dict[str, object] = {}
    with sites.site_cluster([([str(i)], u) for i, u in enumerate(urls)]) as dc:
        recorder = ResultRecorder(dc.cluster.scheduler)
        dc.cluster.scheduler.add_plugin(recorder)

        def disrupt(record):
            for logs in dc.run(_outgoing).values():
                transfers.extend(logs)
            if record["round"] == 0:
                dc.rebalance()
            events["caches"] = dc.run(_site_report)

        _OPENED.update(on=True, paths=[])
        try:
            plan = sites.prepare_sites(dc)
            run = sites.federate_sites(plan, models.softmax(N_FEATURES, 3), dask_client=dc,
                                       rounds=3, lr=0.1, deadline=30, on_record=disrupt)
        finally:
            _OPENED["on"] = False
        for logs in dc.run(_outgoing).values():
            transfers.extend(logs)
    assert recorder.seen
    assert {k: v["nbytes"] for k, v in recorder.seen.items() if v["nbytes"] > BOUND} == {}
    assert {k: n for t in transfers for k, n in t["keys"].items() if n > BOUND} == {}
    assert not [p for p in _OPENED["paths"] if str(tmp_path) in p]  # no site file, ever
    reports = sorted(events["caches"].values(), key=lambda r: r["resident"])
    assert [r["store"] for r in reports] == urls  # each worker was told its own store only
    assert [r["cached"] for r in reports] == [r["resident"] for r in reports] == [["0"], ["1"], ["2"]]
    assert run.summary["test_accuracy"] > 0.7
