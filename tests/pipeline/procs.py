"""Real Dask clusters as subprocesses, for tests that kill one of their processes by PID.

Every process is started here and stopped here by its own PID (never by name). The scheduler
and the workers are separate processes so a test can SIGKILL the scheduler alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Single-threaded BLAS, and only errors in the logs: the processes share 2 cores with the test.
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "DASK_LOGGING__DISTRIBUTED": "error"}


def dask_process(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m dask ARGS`` with its output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **ENV, **(env or {})})


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after 20 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Cluster:
    """A running scheduler process and one ``dask worker`` process with its nannies."""

    address: str
    scheduler: subprocess.Popen
    workers: subprocess.Popen
    extra: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for proc in (self.workers, *self.extra, self.scheduler):
            stop(proc)


def wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def cluster(tmp: Path, nworkers: int = 2, scheduler_args: tuple[str, ...] = (),
            worker_args: tuple[str, ...] = (), client_security=None,
            env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """``dask scheduler`` + ``dask worker --nworkers N --nanny`` on loopback, free ports."""
    from distributed import Client

    tmp.mkdir(parents=True, exist_ok=True)
    scheduler_file, log = tmp / "scheduler.json", tmp / "cluster.log"
    scheduler_file.unlink(missing_ok=True)
    scheduler = dask_process("scheduler", "--host", "127.0.0.1", "--port", "0",
                             "--no-dashboard", "--scheduler-file", str(scheduler_file),
                             *scheduler_args, log=log, env=env)
    workers = None
    try:
        wait_for_file(scheduler_file)
        time.sleep(0.2)  # the file is written before it is complete on a busy machine
        address = json.loads(scheduler_file.read_text())["address"]
        workers = dask_process("worker", address, "--nworkers", str(nworkers), "--nthreads", "1",
                               "--nanny", "--host", "127.0.0.1", "--no-dashboard",
                               "--memory-limit", "0", *worker_args, log=log, env=env)
        with Client(address, timeout="30s", security=client_security) as dc:
            dc.wait_for_workers(nworkers, timeout=60)
        running = Cluster(address, scheduler, workers)
        yield running
    finally:
        for proc in (workers, scheduler):
            if proc is not None:
                stop(proc)
