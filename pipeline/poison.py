"""A task that kills its worker every time: stop the run naming the chunk or the client.

Dask retries a task whose worker died while running it on another worker, up to
``distributed.scheduler.allowed-failures`` times, then fails it with ``KilledWorker`` naming
only the task's key. A worker dying that often under one task is the task's doing (a chunk that
crashes a reader, a model that runs out of memory on it), not the cluster's: retrying the same
command would kill the same workers again. So the run stops with exit 2 (bad data), and the
message names what the key stands for: the chunk of the store (data-parallel) or the clients
(federated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
from fedpipe.errors import FedpipeError

# Dask's default. A kill by chaos (a few per run) rarely lands on one task three times over.
ALLOWED_FAILURES = 3


class PoisonTaskError(FedpipeError):
    """A task killed every worker that ran it (``allowed-failures`` + 1 times): exit 2."""


def allowed_failures() -> int:
    """How many worker deaths one task may cause before it fails: a lower configured value wins."""
    configured = dask.config.get("distributed.scheduler.allowed-failures", ALLOWED_FAILURES)
    return min(ALLOWED_FAILURES, int(configured))


def _kills(exc: Any) -> str:
    n = int(getattr(exc, "allowed_failures", allowed_failures())) + 1
    return (f"killed {n} worker process(es) that ran it "
            f"(distributed.scheduler.allowed-failures={n - 1}; the data or the model crashes "
            "a worker, e.g. out of memory)")


def chunk_error(exc: Exception, url: str, blocks: Sequence[Sequence[Any]],
                failed: Sequence[int] = ()) -> PoisonTaskError:
    """The one-line error for a data-parallel ``KilledWorker``: the chunks of the failed blocks.

    Task keys are ``(group-token, block)``; ``blocks[b]`` lists the block's chunk references.
    ``failed``: every block of that pass that failed with ``exc`` (:func:`failed_blocks`). Dask
    blames each task a dying worker held, queued ones too, and records none as the one running
    (its heartbeat is older than the death): so when several failed, all are named.
    """
    key = getattr(exc, "task", None)
    block = key[1] if isinstance(key, tuple) and len(key) == 2 else None
    if isinstance(block, int) and 0 <= block < len(blocks):
        refs = [ref for b in sorted({block, *failed} & set(range(len(blocks)))) for ref in blocks[b]]
        chunks = (_chunk_name(refs[0]) if len(refs) == 1 else
                  f"one of chunks {', '.join(str(r.index) for r in refs)}{_arrays(refs[0])}")
        return PoisonTaskError(f"{chunks} of store {url}: task {key[0].split('-')[0]} "
                               f"{_kills(exc)}")
    return PoisonTaskError(f"task {key} on store {url}: {_kills(exc)}")


def failed_blocks(dask_client: Any, exc: Exception) -> list[int]:
    """The blocks of ``exc``'s pass (keys ``(token, block)``) that the scheduler holds as failed."""
    key = getattr(exc, "task", None)
    if not (isinstance(key, tuple) and len(key) == 2):
        return []

    def erred(dask_scheduler, token=key[0]):
        return [ts.key[1] for ts in dask_scheduler.tasks.values()
                if ts.state == "erred" and isinstance(ts.key, tuple) and len(ts.key) == 2
                and ts.key[0] == token and isinstance(ts.key[1], int)]

    try:
        return dask_client.run_on_scheduler(erred)
    except Exception:  # the error message must not fail: name the one task we know
        return []


def client_error(exc: Exception, clients: Sequence[str]) -> PoisonTaskError:
    """The one-line error for a federated ``KilledWorker``: the clients of the failed task."""
    who = f"client {clients[0]}" if len(clients) == 1 else f"one of clients {', '.join(clients)}"
    return PoisonTaskError(f"{who}: its task {_kills(exc)}")


def _chunk_name(ref: Any) -> str:
    return f"chunk {ref.index}{_arrays(ref)}"


def _arrays(ref: Any) -> str:
    # ChunkRef(prefix, index): "" is the store's X/y, "partitions/NAME/3" a client's arrays
    where = f"{ref.prefix}/" if ref.prefix else ""
    return f" of arrays {where}X and {where}y"

