"""Federated runs on a cluster of plain ``dask worker`` processes that declare no resources.

The scheduler and the workers are real subprocesses started with the ``dask`` command, as a
user would, on loopback with free ports (``--port 0`` and a scheduler file). fedpipe lends the
workers their clients' ``client-<id>`` resources for the run (:mod:`fedpipe.engine.lend`); a
worker process killed by SIGKILL is restarted by its nanny and gets its clients back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client
from fedpipe.data import store
from fedpipe.data.ingest import ingest
from fedpipe.engine import lend, placement
from fedpipe.engine.federate import federate
from fedpipe.tasks import models
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=4"
N_CLIENTS = 6
# Single-threaded BLAS, and only errors on stderr: the workers share 2 cores with the test.
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "DASK_LOGGING__DISTRIBUTED": "error"}


def _dask(*args: str, log: Path) -> subprocess.Popen:
    # The test's helpers below run on the workers and the scheduler: they import this module.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV, "PYTHONPATH": path})


def _start_workers(scheduler_file: Path, nworkers: int, log: Path) -> subprocess.Popen:
    return _dask("worker", "--scheduler-file", str(scheduler_file), "--nworkers", str(nworkers),
                 "--nthreads", "1", "--nanny", "--host", "127.0.0.1", "--no-dashboard",
                 "--memory-limit", "0", log=log)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def plain_cluster(tmp: Path, nworkers: int = 2) -> Iterator[tuple[str, Path]]:
    """``dask scheduler`` and ``dask worker --nworkers N --nanny``; yields (address, file)."""
    scheduler_file, log = tmp / "scheduler.json", tmp / "cluster.log"
    procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(scheduler_file), log=log)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(_start_workers(scheduler_file, nworkers, log))
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as dc:
            dc.wait_for_workers(nworkers, timeout=60)
            address = dc.scheduler.address
        yield address, scheduler_file
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _report(dask_worker) -> dict:
    cache = placement.worker_cache(dask_worker)
    lent = {r[len(placement.RESOURCE_PREFIX):] for r, q in dask_worker.state.total_resources.items()
            if r.startswith(placement.RESOURCE_PREFIX) and q > 0}
    return {"pid": os.getpid(), "nanny": dask_worker.nanny, "resident": sorted(lent),
            "cached": sorted({k[2] for k in cache.rows}), "reads": cache.reads}


def _scheduler_view(dask_scheduler=None) -> dict:
    mine = lend.PLUGIN_PREFIX
    return {"plugins": sorted(n for n in dask_scheduler.plugins if n.startswith(mine)),
            "worker_plugins": sorted(n for n in dask_scheduler.worker_plugins
                                     if n.startswith(mine)),
            "lent": sorted(r for ws in dask_scheduler.workers.values()
                           for r, q in ws.resources.items() if q > 0)}


def _assert_nothing_left(dc: Client) -> None:
    assert dc.run_on_scheduler(_scheduler_view) == {"plugins": [], "worker_plugins": [],
                                                    "lent": []}
    assert all(not r["resident"] and not r["cached"] for r in dc.run(_report).values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with plain_cluster(tmp_path_factory.mktemp("plain")) as running:
        yield running


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("anyfed") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=N_CLIENTS, chunk_rows=50, name="fed")


def test_cli_federate_on_plain_dask_workers(cluster, tmp_path, capsys):
    from fedpipe.cli.main import main

    address, _ = cluster
    store_path = str(tmp_path / "s.zarr")
    ingest(SOURCE, store_path, chunk_rows=50, progress=False)
    out = tmp_path / "run"
    code = main(["federate", store_path, "--model", "softmax", "--clients", str(N_CLIENTS),
                 "--rounds", "2", "--scheduler", address, "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["clients"] == N_CLIENTS and summary["rounds"] == 2 and summary["dropped"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in records] == [N_CLIENTS, N_CLIENTS]
    with Client(address) as dc:
        _assert_nothing_left(dc)  # the cluster is as plain as before


def test_python_run_on_plain_workers_survives_a_killed_worker(cluster, fed_store, tmp_path):
    address, scheduler_file = cluster
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    events: dict = {}
    joiner: list[subprocess.Popen] = []
    with Client(address) as dc:
        def disrupt(record):
            events.setdefault("records", []).append(record)  # per-client records: on_record
            if record["round"] == 0:
                before = dc.run(_report)
                assert len(before) == 2 and all(r["resident"] for r in before.values())
                victim = min(before.values(), key=lambda r: r["resident"])
                events["before"], events["victim"] = before, victim
                os.kill(victim["pid"], signal.SIGKILL)  # the worker process, not its nanny
                # a worker that joins mid-run takes no clients
                joiner.append(_start_workers(scheduler_file, 1, tmp_path / "joiner.log"))
            if record["round"] == 3:
                dc.wait_for_workers(3, timeout=60)
                events["last"] = dc.run(_report)

        try:
            run = federate(fed_store, models.softmax(5, 3), rounds=4, lr=0.2, batch_size=16,
                           dask_client=dc, on_record=disrupt)
            _assert_nothing_left(dc)
        finally:
            for proc in joiner:
                _stop(proc)

    # The clients were balanced by rows over the two workers present at the start.
    expected = placement.assign_clients(rows, 2)
    assert sorted(r["resident"] for r in events["before"].values()) == sorted(expected)
    victim, last = events["victim"], events["last"]
    # The nanny restarted the killed worker (new process) and it carries its clients again ...
    back = [r for r in last.values() if r["nanny"] == victim["nanny"]]
    assert len(back) == 1 and back[0]["pid"] != victim["pid"]
    assert back[0]["resident"] == victim["resident"]
    assert back[0]["reads"] == len(victim["resident"])  # ... and re-read their rows there
    # The worker that joined mid-run has no clients and read no rows.
    nannies = {r["nanny"] for r in events["before"].values()}
    joined = [r for r in last.values() if r["nanny"] not in nannies]
    assert len(joined) == 1 and joined[0]["resident"] == [] and joined[0]["reads"] == 0
    # Every round aggregated every client, the killed worker's in the rounds after the kill.
    assert [r["aggregated"] for r in run.metrics] == [N_CLIENTS] * 4
    # round 0's record arrives once round 1 has trained (its evaluation rides on round 1)
    after = events["records"][2]["clients"]
    assert all(after[c]["read"] for c in victim["resident"])
    assert np.all(np.isfinite(run.params))


def test_declared_resources_are_discovered_not_lent(fed_store):
    # A deployment's workers carry client-<id> resources: nothing is lent, nothing changes.
    groups = [["0", "1", "2"], ["3", "4", "5"]]
    with placement.simulation_cluster(groups, processes=False, dashboard_address=":0") as dc:
        assert lend.declares_clients(dc)
        run = federate(fed_store, models.softmax(5, 3), rounds=1, dask_client=dc)
        assert run.metrics[0]["aggregated"] == N_CLIENTS
        assert dc.run_on_scheduler(_scheduler_view)["plugins"] == []
        resources = sorted(sorted(w["resources"]) for w in
                           dc.scheduler_info(n_workers=-1)["workers"].values())
        assert resources == [[f"client-{c}" for c in g] for g in groups]


def test_slot_is_the_given_name_else_the_nanny():
    assert lend.slot_of("pod-7", "tcp://10.0.0.1:4000", "tcp://10.0.0.1:3000") == "pod-7"
    assert lend.slot_of(0, "tcp://127.0.0.1:4000", None) == "0"
    unnamed = "tcp://127.0.0.1:4000"
    assert lend.slot_of(unnamed, unnamed, "tcp://127.0.0.1:3000") == "tcp://127.0.0.1:3000"
    assert lend.slot_of(unnamed, unnamed, None) == unnamed
