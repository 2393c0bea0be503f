"""Where the training rows live: kept in worker memory (``load-…`` tasks) or streamed from zarr.

:func:`choose_cache` decides, :func:`load_data` submits the loads, and the worker-side functions
(:func:`read_block`, :func:`stream_block`, :func:`stream_chunk`) read, check and split chunks
with :func:`fedpipe.data.store.read_chunk`. Parameters travel to the workers with
:func:`send_params`. Nothing here knows about models' arithmetic or the training loops.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from distributed import Client, Future
from fedpipe import cluster, resilience
from fedpipe.data.store import (
    ChunkRef,
    StoreInfo,
    chunk_refs,
    read_chunk,
    read_chunks,
    split_rows,
)
from fedpipe.tasks import reduce
from fedpipe.tasks.models import Model

CACHE_MODES = ("auto", "memory", "stream")
# Keep data in worker memory when it takes at most this share of the cluster's memory limit:
# the rest is headroom for gradients, temporaries and Dask's own bookkeeping.
MEMORY_SHARE = 0.5
# Parameters up to this size travel inside each task; larger ones are shipped once per pass.
INLINE_PARAM_BYTES = 256 * 1024


class Data(NamedTuple):
    """Where the rows live: loaded block futures (``memory``) or chunk references (``stream``).

    A *block* is ``chunks_per_task`` consecutive chunks handled by one task (1 by default:
    one task per chunk); ``blocks[b]`` lists its chunk references, ``loaded[b]`` the future
    of its loaded chunks, both sides of the split (:func:`read_block`; tasks take their side
    with :func:`on_side`), ``homes[b]`` the worker its tasks prefer (see :func:`block_homes`).
    """

    url: str
    info: StoreInfo
    refs: list[ChunkRef]
    blocks: list[list[ChunkRef]]
    mode: str
    loaded: list[Future] | None
    test_fraction: float
    seed: int
    homes: list[list[str]]


def choose_cache(dask_client: Client, info: StoreInfo, cache: str = "auto") -> str:
    """``memory`` when the rows fit in the cluster (see :data:`MEMORY_SHARE`), else ``stream``."""
    if cache != "auto":
        return cache
    data_bytes = info.n_rows * (info.n_features + 1) * 8  # float64 after read_chunk
    return "memory" if data_bytes <= MEMORY_SHARE * cluster.cluster_memory(dask_client) else "stream"


# Auto chunks per task: ``fan_in`` while no worker gets more than this share above its even
# share of the chunks (blocks go round robin by worker), else one task per chunk.
BALANCE_SLACK = 1.25


def choose_chunks_per_task(dask_client: Client, n_chunks: int, fan_in: int,
                           chunks_per_task: int | None = None) -> int:
    """``chunks_per_task`` if given, else ``fan_in`` or 1, whichever keeps the workers even.

    Only these two: a block of ``fan_in`` chunks is exactly a node of the first level of the
    reduction tree, so both give the same bits and the choice may follow the cluster. Fewer,
    larger tasks cost less scheduling (a pass of 20 chunks on 2 workers took 2.7x less time
    with 8 chunks per task than with 1), as long as every worker thread still gets a block and
    the blocks' chunks spread evenly over the workers.
    """
    if chunks_per_task is not None:
        return chunks_per_task
    workers = dask_client.scheduler_info(n_workers=-1)["workers"]
    threads = sum(w.get("nthreads", 1) for w in workers.values())
    sizes = [min(fan_in, n_chunks - i) for i in range(0, n_chunks, fan_in)]
    if not workers or len(sizes) < threads:
        return 1
    loads = [sum(sizes[w::len(workers)]) for w in range(len(workers))]
    return fan_in if max(loads) <= BALANCE_SLACK * n_chunks / len(workers) else 1


def load_data(dask_client: Client, url: str, info: StoreInfo, mode: str,
              test_fraction: float, seed: int, chunks_per_task: int = 1) -> Data:
    """Submit ``load-…`` tasks (one per block) in memory mode; nothing when streaming."""
    refs = chunk_refs(info)
    blocks = [refs[i:i + chunks_per_task] for i in range(0, len(refs), chunks_per_task)]
    homes = block_homes(dask_client, len(blocks))
    loaded = None
    if mode == "memory":
        token = uuid.uuid4().hex
        loaded = [
            dask_client.submit(read_block, url, block, test_fraction, seed, info,
                               key=(f"load-{token}", b), workers=home or None,
                               allow_other_workers=bool(home))
            for b, (block, home) in enumerate(zip(blocks, homes, strict=True))
        ]
    return Data(url, info, refs, blocks, mode, loaded, test_fraction, seed, homes)


def block_homes(dask_client: Client, n_blocks: int) -> list[list[str]]:
    """The worker each block's tasks prefer: block ``b`` on worker ``b mod W`` (by address).

    Given nothing to go on (no data dependency), the scheduler sometimes sent both blocks of
    a two-worker pass to the same worker, which then read and computed the whole pass alone
    (2x the time); round robin spreads the blocks evenly. The restriction is loose
    (``allow_other_workers``), so a block whose worker is gone runs elsewhere.
    A cluster whose workers have not registered yet gives no homes, hence no restriction
    (distributed refuses ``allow_other_workers`` without ``workers``).
    """
    workers = sorted(dask_client.scheduler_info(n_workers=-1)["workers"])
    return [[workers[b % len(workers)]] if workers else [] for b in range(n_blocks)]


Block = tuple[tuple[np.ndarray, np.ndarray], ...]
SIDES = {"train": 0, "test": 1}


def read_block(url: str, refs: list[ChunkRef], test_fraction: float, seed: int,
               info: StoreInfo) -> tuple[Block, Block]:
    """Worker side of loading: the chunks of one block, read, checked and split, as
    ``(train chunks, test chunks)`` (no test chunks when ``test_fraction`` is 0).

    One task reads each chunk once for both sides: a worker that takes over a lost worker's
    blocks decompresses each chunk once, not once per side (which made the iteration that
    met a worker's death ~2x longer), and each side holds its own rows only, as before.
    The rows of each side are those of ``read_chunk(split=...)``, bit for bit.
    """
    chunks = read_chunks(url, refs, info=info)
    if test_fraction == 0:  # as effective_split: every row is a training row, no mask drawn
        return tuple(chunks), ()
    sides = [split_rows(X, y, ref, test_fraction=test_fraction, seed=seed)
             for (X, y), ref in zip(chunks, refs, strict=True)]
    return tuple(train for train, _ in sides), tuple(test for _, test in sides)


def on_side(func: Callable, side: int, model: Model, params: np.ndarray,
            loaded: tuple[Block, Block], *extra: Any):
    """Worker side of a task on a loaded block: ``func`` on one side of it (:data:`SIDES`)."""
    return func(model, params, loaded[side], *extra)


def effective_split(split: str, test_fraction: float) -> str:
    # With no test rows, "train" is every row: skip building the mask and copying the chunk.
    return "all" if split == "train" and test_fraction == 0 else split


def send_params(dask_client: Client, params: np.ndarray) -> np.ndarray | Future:
    """Ship the parameters once per pass: inline when small, one broadcast scatter when large."""
    if params.nbytes <= INLINE_PARAM_BYTES:
        return params
    return resilience.recomputable(dask_client, params, f"params-{uuid.uuid4().hex}")


def stream_block(func: Callable, model: Model, params: np.ndarray, url: str,
                 refs: list[ChunkRef], split: str, test_fraction: float, seed: int,
                 info: StoreInfo):
    """Worker side of streaming: ``func`` on each chunk read from zarr, results added in order.

    Each chunk is dropped once ``func`` is done with it; since a block function adds its
    chunks' results left to right, this equals ``func`` on the whole block, bit for bit.
    """
    split = effective_split(split, test_fraction)
    return reduce.add_sums(*(
        func(model, params, (read_chunk(url, ref, split=split, test_fraction=test_fraction,
                                        seed=seed, info=info),))
        for ref in refs))


def stream_chunk(func: Callable, model: Model, params: np.ndarray, url: str, ref: ChunkRef,
                 split: str, test_fraction: float, seed: int, info: StoreInfo, *extra: Any):
    """Worker side of streaming one chunk for a mini-batch piece: read it, call ``func``."""
    chunk = read_chunk(url, ref, split=effective_split(split, test_fraction),
                       test_fraction=test_fraction, seed=seed, info=info)
    return func(model, params, chunk, *extra)
