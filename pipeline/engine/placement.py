"""Where federated clients live: client -> worker mapping, resources, and rows cached on workers.

A client is pinned by the worker resource ``client-<id>=1``, put on every ``submit`` (never by
worker address, which changes when a nanny restarts a worker, and never with ``dask.annotate``,
which graph optimisation drops). A client's rows are read *inside* its pinned tasks and kept in a
per-worker cache (a :class:`ClientCache` worker plugin) that the scheduler does not know about:
``retire_workers``, ``rebalance`` and ``replicate`` only move Dask results, so the rows never
leave their worker; only model-sized packets do. A restarted worker starts with an empty cache
and re-reads its clients' rows on first use.

In simulation many clients share a worker (:func:`assign_clients`, balanced by rows) and
:func:`simulation_cluster` starts workers carrying those resources; in deployment the workers
are started elsewhere with ``--resources client-<id>=1`` and :func:`discover` finds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dask
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, Future, Nanny, Scheduler, SpecCluster, Worker, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from fedpipe.cluster import LOOPBACK, local_processes, loopback_address, worker_log_level
from fedpipe.data import store
from fedpipe.errors import TrainingError

log = logging.getLogger("fedpipe")

RESOURCE_PREFIX = "client-"
CACHE_PLUGIN = "fedpipe-client-cache"
SITE_SCHEME = "fedpipe-site:"  # fedpipe.data.sites.SCHEME (that module imports this one)
# One BLAS thread per worker process: more oversubscribes the cores (see pipeline/cluster.py).
_BLAS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def resource_name(client: str) -> str:
    """The worker resource that pins ``client``: ``client-<id>``."""
    return f"{RESOURCE_PREFIX}{client}"


def resources_of(clients: Sequence[str]) -> dict[str, float]:
    """Resource restriction of a task that needs every client of ``clients`` on its worker."""
    return {resource_name(c): 1 for c in clients}


def pin_group(group: Sequence[str]) -> dict[str, float]:
    """Resource restriction of a task for a :func:`discover` group: its first client's only.

    Every client of a group sits on the same workers, so one resource pins the task as surely
    as all of them, and the scheduler and worker check one resource instead of hundreds.
    """
    return resources_of(list(group)[:1])


def submit_pinned(dask_client: Client,
                  calls: Mapping[str, tuple[Callable[[], Any], Mapping[str, float]]]) -> list[Future]:
    """Submit ``key -> (thunk, resources)`` as ONE graph; futures in the order of ``calls``.

    ``Client.submit`` sends one ``update-graph`` message per task and the client's batched
    stream holds each one after the first for up to 10 ms, so the second worker of a round
    started late (~4 ms a round, median, on a loaded 2-core machine). Each task's restriction
    rides as its own layer's annotation; ``Client.get`` does not optimise the graph, so the
    annotation is not dropped (the ``dask.annotate`` trap is graph optimisation).
    """
    layers = {key: MaterializedLayer({key: (thunk,)}, annotations={"resources": dict(res)})
              for key, (thunk, res) in calls.items()}
    graph = HighLevelGraph(layers, {key: set() for key in layers})
    return dask_client.get(graph, list(calls), sync=False)


def assign_clients(rows: Mapping[str, int], n_workers: int) -> list[list[str]]:
    """Deterministic client -> worker mapping balanced by rows (longest-processing-time first).

    Clients are taken by decreasing row count (ties by id) and each goes to the worker with the
    fewest rows so far (ties to the lowest index). Same input, same mapping, on any machine.

    Returns
    -------
    list of list of str
        ``groups[j]``: sorted client ids of worker ``j`` (empty lists dropped).
    """
    if n_workers < 1:
        raise TrainingError(f"--workers must be at least 1, got {n_workers}")
    load = [0] * n_workers
    groups: list[list[str]] = [[] for _ in range(n_workers)]
    for client in sorted(rows, key=lambda c: (-int(rows[c]), _order(c))):
        j = min(range(n_workers), key=lambda i: (load[i], i))
        load[j] += int(rows[client])
        groups[j].append(client)
    return [sorted(g, key=_order) for g in groups if g]


def _order(client: str) -> tuple[int, str]:
    # Numeric ids sort as numbers ("2" before "10"), others after them by name.
    return (int(client), "") if str(client).isdigit() else (1 << 62, str(client))


def sort_clients(clients: Sequence[str]) -> list[str]:
    """Client ids in the canonical order used for sums and logs (numeric ids as numbers)."""
    return sorted(clients, key=_order)


@contextlib.contextmanager
def simulation_cluster(groups: Sequence[Sequence[str]], *, processes: bool | None = None,
                       threads: int = 1, dashboard_address: str | None = ":0",
                       worker_kwargs: Mapping[str, Any] | None = None) -> Iterator[Client]:
    """A local cluster with one worker per group, carrying the group's client resources.

    Parameters
    ----------
    groups : sequence of sequence of str
        Clients of each worker (e.g. from :func:`assign_clients`).
    processes : bool, optional
        Nanny-managed worker processes (a killed worker restarts with the same resources);
        ``False`` runs workers in this process (fast tests, inspectable ``Worker`` objects).
        Default: :func:`fedpipe.cluster.local_processes` (True unless configured).
    threads : int
        Threads per worker.
    dashboard_address : str or None
        Scheduler dashboard (``":0"`` picks a free port).
    worker_kwargs : mapping, optional
        Extra keyword arguments for each worker (e.g. ``memory_limit``).

    Yields
    ------
    distributed.Client
    """
    if processes is None:
        processes = local_processes()
    cls = Nanny if processes else Worker
    extra = dict(worker_kwargs or {})
    # A simulation serves this machine only: scheduler, workers and their HTTP servers listen on
    # loopback (Dask reads a host-less ":0" as every interface); ":0" never fights over 8787.
    extra.setdefault("host", LOOPBACK)
    extra["dashboard_address"] = loopback_address(extra.get("dashboard_address", ":0"))
    if processes:
        extra.setdefault("env", dict(_BLAS_ENV))
        # Worker processes log every connection at INFO; keep the CLI's stderr readable.
        extra.setdefault("silence_logs", worker_log_level())
    workers = {
        f"fed-{j}": {"cls": cls, "options": {"nthreads": threads, "resources": resources_of(g),
                                             **extra}}
        for j, g in enumerate(groups)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": loopback_address(
                                                   dashboard_address),
                                               "host": extra["host"]}}
    # Nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers by default; glibc then unmaps
    # every large temporary (each epoch's shuffled copy of a client's rows) and local training
    # runs 2.5x slower on page faults. Client rows stay cached all run, so trimming saves little.
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    # Every task is pinned by resources, so work stealing has nothing to steal and only costs
    # its periodic balancing on the driver's scheduler; the workers' statistical profiler wakes
    # every 10 ms to walk stacks, taking the GIL from local training on a busy machine.
    quiet = {"distributed.nanny.pre-spawn-environ": environ,
             "distributed.scheduler.work-stealing": False,
             "distributed.worker.profile.enabled": False}
    with (dask.config.set(quiet),
          SpecCluster(workers=workers, scheduler=scheduler, name="fedpipe-federate") as cluster,
          Client(cluster) as dask_client):
        yield dask_client


def discover(dask_client: Client, clients: Sequence[str]) -> list[list[str]]:
    """Group the partition's clients by the workers that carry their resources.

    Clients whose resources sit on the same set of workers form one group (one batched task per
    round can train them all). Raises :class:`TrainingError` naming the clients no worker carries.
    """
    workers = dask_client.scheduler_info(n_workers=-1)["workers"]
    holders: dict[str, frozenset[str]] = {}
    for client in clients:
        name = resource_name(client)
        holders[client] = frozenset(a for a, w in workers.items()
                                    if w.get("resources", {}).get(name))
    missing = sort_clients([c for c, h in holders.items() if not h])
    if missing:
        shown = ", ".join(resource_name(c) for c in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise TrainingError(f"no worker carries resource {shown}{more} ({len(workers)} workers "
                            f"for {len(clients)} clients): start workers with --resources "
                            f"client-<id>=1 for every client, or with no client resources "
                            f"(then fedpipe assigns the clients)")
    by_holders: dict[frozenset[str], list[str]] = {}
    for client in sort_clients(list(clients)):
        by_holders.setdefault(holders[client], []).append(client)
    return sorted(by_holders.values(), key=lambda g: _order(g[0]))


def set_no_workers_timeout(dask_client: Client, seconds: float | None) -> None:
    """Make tasks whose client worker is gone fail after ``seconds`` instead of waiting forever.

    Set on the running scheduler (``distributed.scheduler.no-workers-timeout``), so it also
    applies to an external scheduler started without it.
    """
    dask_client.run_on_scheduler(_set_timeout, seconds)


def _set_timeout(seconds: float | None, dask_scheduler: Scheduler | None = None) -> None:
    dask_scheduler.no_workers_timeout = seconds


# --------------------------------------------------------------------------------------------
# worker side: runs inside pinned tasks


class ClientCache(WorkerPlugin):
    """Per-worker store of client rows and client state, invisible to the scheduler.

    Attributes
    ----------
    rows : dict
        ``(version, partition, client, test_fraction, seed) -> (X_train, y_train, X_test,
        y_test)``, ``version`` from :func:`rows_version`: a re-partitioned or rewritten store
        gets new keys, never the rows read before.
    runs : dict
        ``rows key -> set of run tokens`` using those rows; :meth:`free` drops rows no run uses.
    state : dict
        ``(run_token, client) -> dict of arrays`` (e.g. SCAFFOLD's control variate).
    info : dict
        ``(url, run_token) -> (StoreInfo, zarr.Group)``: the store opened once per run, not once
        per chunk (with 10,000 clients the root metadata alone is megabytes).
    specs : dict
        ``run_token -> object``: a run's unpickled task settings (model, stages), unpickled once.
    reads : int
        Clients read from the store by this worker process (a restarted worker starts at 0).
    """

    name = CACHE_PLUGIN

    def __init__(self) -> None:
        self.rows: dict[tuple, tuple[np.ndarray, ...]] = {}
        self.runs: dict[tuple, set[str]] = {}
        self.state: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.info: dict[tuple[str, str], tuple[store.StoreInfo, Any]] = {}
        self.specs: dict[str, Any] = {}
        self.reads = 0

    def free(self, run: str) -> int:
        """Drop run ``run``'s entries, and rows no other run uses; returns rows dropped."""
        for key in [k for k, runs in self.runs.items() if run in runs]:
            self.runs[key].discard(run)
        unused = [k for k, runs in self.runs.items() if not runs]
        for key in unused:
            del self.runs[key]
            self.rows.pop(key, None)
        for key in [k for k in self.state if k[0] == run]:
            del self.state[key]
        for key in [k for k in self.info if k[1] == run]:
            del self.info[key]
        self.specs.pop(run, None)
        return len(unused)


def worker_cache(worker: Worker | None = None) -> ClientCache:
    """The :class:`ClientCache` of the current worker, created on first use."""
    worker = worker or get_worker()
    cache = worker.plugins.get(CACHE_PLUGIN)
    if cache is None:
        cache = worker.plugins[CACHE_PLUGIN] = ClientCache()
    return cache


def _stack(chunks: list[tuple[np.ndarray, np.ndarray]], n_features: int
           ) -> tuple[np.ndarray, np.ndarray]:
    if not chunks:
        return np.zeros((0, n_features)), np.zeros(0)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def rows_version(info: store.StoreInfo, partition: str) -> str:
    """A digest of what a partition's rows are made of, the key of the rows cached on workers.

    The store's content hash and layout, its preprocessing, and the partition's own metadata
    (scheme, seed, every client's size and label histogram): re-partitioning under the same
    name or re-ingesting at the same URL changes it, so no worker serves the rows read before;
    two copies of one store share their rows.
    """
    # A store written without a content hash is told apart by its location instead.
    facts = {"content_hash": info.content_hash or f"url:{info.url}", "n_rows": info.n_rows,
             "n_features": info.n_features, "chunk_rows": info.chunk_rows, "dtype": info.dtype,
             "preprocess": info.preprocess, "stats": info.stats,
             "partition": [partition, info.partitions.get(partition)]}
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def client_rows(url: str, partition: str, client: str, *, test_fraction: float,
                seed: int, run: str = "", version: str | None = None
                ) -> tuple[tuple[np.ndarray, ...], bool]:
    """A client's train and test rows on this worker, read from the store on first use.

    ``run`` (the run's token) scopes the cached store metadata to one run and marks the rows as
    used by it (:meth:`ClientCache.free`). ``version`` is :func:`rows_version` of the store's
    partition, computed by the caller once per run (else here, from the store's metadata).

    Returns
    -------
    ((X_train, y_train, X_test, y_test), was_read)
    """
    if url.startswith(SITE_SCHEME):  # a site-local run: the worker's own store, not ``url``
        from fedpipe.data import sites

        return sites.site_rows(url, client, test_fraction=test_fraction, seed=seed, run=run,
                               version=version)
    cache = worker_cache()
    if (url, run) not in cache.info:
        group = store.open_group(url)
        cache.info[(url, run)] = (store.read_info(url), group)
    info, group = cache.info[(url, run)]
    version = version or rows_version(info, partition)
    key = (version, partition, str(client), float(test_fraction), int(seed))
    cache.runs.setdefault(key, set()).add(run)
    if key in cache.rows:
        return cache.rows[key], False
    sides: tuple[list, list] = ([], [])  # each chunk read once, then split both ways
    for ref in store.chunk_refs(info, partition=partition, client=client):
        X, y = store.read_chunk(url, ref, info=info, group=group)
        for side, rows in zip(sides, store.split_rows(X, y, ref, test_fraction=test_fraction,
                                                      seed=seed), strict=True):
            side.append(rows)
    cache.rows[key] = tuple(part for side in sides for part in _stack(side, info.n_features))
    cache.reads += 1
    return cache.rows[key], True


@contextlib.contextmanager
def run_scope(dask_client: Client, run: str) -> Iterator[None]:
    """Free run ``run``'s rows and state on every worker when the block ends, however it ends.

    Rows another run still uses stay. A worker that is gone took its cache with it.
    """
    try:
        yield
    finally:
        # A lost cluster has nothing to free (and asking a lost scheduler waits out timeouts).
        with contextlib.suppress(OSError, TimeoutError):
            if dask_client.status == "running":
                dask_client.run(_free_run, run, on_error="ignore")


def _free_run(run: str, dask_worker: Worker | None = None) -> int:
    return worker_cache(dask_worker).free(run)
