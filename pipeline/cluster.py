"""Getting a Dask ``distributed`` client: a fresh LocalCluster or an existing scheduler.

Everything that talks to a cluster takes a ``dask_client``; this module is where one comes from
and where cluster-wide facts (dashboard link, memory) are read.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster
from fedpipe.errors import InfrastructureError, ValidationError

log = logging.getLogger("fedpipe")

# One BLAS thread per worker thread: two worker processes each running a multithreaded BLAS
# oversubscribe the cores and run slower than one process (see benchmarks/bench_train.py).
_SINGLE_THREADED_BLAS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


PRELOAD = "fedpipe.preload"


def local_processes() -> bool:
    """Whether the clusters fedpipe starts itself run their workers as processes (default).

    Dask's configuration key ``fedpipe.local-processes`` (``DASK_FEDPIPE__LOCAL_PROCESSES=False``
    in the environment) switches them to threads of the driver's process: a cluster starts in
    a fraction of a second instead of seconds, results are the same bits, but a worker cannot
    be killed or restarted on its own. A cluster given with ``--scheduler`` is not affected.
    """
    import dask

    return bool(dask.config.get("fedpipe.local-processes", True))


@contextlib.contextmanager
def connect(
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    security: Any = None,
    **cluster_kwargs: Any,
) -> Iterator[Client]:
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else to a new LocalCluster.

    Parameters
    ----------
    workers, threads : int, optional
        Worker processes and threads per worker of the LocalCluster (Dask's defaults when
        ``None``). Ignored, with a warning, when ``scheduler`` is given.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); the cluster is not closed on exit.
    security : distributed.Security, optional
        TLS settings for either kind of cluster.
    **cluster_kwargs
        Passed to :class:`distributed.LocalCluster` (e.g. ``processes=False``,
        ``dashboard_address=":0"``, ``memory_limit="2GiB"``).

    Yields
    ------
    distributed.Client
    """
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise ValidationError(f"{name} must be at least 1, got {value}")
    if scheduler is not None:
        if workers is not None or threads is not None:
            log.warning("--workers/--threads are ignored with --scheduler %s", scheduler)
        _check_scheduler(scheduler, security)
        try:
            dask_client = Client(scheduler, security=security, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise InfrastructureError(f"cannot reach scheduler {scheduler}: {exc}") from exc
        with dask_client:
            log.info("dashboard: %s", dashboard_link(dask_client))
            try:
                yield dask_client
            except Exception as exc:
                if scheduler_lost(dask_client, exc):
                    raise SchedulerLostError(scheduler) from exc
                raise
        return
    cluster_kwargs.setdefault("processes", local_processes())
    # A local cluster serves this machine only: every server it opens (scheduler, workers and
    # their HTTP servers) listens on loopback, never on all interfaces. Threads-only clusters
    # talk over inproc://, which takes no host, but their HTTP servers still listen.
    if cluster_kwargs.get("processes", True):
        cluster_kwargs.setdefault("host", LOOPBACK)
    cluster_kwargs["dashboard_address"] = loopback_address(
        cluster_kwargs.get("dashboard_address", ":0"))  # ":0" never fights over port 8787
    cluster_kwargs["worker_dashboard_address"] = loopback_address(
        cluster_kwargs.get("worker_dashboard_address", ":0"))
    cluster_kwargs.setdefault("env", dict(_SINGLE_THREADED_BLAS))
    # A worker (and one its nanny restarts) imports fedpipe's task modules before it takes
    # work, not during the first task it is given (see fedpipe.preload).
    cluster_kwargs.setdefault("preload", [PRELOAD])
    cluster_kwargs.setdefault("silence_logs", worker_log_level())
    settings: dict = {"distributed.scheduler.work-stealing": False}
    if cluster_kwargs.get("processes", True):
        # A second copy of fit's loaded blocks, so a killed worker costs no re-read
        # (fedpipe.resilience.KeepLoadedTwice, which drops other keys' extra copies as Dask does).
        settings["distributed.scheduler.active-memory-manager.policies"] = [
            {"class": "fedpipe.resilience.KeepLoadedTwice"}]
    if cluster_kwargs.get("processes") is False:
        cluster_kwargs.pop("env")  # threads share the driver's environment; Worker has no env
        cluster_kwargs.pop("preload")  # threads share the driver's imports too
        # In-process workers' profiler calls sys._current_frames() every 10 ms, which can
        # deadlock CPython 3.11 with the GIL held (seen as a hung test; tests/conftest.py).
        settings["distributed.worker.profile.enabled"] = False
    # Every task runs where its chunks already sit in memory; work stealing can only move one
    # (and its chunks) to another worker, which showed up as 0.5 s stalls in L-BFGS passes.
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=workers, threads_per_worker=threads, security=security, **cluster_kwargs
        ) as cluster,
        Client(cluster, security=security) as dask_client,
    ):
        log.info("dashboard: %s", dashboard_link(dask_client))
        yield dask_client


class SchedulerLostError(InfrastructureError):
    """The scheduler of ``--scheduler ADDRESS`` went away mid-run (exit 3 from the CLI)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"lost the Dask scheduler {address} mid-run")
        self.address = address


# Dask cancels a client's futures with this reason when its scheduler connection drops.
_LOST_REASON = "scheduler-connection-lost"
_LOST_WAIT_SECONDS = 2.0


def scheduler_lost(dask_client: Client, exc: BaseException) -> bool:
    """Whether ``exc`` ended a run because ``dask_client`` lost its scheduler.

    Dask reports the loss as cancelled futures, a closed comm, an ``OSError`` or a timeout,
    depending on what the driver was waiting for; the client's own status says which it was
    (``"connecting"`` while it retries, then ``"closed"``). The status may trail the error that
    the dropped connection raised, hence a short wait before answering no.
    """
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    chain = [exc]
    while chain[-1].__context__ is not None and len(chain) < 10:  # a cleanup may raise anew
        chain.append(chain[-1].__context__)
    if dask_client.status != "running" or any(_LOST_REASON in str(e) for e in chain):
        return True
    if not isinstance(exc, CancelledError | CommClosedError | OSError | TimeoutError):
        return False
    deadline = time.monotonic() + _LOST_WAIT_SECONDS
    while dask_client.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    return dask_client.status != "running"


LOOPBACK = "127.0.0.1"


def loopback_address(address: str | None) -> str | None:
    """``address`` with loopback as its host when it names none (``":8787"`` -> loopback).

    Dask reads a host-less ``":PORT"`` dashboard address as "every interface"; the clusters
    fedpipe starts serve this machine only.
    """
    if address is None:
        return None
    host, sep, port = str(address).rpartition(":")
    return f"{LOOPBACK}:{port}" if sep and host in ("", "0.0.0.0", "[::]", "::") else address


def worker_log_level() -> int:
    """Log level for the workers of a cluster fedpipe starts: as quiet as the driver's
    ``distributed`` logger (the CLI raises it to CRITICAL unless ``-v``), so a task's failure
    reaches the user as fedpipe's one line, not as the workers' tracebacks."""
    return max(logging.getLogger("distributed").getEffectiveLevel(), logging.WARNING)


# A Dask server sends its handshake first: an 8-byte frame length, then msgpack. A reply that
# is silent or starts with a huge length is another service (HTTP, SSH...), which Dask itself
# would try to read as a frame of exabytes.
_HANDSHAKE_MAX = 64 * 2**20
_PROBE_SECONDS = 5.0


def _check_scheduler(address: str, security: Any) -> None:
    """Refuse in one line an address Dask cannot use, before Dask tries to."""
    scheme, _, hostport = address.rpartition("://")
    if scheme == "tls" and security is None and not dask.config.get(
            "distributed.comm.tls.ca-file", None):
        raise ValidationError(
            f"--scheduler {address}: TLS needs certificates; set DASK_DISTRIBUTED__COMM__TLS__"
            "CA_FILE, ..._CLIENT__CERT and ..._CLIENT__KEY (docs/kubernetes.md)")
    if scheme not in ("", "tcp"):
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ValidationError(f"--scheduler {address}: expected tcp://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), _PROBE_SECONDS) as sock:
            sock.settimeout(_PROBE_SECONDS)
            head = sock.recv(8, socket.MSG_WAITALL)
    except TimeoutError:
        head = b""
    except OSError as exc:
        raise InfrastructureError(f"cannot reach scheduler {address}: {exc}") from exc
    if len(head) < 8 or struct.unpack("<Q", head)[0] > _HANDSHAKE_MAX:
        raise ValidationError(f"--scheduler {address}: the service there is not a Dask "
                              "scheduler (it did not answer the Dask handshake)")


def dashboard_link(dask_client: Client) -> str | None:
    """The dashboard URL of the client's scheduler, or ``None`` when it runs without one."""
    try:
        link = dask_client.dashboard_link
    except (KeyError, AttributeError):
        return None
    # An inproc:// scheduler's link names the machine's address, but fedpipe's threads-only
    # clusters serve their dashboard on loopback only.
    if link and str(dask_client.scheduler.address).startswith("inproc://"):
        scheme, _, rest = link.partition("://")
        link = f"{scheme}://{LOOPBACK}:{rest.partition(':')[2]}"
    return link


def cluster_memory(dask_client: Client) -> int:
    """Bytes the workers may hold together (their memory limits; RAM when unlimited)."""
    workers = dask_client.scheduler_info(n_workers=-1)["workers"].values()
    limits = [w.get("memory_limit") or 0 for w in workers]
    if limits and all(limits):
        return int(sum(limits))
    import psutil  # a dependency of distributed

    return int(psutil.virtual_memory().total)


def _max_rss_bytes() -> int:
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's memory at
    # fork time, which exec does not reset (a nanny forked from a big driver looks big).
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage if sys.platform == "darwin" else usage * 1024)  # Linux reports KiB


def peak_worker_memory(dask_client: Client) -> int:
    """Largest peak resident memory (bytes) of any worker process since it started.

    With ``processes=False`` the workers live in the driver's process, so this is its peak.
    """
    peaks = dask_client.run(_max_rss_bytes)
    return max(peaks.values(), default=0)


def n_workers(dask_client: Client) -> int:
    """How many workers the scheduler knows of now."""
    return len(dask_client.scheduler_info(n_workers=-1)["workers"])
