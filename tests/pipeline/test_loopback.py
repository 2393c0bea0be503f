"""Clusters fedpipe starts itself serve this machine only: nothing they open listens on every
interface (scheduler, workers, nannies and all their HTTP servers, in this process and in the
worker processes)."""

from __future__ import annotations

import urllib.request

import psutil
import pytest
from fedpipe import cluster
from fedpipe.engine import placement

_ANY = {"0.0.0.0", "::", ""}


def _listening() -> set[tuple[int, str, int]]:
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return {(p.pid, c.laddr.ip, c.laddr.port) for p in procs
            for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def _assert_loopback_only(dask_client, before):
    opened = _listening() - before
    assert len(opened) >= 2  # the dashboard and a worker's HTTP server at least (inproc: no port)
    assert not [s for s in opened if s[1] in _ANY], opened
    assert all(ip.startswith("127.") for _, ip, _ in opened), opened
    link = cluster.dashboard_link(dask_client)
    with urllib.request.urlopen(link.replace("/status", "/health"), timeout=10) as reply:
        assert reply.status == 200  # the link printed to the user reaches the dashboard


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_train_cluster_listens_on_loopback_only(processes):
    before = _listening()
    with cluster.connect(workers=1, threads=1, processes=processes) as dc:
        _assert_loopback_only(dc, before)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_federate_simulation_cluster_listens_on_loopback_only(processes):
    before = _listening()
    # ":8787"-style addresses (the demo's default) name no host: Dask would read every interface
    with placement.simulation_cluster([["0"], ["1"]], processes=processes,
                                      dashboard_address=":0") as dc:
        _assert_loopback_only(dc, before)


def test_loopback_address_keeps_explicit_hosts():
    assert cluster.loopback_address(":8787") == "127.0.0.1:8787"
    assert cluster.loopback_address("0.0.0.0:0") == "127.0.0.1:0"
    assert cluster.loopback_address("10.1.2.3:8787") == "10.1.2.3:8787"
    assert cluster.loopback_address(None) is None


def test_in_process_cluster_runs_no_worker_profiler():
    # The profiler's sys._current_frames() deadlocked CPython 3.11 with the GIL held
    # (tests/conftest.py); connect() turns it off even where the user's config turns it on.
    import dask

    with dask.config.set({"distributed.worker.profile.enabled": True}), \
            cluster.connect(workers=1, threads=1, processes=False) as dc:
        flags = dc.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert flags and not any(flags.values())


@pytest.mark.worker_processes
def test_local_processes_is_the_default_and_a_dask_config_key():
    import os

    import dask

    assert cluster.local_processes() is True
    with dask.config.set({"fedpipe.local-processes": False}):
        with cluster.connect(workers=2, threads=1) as dc:  # worker threads of this process
            assert set(dc.run(os.getpid).values()) == {os.getpid()}
    with cluster.connect(workers=1, threads=1) as dc:
        assert set(dc.run(os.getpid).values()) != {os.getpid()}
