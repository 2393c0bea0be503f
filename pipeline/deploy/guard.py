"""Only the driver runs code on the cluster: a Dask preload for TLS clusters (issue 17).

distributed authenticates every connection against the cluster CA but does not tell members
apart, so any holder of a member's key (a worker's, leaked) could connect as a driver and read
every client's cached rows with ``Client.run``. Loaded into the scheduler, the workers and
their nannies::

    dask scheduler --preload fedpipe.deploy.guard --protocol tls ...
    dask worker tls://SCHEDULER:8786 --preload fedpipe.deploy.guard \\
        --preload-nanny fedpipe.deploy.guard ...

it checks the common name of the certificate each request comes with:

* the **scheduler** serves a worker's or nanny's own requests (register, heartbeat, who has
  what, …; :data:`MEMBER_OPS`) from any member, and every other request (a client's
  connection and with it task submission, ``Client.run``, ``run_on_scheduler``, plugins,
  scatter, gather, restart, …) only from a driver certificate (:data:`DRIVERS`);
* a **worker** or **nanny** serves ``get_data`` (other workers fetch task results through it)
  from any member and every other request (``run``, ``run_coroutine``, ``plugin-add``, actors,
  uploads, …) only from the scheduler (:data:`SCHEDULERS`), which forwards a driver's
  ``Client.run`` and nothing else's.

A refused request is logged on the member with the name it came with. The names are the ones
:mod:`fedpipe.deploy.tls` writes: ``fedpipe-driver`` (``deploy render --tls``) and
``fedpipe-client`` (``tls.generate_roles``) for the driver, ``fedpipe-scheduler`` for the
scheduler; Dask config ``fedpipe.guard.drivers`` / ``fedpipe.guard.schedulers`` replace them.
A member started with the guard but without TLS refuses every request (Dask starts it even
when its preload fails): without certificates there is no name to check.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection

import dask

log = logging.getLogger("fedpipe.guard")

DRIVERS = ("fedpipe-driver", "fedpipe-client")
SCHEDULERS = ("fedpipe-scheduler",)
# What workers and nannies ask of the scheduler on their own behalf (distributed 2026.8).
MEMBER_OPS = frozenset({
    "register-worker", "register_nanny", "unregister", "heartbeat_worker", "who_has",
    "set_resources", "retire_workers", "log_event", "versions", "identity", "ncores",
    "ncores_running",
})
# What members ask of each other's workers: fetching task results they depend on.
PEER_OPS = frozenset({"get_data", "identity", "versions"})


class Refused(PermissionError):
    """A request from a member whose certificate does not allow it."""


def peer_name(comm) -> str | None:
    """The common name of the certificate the other end presented, or None (no TLS)."""
    cert = (getattr(comm, "extra_info", None) or {}).get("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def guard(handler: Callable, op: str, allowed: Collection[str], member: str) -> Callable:
    """``handler`` that first checks the caller's certificate name is in ``allowed``."""
    takes_comm = next(iter(inspect.signature(handler).parameters), None) == "comm"

    async def checked(comm, **msg):  # not functools.wraps: Dask must see the comm argument
        name = peer_name(comm)
        if name not in allowed:
            why = f"{op!r} is not allowed for certificate {name!r} on the {member}"
            log.warning("refused: %s (from %s)", why, getattr(comm, "peer_address", "?"))
            if op == "register-client":
                # The refused Client waits for this answer: it raises with our text instead
                # of timing out.
                await comm.write([{"op": "stream-start", "error": f"fedpipe guard: {why}"}])
                await comm.close()
                return None
            raise Refused(why)
        result = handler(comm, **msg) if takes_comm else handler(**msg)
        return await result if inspect.isawaitable(result) else result

    checked.__name__ = f"guarded_{getattr(handler, '__name__', op)}"
    return checked


def protect(server, open_ops: Collection[str], allowed: Collection[str], member: str) -> None:
    """Guard every handler of ``server`` but ``open_ops``: only ``allowed`` names may call."""
    for op, handler in list(server.handlers.items()):
        if op not in open_ops:
            server.handlers[op] = guard(handler, op, allowed, member)


def _names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = dask.config.get(f"fedpipe.guard.{key}", default=None)
    return default if value is None else tuple([value] if isinstance(value, str) else value)


def dask_setup(server) -> None:
    """The preload's entry point: guard ``server`` (a scheduler, worker or nanny)."""
    from distributed import Nanny, Scheduler

    if server.security is None or not server.security.require_encryption and not any(
            a.startswith("tls://") for a in _addresses(server)):
        # Dask logs a preload's exception and starts the member anyway: refuse every request
        # first, so a member started without certificates is closed, not open to all.
        protect(server, (), (), type(server).__name__.lower())
        why = ("fedpipe.deploy.guard needs a TLS cluster (--protocol tls and certificates): "
               "without them there is no name to check, so this member refuses every request")
        log.error("%s", why)
        raise RuntimeError(why)
    if isinstance(server, Scheduler):
        protect(server, MEMBER_OPS, _names("drivers", DRIVERS), "scheduler")
    else:
        kind = "nanny" if isinstance(server, Nanny) else "worker"
        protect(server, PEER_OPS, _names("schedulers", SCHEDULERS), kind)
    log.info("guard on %s: only the driver's certificate may run code", type(server).__name__)


def _addresses(server) -> list[str]:
    return [str(getattr(server, "_start_address", "") or ""),
            *(str(listener.contact_address) for listener in getattr(server, "listeners", ()))]
