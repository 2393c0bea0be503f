"""Federated clients on any Dask cluster: ``client-<id>`` resources lent to plain workers.

A deployment starts its workers with ``--resources client-<id>=1`` and :func:`placement.discover`
finds them. A cluster someone already has (``dask worker``, LocalCluster, dask-kubernetes,
dask-jobqueue, Coiled) declares no such resources; then :func:`lend` assigns the clients to the
workers present, balanced by rows (:func:`placement.assign_clients`, as fedpipe's own simulation
cluster does), and gives each worker its clients' resources for the length of the run.

The assignment is keyed by a worker's *slot*, which outlives the worker process: the name it
was given (``dask worker --name``, LocalCluster's ``0, 1, ...``), or else the address of its
nanny (a worker without a name is named after its own address, which is new after a restart).
Two plugins hold the mapping slot -> resources:

* :class:`LentSlots` on the scheduler sets a (re)starting worker's resources in its
  ``add_worker`` hook, which runs before the scheduler looks for the ``no-worker`` tasks the
  new worker can run; a restarted worker therefore picks up the tasks of its clients that
  waited for it (``Scheduler.add_resources`` after registration would leave them waiting).
* :class:`LentResources` on the workers sets the same resources in each worker's own state when
  it (re)starts, before it reads its first task.

A worker that joins mid-run has no slot in the mapping and takes no clients. When the run ends
the plugins are removed and the lent resources set to 0 (not deleted: a late task still
running on a worker releases its resource when it ends, and 0 keeps that arithmetic sound).
Both plugins are unpickled on the scheduler and the workers, so both need fedpipe installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from distributed import Client, Scheduler, Worker
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from fedpipe.engine import placement
from fedpipe.errors import TrainingError

log = logging.getLogger("fedpipe")

PLUGIN_PREFIX = "fedpipe-lent-"
WAIT_FOR_WORKERS = 30.0  # seconds a run waits for the first worker of an external cluster

Lending = Mapping[str, Mapping[str, float]]  # slot -> {client-<id>: 1, ...}


def slot_of(name: Any, address: str, nanny: str | None) -> str:
    """The identity of a worker that survives its restart: its given name, else its nanny.

    A worker started without a name is named after its own address (``tcp://…``).
    """
    if name is not None and "://" not in str(name):
        return str(name)
    return nanny or address


def declares_clients(dask_client: Client) -> bool:
    """Whether any worker carries a ``client-<id>`` resource of its own (a deployment)."""
    workers = dask_client.scheduler_info(n_workers=-1)["workers"].values()
    return any(q > 0 and r.startswith(placement.RESOURCE_PREFIX)
               for w in workers for r, q in (w.get("resources") or {}).items())


@contextlib.contextmanager
def placed(dask_client: Client, client_rows: Mapping[str, int],
           token: str) -> Iterator[list[list[str]]]:
    """Client groups on an external cluster: discovered if it declares them, else lent.

    Yields
    ------
    list of list of str
        Clients that share a worker, as :func:`placement.discover` returns them.
    """
    clients = list(client_rows)
    if not dask_client.scheduler_info(n_workers=-1)["workers"]:
        try:
            dask_client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS)
        except TimeoutError:
            raise TrainingError(f"the scheduler has no workers (waited {WAIT_FOR_WORKERS:g} s)"
                                ) from None
    if declares_clients(dask_client):
        yield placement.discover(dask_client, clients)
        return
    with lend(dask_client, client_rows, token):
        yield placement.discover(dask_client, clients)


@contextlib.contextmanager
def lend(dask_client: Client, client_rows: Mapping[str, int], token: str) -> Iterator[Lending]:
    """Give the workers present the resources of their clients until the block ends.

    Parameters
    ----------
    dask_client : distributed.Client
        A cluster whose workers carry no ``client-<id>`` resources.
    client_rows : mapping of str to int
        Rows of each client (the balance of :func:`placement.assign_clients`).
    token : str
        The run's token; names the plugins, so runs after this one lend afresh.

    Yields
    ------
    dict
        ``slot -> resources`` lent, one slot per worker that took clients.
    """
    workers = dask_client.scheduler_info(n_workers=-1)["workers"]
    slots = sorted({slot_of(w.get("name"), a, w.get("nanny")) for a, w in workers.items()})
    groups = placement.assign_clients(client_rows, len(slots))
    lending = {slot: placement.resources_of(g) for slot, g in zip(slots, groups, strict=False)}
    name = PLUGIN_PREFIX + token
    log.info("lending %d clients to %d workers without client resources",
             len(client_rows), len(lending))
    dask_client.register_plugin(LentSlots(lending), name=name)
    try:
        dask_client.register_plugin(LentResources(lending), name=name)
        try:
            yield lending
        finally:
            # A lost scheduler took the lending with it; asking it would wait out timeouts.
            if dask_client.status == "running":
                dask_client.unregister_worker_plugin(name)  # each worker zeroes its own share
    finally:
        if dask_client.status == "running":
            dask_client.run_on_scheduler(_end_lending, name)


class LentSlots(SchedulerPlugin):
    """Scheduler side of :func:`lend`: a (re)starting worker's resources, by its slot."""

    def __init__(self, lending: Lending) -> None:
        self.lending = {slot: dict(res) for slot, res in lending.items()}
        self.scheduler: Scheduler | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        for address in list(scheduler.workers):
            self.add_worker(scheduler, address)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        ws = scheduler.workers[worker]
        lent = self.lending.get(slot_of(ws.name, ws.address, ws.nanny), {})
        _set_on_scheduler(scheduler, worker, lent)

    def release(self, scheduler: Scheduler) -> None:
        """Set every lent resource to 0 on the scheduler."""
        for address in list(scheduler.workers):
            ws = scheduler.workers[address]
            lent = self.lending.get(slot_of(ws.name, ws.address, ws.nanny), {})
            _set_on_scheduler(scheduler, address, dict.fromkeys(lent, 0))


def _set_on_scheduler(scheduler: Scheduler, worker: str, resources: Mapping[str, float]) -> None:
    # Scheduler.add_resources would also zero the worker's used resources, miscounting tasks
    # that run now (of this run or of anyone else's); set only the quantities.
    ws = scheduler.workers[worker]
    for resource, quantity in resources.items():
        ws.resources[resource] = quantity
        ws.used_resources.setdefault(resource, 0)
        scheduler.resources.setdefault(resource, {})[worker] = quantity


def _end_lending(name: str, dask_scheduler: Scheduler | None = None) -> None:
    plugin = dask_scheduler.plugins.pop(name, None)
    if isinstance(plugin, LentSlots):
        plugin.release(dask_scheduler)


class LentResources(WorkerPlugin):
    """Worker side of :func:`lend`: this worker's share, set in its own state on (re)start."""

    def __init__(self, lending: Lending) -> None:
        self.lending = {slot: dict(res) for slot, res in lending.items()}

    def _mine(self, worker: Worker) -> dict[str, float]:
        return self.lending.get(slot_of(worker.name, worker.address, worker.nanny), {})

    def setup(self, worker: Worker) -> None:
        _set_on_worker(worker, self._mine(worker))

    def teardown(self, worker: Worker) -> None:
        _set_on_worker(worker, dict.fromkeys(self._mine(worker), 0))


def _set_on_worker(worker: Worker, resources: Mapping[str, float]) -> None:
    # Worker.set_resources would also report to the scheduler, whose add_resources handler
    # zeroes the used resources of tasks already placed there; LentSlots has told it already.
    state = worker.state
    for resource, quantity in resources.items():
        held = state.total_resources.get(resource, 0) - state.available_resources.get(resource, 0)
        state.total_resources[resource] = quantity
        state.available_resources[resource] = quantity - held
