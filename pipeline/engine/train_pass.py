"""One distributed pass: the parameters go out once, one gradient (and test sums) come back.

``grad-…`` tasks (one per block of chunks, on the loaded block or streaming it) return
``(loss_sum, grad_sum, n)``; the fixed-order tree of :mod:`fedpipe.engine.graph` adds them on the
workers (``sum-…``). The test metrics are summed the same way (``eval-…``, ``sum-eval-…``).
Because the tree's shape depends only on the number of chunks, a pass is bit-identical whatever
the number of workers. :func:`submit_train` / :func:`submit_eval` only submit, so a loop can
put several trees in one round trip; :func:`full_pass` is the submit-gather-finish of one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from distributed import Client, Future, wait
from distributed.scheduler import KilledWorker
from fedpipe import poison, resilience
from fedpipe.data.store import StoreInfo
from fedpipe.engine.graph import tree_sum
from fedpipe.engine.train_data import (
    SIDES,
    Data,
    choose_cache,
    load_data,
    on_side,
    send_params,
    stream_block,
)
from fedpipe.tasks import reduce
from fedpipe.tasks.models import Model

log = logging.getLogger("fedpipe")

OnRecord = Callable[[dict[str, Any]], None]


class Engine(NamedTuple):
    """The fixed context of one fit: cluster, model (also as a broadcast future), data, output."""

    dask_client: Client
    model: Model
    model_future: Future
    data: Data
    fan_in: int
    run_dir: Path | None
    on_record: OnRecord | None


class Pass(NamedTuple):
    """Result of one distributed pass at some parameters."""

    loss: float                  # mean training loss plus penalty (the objective)
    grad: np.ndarray             # its gradient
    n_train: int
    metrics: dict[str, float]    # test_loss, test_accuracy | test_rmse, test_r2


@contextmanager
def open_engine(dask_client: Client, url: str, info: StoreInfo, model: Model, seed: int,
            test_fraction: float, cache: str, fan_in: int, chunks_per_task: int,
            run_dir: Path | None, on_record: OnRecord | None) -> Iterator[Engine]:
    """Place the model and the data on the cluster for one fit; release them afterwards."""
    mode = choose_cache(dask_client, info, cache)
    log.info("training on %d chunks of %s (%s)", info.n_chunks, url, mode)
    # One copy of the model's functions on every worker instead of one per task.
    model_future = resilience.recomputable(dask_client, model, f"model-{uuid.uuid4().hex}")
    data = load_data(dask_client, url, info, mode, test_fraction, seed, chunks_per_task)
    # Wait for the loads here so that iteration times measure training, not reading.
    start = time.perf_counter()
    wait(data.loaded or [])
    if data.loaded:  # a second copy of every block first, where the cluster keeps two
        resilience.wait_for_copies(dask_client)
    log.info("data ready in %.2f s", time.perf_counter() - start)
    try:
        yield Engine(dask_client, model, model_future, data, fan_in, run_dir, on_record)
    except KilledWorker as exc:  # a task that kills every worker running it: name its chunks
        raise poison.chunk_error(exc, url, data.blocks,
                                 poison.failed_blocks(dask_client, exc)) from exc
    finally:
        # Release the cached chunks now rather than whenever the futures are collected.
        dask_client.cancel([*(data.loaded or []), model_future])


def block_tasks(engine: Engine, split: str, func: Callable, params: Any,
                group: str, only: list[int] | None = None) -> list[Future]:
    """One task per block of ``split``: ``func(model, params, block)`` with ``block`` a tuple
    of ``(X, y)`` chunks (``only``: just those blocks, keyed by their index).

    In memory mode the task takes the loaded block; when streaming it reads the block's
    chunks itself one at a time (:func:`stream_block`), so a worker holds at most one chunk
    per thread, on the block's home worker (:func:`fedpipe.engine.train_data.block_homes`).
    """
    data, dc, token = engine.data, engine.dask_client, uuid.uuid4().hex
    which = range(len(data.blocks)) if only is None else only
    if data.mode == "memory":
        return [dc.submit(on_side, func, SIDES[split], engine.model_future, params,
                          data.loaded[b], key=(f"{group}-{token}", b)) for b in which]
    return [
        dc.submit(stream_block, func, engine.model_future, params, data.url, data.blocks[b],
                  split, data.test_fraction, data.seed, data.info, key=(f"{group}-{token}", b),
                  workers=data.homes[b] or None, allow_other_workers=bool(data.homes[b]))
        for b in which
    ]


def full_pass(engine: Engine, params: np.ndarray, with_test: bool = True) -> Pass:
    """Objective, gradient and test metrics at ``params``: one tree per quantity, two results.

    ``with_test=False`` leaves out the ``eval-…`` tasks (a line-search trial needs only the
    objective); the pass's ``metrics`` are then empty.
    """
    dc = engine.dask_client
    sent = send_params(dc, params)
    roots = [submit_train(engine, sent)]
    if with_test and (root := submit_eval(engine, sent)) is not None:
        roots.append(root)
    results = dc.gather(roots)
    return finish_train(engine, params, results[0],
                        results[1] if len(results) > 1 else None)


def submit_train(engine: Engine, sent: np.ndarray | Future) -> Future:
    """The ``grad-…`` tasks and ``sum-…`` tree at the parameters ``sent`` (see
    :func:`send_params`): the root future of ``(loss_sum, grad_sum, n)``."""
    tasks = block_tasks(engine, "train", reduce.block_loss_and_grad, sent, "grad")
    return tree_sum(engine.dask_client, tasks, engine.fan_in, "sum")


def submit_eval(engine: Engine, sent: np.ndarray | Future) -> Future | None:
    """The ``eval-…`` tasks and their tree: the root future of the test sums (``None``: no
    test rows). Submitted without waiting, so it can share a round trip with other work."""
    if engine.data.test_fraction == 0:
        return None
    tasks = block_tasks(engine, "test", reduce.block_eval_sums, sent, "eval")
    return tree_sum(engine.dask_client, tasks, engine.fan_in, "sum-eval")


def finish_train(engine: Engine, params: np.ndarray, sums: tuple,
                 eval_sums: np.ndarray | None = None) -> Pass:
    """The :class:`Pass` from gathered training sums (and test sums, when given)."""
    loss_sum, grad_sum, n = sums
    loss, grad = reduce.objective(loss_sum, grad_sum, n, engine.model, params)
    return Pass(loss, grad, int(n), finish_eval(engine, eval_sums))


def finish_eval(engine: Engine, eval_sums: np.ndarray | None) -> dict[str, float]:
    """Test metrics from gathered test sums; ``{}`` for none."""
    return {} if eval_sums is None else reduce.finish_metrics(eval_sums, engine.model.task)
