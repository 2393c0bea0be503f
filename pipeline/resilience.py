"""What keeps a run going through worker faults: timeouts, and no irreplaceable data on workers.

Timeouts: nothing waits on a hung worker for longer than it must.

Dask's own bounds are generous: a worker that stops heartbeating (SIGSTOPped, swapped out, a
frozen VM) keeps its tasks for ``distributed.scheduler.worker-ttl`` (5 minutes), and a task whose
every possible worker is gone waits forever (``no-workers-timeout`` unset). A run sets both on
the running scheduler, so they also hold on a scheduler someone else started, and puts them back
when it ends:

- worker TTL: a silent worker is removed (or restarted by its nanny) and its tasks are redone
  elsewhere; ``clamp(2 x deadline, 5 s, 30 s)`` with a federated ``--deadline``, else 30 s
  (Dask never checks more often than 10 heartbeats, 5 s on a small cluster);
- no-workers timeout: a task no live worker may run fails after ``deadline`` (federated: the
  client is dropped from the round), else 60 s, instead of waiting forever;
- result fetches: :func:`fetch` bounds the transfer of a finished result from its worker.

Data: what a run ships once to the workers (the model, large parameters) goes as the result of
a task that holds it (:func:`recomputable`), not by ``scatter``: scattered data lost with its
worker cannot be recovered (``FutureCancelledError ... already forgotten``), a task's result is
computed again.

Copies: fit's loaded blocks are kept on two workers where they fit (:class:`KeepLoadedTwice`,
the Active Memory Manager policy of the clusters fedpipe starts), so a lost worker costs no
re-read; :class:`CopyToJoiningWorkers` restores the copies as soon as a worker joins.

One Dask gap is closed here: a task whose preferred worker died while no worker was running
(``allow_other_workers=True``, train's block homes) waits in ``no-worker`` even after others
join, because Dask's rescheduling ignores loose restrictions. :class:`ForgetDeadHomes` drops
such a preference when a worker joins.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dask
from dask.utils import parse_timedelta
from distributed import Client, Future, wait
from distributed.active_memory_manager import ReduceReplicas, Suggestion
from distributed.diagnostics.plugin import SchedulerPlugin
from fedpipe import poison

DEFAULT_TTL = 30.0
MIN_TTL = 5.0  # Dask's own floor on a small cluster: 10 heartbeat intervals of 0.5 s
DEFAULT_NO_WORKERS = 60.0


def worker_ttl(deadline: float | None = None) -> float:
    """Seconds of silence after which a worker is removed: tied to a round's deadline.

    A lower ``distributed.scheduler.worker-ttl`` in Dask's configuration wins.
    """
    configured = parse_timedelta(dask.config.get("distributed.scheduler.worker-ttl") or "1d")
    limit = min(DEFAULT_TTL, configured)
    return limit if deadline is None else min(max(2.0 * deadline, MIN_TTL), limit)


@contextlib.contextmanager
def bounded(dask_client: Client, *, deadline: float | None = None, ttl: float | None = None,
            no_workers: float | None = None) -> Iterator[dict[str, float | None]]:
    """Set the worker TTL and the no-workers timeout on the scheduler for the block.

    Parameters
    ----------
    dask_client : distributed.Client
    deadline : float, optional
        A federated round's ``--deadline`` in seconds: both bounds follow it.
    ttl, no_workers : float, optional
        Explicit bounds in seconds (default from ``deadline``, see the module's docstring).

    Yields
    ------
    dict
        The values set (``{"worker_ttl": ..., "no_workers_timeout": ..., "allowed_failures": ...}``); the scheduler's
        earlier values are restored on exit.
    """
    if no_workers is None:
        no_workers = deadline if deadline is not None else DEFAULT_NO_WORKERS
    values = {"worker_ttl": ttl if ttl is not None else worker_ttl(deadline),
              "no_workers_timeout": no_workers,
              # set, not left to the scheduler's config: fedpipe.poison names the culprit by it
              "allowed_failures": poison.allowed_failures()}
    before = dask_client.run_on_scheduler(_set, **values)
    try:
        yield values
    finally:
        # a lost scheduler has nothing to restore, and asking would wait for a reconnection
        if dask_client.status == "running":
            with contextlib.suppress(Exception):
                dask_client.run_on_scheduler(_set, **before)


def _set(worker_ttl: float | None, no_workers_timeout: float | None,
         allowed_failures: int | None = None, dask_scheduler: Any = None) -> dict[str, Any]:
    """On the scheduler: set the bounds, re-arm the TTL check at its new period."""
    from tornado.ioloop import PeriodicCallback

    before = {"worker_ttl": dask_scheduler.worker_ttl,
              "no_workers_timeout": dask_scheduler.no_workers_timeout,
              "allowed_failures": dask_scheduler.allowed_failures}
    if allowed_failures is not None:
        dask_scheduler.allowed_failures = allowed_failures
    dask_scheduler.add_plugin(ForgetDeadHomes(), idempotent=True)  # once per scheduler
    dask_scheduler.add_plugin(CopyToJoiningWorkers(), idempotent=True)
    dask_scheduler.worker_ttl = worker_ttl
    dask_scheduler.no_workers_timeout = no_workers_timeout
    old = dask_scheduler.periodic_callbacks.pop("worker-ttl", None)
    if old is not None:
        old.stop()
    if worker_ttl:
        # checked every half TTL: a silent worker goes within 1.5 TTL at worst
        pc = PeriodicCallback(dask_scheduler.check_worker_ttl, worker_ttl * 500)
        dask_scheduler.periodic_callbacks["worker-ttl"] = pc
        pc.start()
    return before


class ForgetDeadHomes(SchedulerPlugin):
    """On the scheduler: when a worker joins, a ``no-worker`` task whose loose worker
    restriction names only departed workers loses that restriction, so it runs again."""

    name = "fedpipe-forget-dead-homes"

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        for ts in scheduler.unrunnable:
            homes = ts.worker_restrictions
            if ts.loose_restrictions and homes and not homes & scheduler.workers.keys():
                ts.worker_restrictions = None


def fetch(dask_client: Client, futures: Sequence[Future], timeout: float | None) -> list[Any]:
    """Results of ``futures``, waiting for them and fetching them within ``timeout`` seconds.

    ``Client.gather`` has no timeout: a worker that hangs after finishing its task holds the
    transfer for as long as the TCP timeouts allow. Raises :class:`TimeoutError` when late.
    """
    if timeout is None:
        return dask_client.gather(list(futures))
    end = time.monotonic() + timeout
    wait(futures, timeout=timeout)
    # one round trip for all, bounded like Future.result(timeout) bounds one
    return dask_client.sync(dask_client._gather, list(futures),
                            callback_timeout=max(1e-3, end - time.monotonic()))


def fetchable(dask_client: Client, futures: Sequence[Future], grace: float) -> list[bool]:
    """Which finished ``futures`` can be fetched within ``grace`` seconds in all."""
    end, ok = time.monotonic() + grace, []
    for fut in futures:
        try:
            fetch(dask_client, [fut], max(1e-3, end - time.monotonic()))
            ok.append(True)
        except Exception:  # noqa: BLE001 - late, lost or failed: not usable in this round
            ok.append(False)
    return ok


def recomputable(dask_client: Client, value: Any, key: str) -> Future:
    """A future of ``value`` that the scheduler recomputes if every worker holding it is lost."""
    return dask_client.submit(_identity, value, key=key, pure=False)


def _identity(value: Any) -> Any:
    return value


LOADED_PREFIX = "load-"  # keys of fit's loaded blocks (train_data.load_data)
# The copies of loaded blocks may take at most this share of the cluster's memory: one copy is
# allowed half of it (train_data.MEMORY_SHARE), so a second one fits when the rows take a quarter.
TWO_COPIES_SHARE = 0.5
JOIN_DELAY = 0.1  # seconds from a worker's registration to the copies sent to it


class KeepLoadedTwice(ReduceReplicas):
    """Dask's ``ReduceReplicas`` for every key but fit's loaded blocks, which it keeps on two
    workers while both copies fit in :data:`TWO_COPIES_SHARE` of the cluster's memory.

    A worker killed mid-run used to take its blocks with it: the survivor read them back from
    the store, and the iteration that met the kill took ~5x the median one (benchmarks/chaos.py;
    issue 17 asks for 3x). With a second copy the survivor only computes, and the Active
    Memory Manager, which runs this policy every interval, copies the blocks again onto the
    worker the nanny restarts. The clusters :func:`fedpipe.cluster.connect` starts use it in
    place of ``ReduceReplicas``; on a cluster of your own add it to
    ``distributed.scheduler.active-memory-manager.policies``.
    """

    def run(self):
        for suggestion in super().run():
            if not _loaded(suggestion.ts):
                yield suggestion
        for ts in _one_copy(self.manager.scheduler):
            if ts not in self.manager.pending:
                yield Suggestion("replicate", ts)


def _one_copy(scheduler) -> list:
    """The loaded blocks with one copy, when a second of each fits (else none)."""
    loaded = [ts for ts in scheduler.tasks.values() if _loaded(ts) and ts.who_has]
    limit = sum(ws.memory_limit or 0 for ws in scheduler.workers.values())
    copies = 2 * sum(ts.nbytes for ts in loaded)
    if len(scheduler.workers) < 2 or (limit and copies > TWO_COPIES_SHARE * limit):
        return []
    return [ts for ts in loaded if len(ts.who_has) < 2]


def _copies_due(dask_scheduler: Any = None) -> int:
    """On the scheduler: loaded blocks still waiting for their second copy (0 when the AMM
    does not keep two, or they would not fit)."""
    if not _keeps_two(dask_scheduler):
        return 0
    return len(_one_copy(dask_scheduler))


def _keeps_two(scheduler) -> bool:
    """Whether the scheduler's Active Memory Manager runs :class:`KeepLoadedTwice`."""
    amm = scheduler.extensions.get("amm")
    return amm is not None and any(isinstance(p, KeepLoadedTwice) for p in amm.policies)


def wait_for_copies(dask_client: Client, timeout: float = 10.0) -> None:
    """Ask the Active Memory Manager for the second copies now and wait until they are made.

    A fit starts once its blocks have both copies, so even a worker lost in its first
    iterations costs no re-read (on a cluster without :class:`KeepLoadedTwice` this returns
    at once). The copies travel in memory: tens of milliseconds for tens of megabytes.
    """
    end = time.monotonic() + timeout
    # An AMM switched off, or a scheduler that refuses run_on_scheduler: nothing to wait for.
    with contextlib.suppress(Exception):
        dask_client.amm.run_once()
        while dask_client.run_on_scheduler(_copies_due) and time.monotonic() < end:
            time.sleep(0.02)


class CopyToJoiningWorkers(SchedulerPlugin):
    """On the scheduler: when a worker joins, run the Active Memory Manager at once if its
    policies keep second copies (:class:`KeepLoadedTwice`), rather than at its next interval.

    A worker the nanny restarted came back ~2 s after a kill and got its copies up to 2 s
    later, too late for a kill that followed soon (benchmarks/chaos.py kills every ~1.6 s).
    """

    name = "fedpipe-copy-to-joining-workers"

    def add_worker(self, scheduler: Any = None, worker: str | None = None) -> None:
        if _keeps_two(scheduler):
            # Not at once: the AMM copies only to running workers, and the joining worker is
            # counted as one just after this hook.
            scheduler.loop.call_later(JOIN_DELAY, scheduler.extensions["amm"].run_once)


def _loaded(ts) -> bool:
    key = ts.key[0] if isinstance(ts.key, tuple) else ts.key
    return isinstance(key, str) and key.startswith(LOADED_PREFIX)
