"""Shared fixtures: small real zarr stores on disk under pytest's ``tmp_path``, and a cluster."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import dask
import numpy  # noqa: F401  (loaded before threadpool_limits below, so that it reaches OpenBLAS)
import pytest
from distributed import Client, LocalCluster
from fedpipe.data.ingest import ingest
from threadpoolctl import threadpool_limits

# Test clusters run their workers as threads of this process; several threads each calling a
# multi-threaded OpenBLAS at once oversubscribe two CI cores and once hung the suite. One BLAS
# thread per call is what dask's nanny gives process workers too (OMP_NUM_THREADS=1).
threadpool_limits(limits=1)

# The suite's hang (tests/pipeline/test_estimators.py, caught again with gdb): on CPython 3.11,
# sys._current_frames() holds the runtime's thread-list lock while it makes frame objects; a GC
# run there that frees a threading.local takes that lock again and deadlocks holding the GIL
# (CPython gh-106883, fixed in 3.12), so no other thread, and no signal handler, runs again.
# distributed's worker profiler calls it every 10 ms on in-process workers' event loop.
dask.config.set({"distributed.worker.profile.enabled": False})


@pytest.fixture(autouse=True)
def thread_workers(request):
    """Clusters that fedpipe starts itself (a CLI command or ``fit``/``federate`` without a
    cluster) run worker threads here, not processes: the same bits, seconds less per command.

    Serialisation to real worker processes, kills and restarts are tested where they are the
    subject: tests with their own process clusters, and tests marked ``worker_processes``,
    which keep fedpipe's default.
    """
    if request.node.get_closest_marker("worker_processes"):
        yield
        return
    with dask.config.set({"fedpipe.local-processes": False}):
        yield


@pytest.fixture(scope="module")
def dask_client():
    """A real two-worker cluster (in-process workers, one thread each), one per test module.

    Modules that need other workers (client resources, processes) define their own.
    """
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        yield dask_client


@pytest.fixture
def small_store(tmp_path) -> Callable[..., str]:
    """Factory: ``small_store(source=..., chunk_rows=..., **ingest_options) -> store path``.

    The default is a 3-class synthetic problem of 600 rows x 5 features in 6 chunks of 100
    rows. Each call writes a fresh store under ``tmp_path``; extra keywords go to
    :func:`fedpipe.data.ingest.ingest` (``standardize=True``, ``dtype="float32"``, ...).
    """
    counter = itertools.count()

    def make(
        source: str = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=0",
        chunk_rows: int = 100,
        **options,
    ) -> str:
        path = str(tmp_path / f"store-{next(counter)}.zarr")
        ingest(source, path, chunk_rows=chunk_rows, progress=False, **options)
        return path

    return make
