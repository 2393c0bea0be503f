"""Data-parallel training: every chunk is a client that computes one gradient per iteration.

One *pass* sends the parameters to the workers once, runs ``grad-…`` tasks (one per row chunk,
on chunks loaded once by ``load-…`` tasks, or read from zarr inside the task when streaming),
adds their ``(loss_sum, grad_sum, n)`` with the fixed-order tree of :mod:`pipeline.graph`
(``sum-…``) and returns ONE gradient to the driver, which applies the optimizer. The same pass
also sums the test-set metrics (``eval-…``). Because the tree's shape depends only on the
number of chunks, parameters are bit-identical whatever the number of workers.

Three loops share it: full-batch first-order (:func:`fit` with ``iterations``), mini-batch with
epochs (:mod:`pipeline.minibatch`) and L-BFGS (:mod:`pipeline.train_lbfgs`).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from distributed import Client, Future, span, wait

from pipeline import cluster, rundir
from pipeline.errors import TrainingError, ValidationError
from pipeline.graph import tree_sum
from pipeline.store import ChunkRef, StoreInfo, chunk_refs, read_chunk, read_info
from tasks import reduce
from tasks.lbfgs import LBFGS
from tasks.models import Model
from tasks.optimizers import Optimizer

log = logging.getLogger("fedpipe")

OnRecord = Callable[[dict[str, Any]], None]
CACHE_MODES = ("auto", "memory", "stream")
# Keep data in worker memory when it takes at most this share of the cluster's memory limit:
# the rest is headroom for gradients, temporaries and Dask's own bookkeeping.
MEMORY_SHARE = 0.5
# Parameters up to this size travel inside each task; larger ones are scattered once per pass.
INLINE_PARAM_BYTES = 256 * 1024


class FitResult(NamedTuple):
    """What :func:`fit` returns: flat parameters, named arrays, the metric records, the summary."""

    params: np.ndarray
    named: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


class Data(NamedTuple):
    """Where the rows live: loaded block futures (``memory``) or chunk references (``stream``).

    A *block* is ``chunks_per_task`` consecutive chunks handled by one task (1 by default:
    one task per chunk); ``blocks[b]`` lists its chunk references, ``train[b]``/``test[b]``
    the future of its loaded chunks.
    """

    url: str
    info: StoreInfo
    refs: list[ChunkRef]
    blocks: list[list[ChunkRef]]
    mode: str
    train: list[Future] | None
    test: list[Future] | None
    test_fraction: float
    seed: int


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


# ---------------------------------------------------------------------------------------------
# the public entry point


def fit(
    store: str,
    model: Model,
    optimizer: Optimizer | LBFGS,
    *,
    iterations: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    dask_client: Client | None = None,
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    checkpoint_every: int | None = None,
    resume: bool = False,
    tol: float | None = None,
    cache: str = "auto",
    fan_in: int = 8,
    chunks_per_task: int = 1,
    on_record: OnRecord | None = None,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on the store at ``store`` with ``optimizer`` on a Dask cluster.

    Parameters
    ----------
    store : str
        Path or URL of a fedpipe zarr store.
    model : tasks.models.Model
    optimizer : tasks.optimizers.Optimizer or tasks.lbfgs.LBFGS
        A first-order optimizer (full batch with ``iterations``, mini-batch with ``epochs``) or
        L-BFGS settings (full batch, ``iterations`` only).
    iterations, epochs : int
        Exactly one: full-batch iterations, or passes over the data in mini-batches.
    batch_size : int, optional
        Rows per mini-batch step (epochs only; default: one chunk's rows).
    dask_client : distributed.Client, optional
        Cluster to use; otherwise one is made by :func:`pipeline.cluster.connect` from
        ``workers``, ``threads`` and ``scheduler``.
    out : path, optional
        Run directory (params.npz, metrics.jsonl, summary.json, config.toml, checkpoint.npz).
    seed : int
        Seeds the train/test split, the initial parameters and the mini-batch order.
    test_fraction : float
        Share of each chunk's rows held out for testing (``0``: train on every row).
    checkpoint_every : int, optional
        Checkpoint every so many iterations (epochs with ``epochs``); always at the end.
    resume : bool
        Continue from ``out``'s checkpoint (ends with the parameters of an uninterrupted run).
    tol : float, optional
        Stop when the training objective changes by at most ``tol * max(1, |loss|)``.
    cache : {"auto", "memory", "stream"}
        Keep chunks in worker memory, or read them from zarr on every pass; ``auto`` decides
        from the data size and the cluster's memory.
    fan_in : int
        Inputs per add task of the reduction tree.
    chunks_per_task : int
        Consecutive chunks per ``grad-…`` task (and per ``load-…`` task). Fewer, larger tasks
        cost less scheduling; with ``chunks_per_task == fan_in`` the result is bit-identical
        to one task per chunk (the task computes the tree's first level itself).
    on_record : callable, optional
        Called with each metrics record right after it is appended to ``metrics.jsonl``
        (its run time is not counted in the records' ``seconds``).
    workers, threads, scheduler : optional
        Cluster to start (LocalCluster workers and threads per worker) or to join (scheduler
        address) when no ``dask_client`` is given.
    config : mapping, optional
        Resolved options written to ``config.toml`` (the CLI passes its arguments).

    Returns
    -------
    FitResult
    """
    _check_arguments(model, optimizer, iterations, epochs, batch_size, test_fraction,
                     checkpoint_every, tol, cache, fan_in, chunks_per_task)
    info = read_info(store)
    _check_model_fits(model, info)
    run_dir = rundir.prepare(out, resume) if out is not None else None
    if resume and run_dir is None:
        raise ValidationError("--resume needs --out RUN_DIR (the run to continue)")
    if run_dir is not None and config is not None:
        rundir.write_config(run_dir, config)
    connection = (nullcontext(dask_client) if dask_client is not None
                  else cluster.connect(workers, threads, scheduler))
    with connection as dc:
        if dask_client is not None:
            log.info("dashboard: %s", cluster.dashboard_link(dc))
        with _engine(dc, str(store), info, model, seed, test_fraction, cache, fan_in,
                     chunks_per_task, run_dir, on_record) as engine:
            start = time.perf_counter()
            params, records, stopped = _run_loop(engine, optimizer, iterations, epochs,
                                                 batch_size, seed, checkpoint_every, resume, tol)
            summary = _summary(engine, optimizer, records, stopped, time.perf_counter() - start)
    named = model.unpack(params)
    if run_dir is not None:
        rundir.write_params(run_dir, named)
        rundir.write_summary(run_dir, summary)
    return FitResult(params, named, records, summary)


def _run_loop(engine: Engine, optimizer, iterations, epochs, batch_size, seed,
              checkpoint_every, resume, tol):
    # The loops live in their own modules; imported here because they import this one.
    if isinstance(optimizer, LBFGS):
        from pipeline.train_lbfgs import run_lbfgs

        return run_lbfgs(engine, optimizer, iterations, seed, checkpoint_every, resume, tol)
    if epochs is not None:
        from pipeline.minibatch import run_epochs

        return run_epochs(engine, optimizer, epochs, batch_size, seed, checkpoint_every,
                          resume, tol)
    return run_full_batch(engine, optimizer, iterations, seed, checkpoint_every, resume, tol)


# ---------------------------------------------------------------------------------------------
# checks


def _check_arguments(model, optimizer, iterations, epochs, batch_size, test_fraction,
                     checkpoint_every, tol, cache, fan_in, chunks_per_task) -> None:
    if not isinstance(model, Model):
        raise ValidationError(f"model must be a tasks.models.Model, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer | LBFGS):
        raise ValidationError(
            f"optimizer must be a tasks.optimizers.Optimizer or tasks.lbfgs.LBFGS, "
            f"got {type(optimizer).__name__}")
    if (iterations is None) == (epochs is None):
        raise ValidationError("give exactly one of --iterations and --epochs")
    for name, value in (("--iterations", iterations), ("--epochs", epochs),
                        ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValidationError(f"{name} must be a positive integer, got {value!r}")
    if batch_size is not None and epochs is None:
        raise ValidationError("--batch-size needs --epochs (full-batch training uses every row)")
    if isinstance(optimizer, LBFGS) and epochs is not None:
        raise ValidationError("--optimizer lbfgs is full-batch: use --iterations, not --epochs")
    if not 0.0 <= test_fraction < 1.0:
        raise ValidationError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if tol is not None and not tol >= 0:
        raise ValidationError(f"--tol must be >= 0, got {tol}")
    if cache not in CACHE_MODES:
        raise ValidationError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if fan_in < 2:
        raise ValidationError(f"fan_in must be at least 2, got {fan_in}")
    if chunks_per_task < 1:
        raise ValidationError(f"chunks_per_task must be at least 1, got {chunks_per_task}")


def _check_model_fits(model: Model, info: StoreInfo) -> None:
    """A regression model needs a regression store; a classifier a classification store."""
    ok = {"regression": ("regression",), "binary": ("binary",),
          "multiclass": ("binary", "multiclass")}.get(model.task, ())
    if info.task not in ok:
        raise ValidationError(
            f"model {model.name} ({model.task}) does not fit store {info.url} ({info.task} task)")
    n_classes = len(info.classes or [])
    if model.task == "multiclass" and n_classes and _n_outputs(model, info) not in (None, n_classes):
        raise ValidationError(f"model {model.name} does not have {n_classes} outputs for "
                              f"the classes of {info.url}")


def _n_outputs(model: Model, info: StoreInfo) -> int | None:
    # n_params = (n_features + 1) * k for softmax with intercept; other layouts: do not guess.
    if model.name == "softmax" and model.n_params % (info.n_features + 1) == 0:
        return model.n_params // (info.n_features + 1)
    return None


# ---------------------------------------------------------------------------------------------
# data placement and the distributed pass


@contextmanager
def _engine(dask_client: Client, url: str, info: StoreInfo, model: Model, seed: int,
            test_fraction: float, cache: str, fan_in: int, chunks_per_task: int,
            run_dir: Path | None, on_record: OnRecord | None) -> Iterator[Engine]:
    mode = choose_cache(dask_client, info, cache)
    log.info("training on %d chunks of %s (%s)", info.n_chunks, url, mode)
    # One copy of the model's functions on every worker instead of one per task.
    [model_future] = dask_client.scatter([model], broadcast=True, hash=False)
    data = load_data(dask_client, url, info, mode, test_fraction, seed, chunks_per_task)
    # Wait for the loads here so that iteration times measure training, not reading.
    start = time.perf_counter()
    wait([*(data.train or []), *(data.test or [])])
    log.info("data ready in %.2f s", time.perf_counter() - start)
    try:
        yield Engine(dask_client, model, model_future, data, fan_in, run_dir, on_record)
    finally:
        # Release the cached chunks now rather than whenever the futures are collected.
        dask_client.cancel([f for f in (data.train or []) + (data.test or [])] + [model_future])


def choose_cache(dask_client: Client, info: StoreInfo, cache: str = "auto") -> str:
    """``memory`` when the rows fit in the cluster (see :data:`MEMORY_SHARE`), else ``stream``."""
    if cache != "auto":
        return cache
    data_bytes = info.n_rows * (info.n_features + 1) * 8  # float64 after read_chunk
    return "memory" if data_bytes <= MEMORY_SHARE * cluster.cluster_memory(dask_client) else "stream"


def load_data(dask_client: Client, url: str, info: StoreInfo, mode: str,
              test_fraction: float, seed: int, chunks_per_task: int = 1) -> Data:
    """Submit ``load-…`` tasks (one per block and split) in memory mode; nothing when streaming."""
    refs = chunk_refs(info)
    blocks = [refs[i:i + chunks_per_task] for i in range(0, len(refs), chunks_per_task)]
    train = test = None
    if mode == "memory":
        token = uuid.uuid4().hex
        train = _load(dask_client, url, info, blocks, "train", test_fraction, seed, token)
        if test_fraction > 0:
            test = _load(dask_client, url, info, blocks, "test", test_fraction, seed, token)
    return Data(url, info, refs, blocks, mode, train, test, test_fraction, seed)


def _load(dask_client, url, info, blocks, split, test_fraction, seed, token) -> list[Future]:
    return [
        dask_client.submit(read_block, url, block, split, test_fraction, seed, info,
                           key=(f"load-{split}-{token}", b))
        for b, block in enumerate(blocks)
    ]


def read_block(url: str, refs: list[ChunkRef], split: str, test_fraction: float, seed: int,
               info: StoreInfo) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Worker side of loading: the chunks of one block, read, checked and split."""
    split = _effective_split(split, test_fraction)
    return tuple(read_chunk(url, ref, split=split, test_fraction=test_fraction, seed=seed,
                            info=info) for ref in refs)


def _effective_split(split: str, test_fraction: float) -> str:
    # With no test rows, "train" is every row: skip building the mask and copying the chunk.
    return "all" if split == "train" and test_fraction == 0 else split


def send_params(dask_client: Client, params: np.ndarray) -> np.ndarray | Future:
    """Ship the parameters once per pass: inline when small, one broadcast scatter when large."""
    if params.nbytes <= INLINE_PARAM_BYTES:
        return params
    [future] = dask_client.scatter([params], broadcast=True, hash=False)
    return future


def block_tasks(engine: Engine, split: str, func: Callable, params: Any,
                group: str) -> list[Future]:
    """One task per block of ``split``: ``func(model, params, block)`` with ``block`` a tuple
    of ``(X, y)`` chunks.

    In memory mode the task takes the loaded block; when streaming it reads the block's
    chunks itself one at a time (:func:`stream_block`), so a worker holds at most one chunk
    per thread.
    """
    data, dc, token = engine.data, engine.dask_client, uuid.uuid4().hex
    if data.mode == "memory":
        blocks = data.train if split == "train" else data.test
        return [dc.submit(func, engine.model_future, params, block,
                          key=(f"{group}-{token}", b)) for b, block in enumerate(blocks)]
    return [
        dc.submit(stream_block, func, engine.model_future, params, data.url, refs, split,
                  data.test_fraction, data.seed, data.info, key=(f"{group}-{token}", b))
        for b, refs in enumerate(data.blocks)
    ]


def stream_block(func: Callable, model: Model, params: np.ndarray, url: str,
                 refs: list[ChunkRef], split: str, test_fraction: float, seed: int,
                 info: StoreInfo):
    """Worker side of streaming: ``func`` on each chunk read from zarr, results added in order.

    Each chunk is dropped once ``func`` is done with it; since a block function adds its
    chunks' results left to right, this equals ``func`` on the whole block, bit for bit.
    """
    split = _effective_split(split, test_fraction)
    return reduce.add_sums(*(
        func(model, params, (read_chunk(url, ref, split=split, test_fraction=test_fraction,
                                        seed=seed, info=info),))
        for ref in refs))


def stream_chunk(func: Callable, model: Model, params: np.ndarray, url: str, ref: ChunkRef,
                 split: str, test_fraction: float, seed: int, info: StoreInfo, *extra: Any):
    """Worker side of streaming one chunk for a mini-batch piece: read it, call ``func``."""
    chunk = read_chunk(url, ref, split=_effective_split(split, test_fraction),
                       test_fraction=test_fraction, seed=seed, info=info)
    return func(model, params, chunk, *extra)


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


# ---------------------------------------------------------------------------------------------
# records, checkpoints, stopping


def emit(engine: Engine, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Keep a metrics record, append it to ``metrics.jsonl`` and call ``on_record``."""
    records.append(record)
    if engine.run_dir is not None:
        rundir.append_metrics(engine.run_dir, record)
    if engine.on_record is not None:
        engine.on_record(record)


def pass_record(step_key: str, step: int, result: Pass, seconds: float, elapsed: float,
                **extra: Any) -> dict[str, Any]:
    """The metrics record of one iteration/epoch."""
    return {step_key: step, "train_loss": result.loss, **result.metrics,
            "n_train": result.n_train, "seconds": seconds, "elapsed": elapsed, **extra}


def check_finite(loss: float, step_key: str, step: int, run_dir: Path | None) -> None:
    """Divergence: stop with one line naming the step and the checkpoint left behind."""
    if math.isfinite(loss):
        return
    where = ""
    if run_dir is not None and (ckpt := rundir.load_checkpoint(run_dir)) is not None:
        where = f"; last good checkpoint is {step_key} {ckpt[1].get(step_key)} in {run_dir}"
    raise TrainingError(f"training loss became {loss} at {step_key} {step} (diverged: "
                        f"try a smaller --lr){where}")


def converged(records: list[dict[str, Any]], tol: float | None) -> bool:
    """True when the last two training losses differ by at most ``tol * max(1, |loss|)``."""
    if tol is None or len(records) < 2:
        return False
    prev, last = records[-2]["train_loss"], records[-1]["train_loss"]
    return abs(prev - last) <= tol * max(1.0, abs(last))


def save_state(engine: Engine, step_key: str, step: int, params: np.ndarray,
               state: Mapping[str, np.ndarray], seed: int, **meta: Any) -> None:
    """Checkpoint parameters and optimizer state (``opt/<key>``) with the step and seed."""
    if engine.run_dir is None or not np.all(np.isfinite(params)):
        return  # never replace a good checkpoint by a diverged one
    arrays = {"params": params, **{f"opt/{k}": v for k, v in state.items()}}
    rundir.save_checkpoint(engine.run_dir, arrays, {
        step_key: step, "seed": seed, "model": engine.model.name,
        "n_params": engine.model.n_params, **meta})


def restore_state(engine: Engine, step_key: str, kind: str, seed: int):
    """Load the checkpoint to resume from: ``(step, params, state, meta)`` or ``None``.

    Metric records from the checkpoint's step on are dropped; the resumed run writes them again.
    """
    if engine.run_dir is None or (ckpt := rundir.load_checkpoint(engine.run_dir)) is None:
        log.info("no checkpoint to resume from: starting at the beginning")
        if engine.run_dir is not None:  # records of an attempt killed before its first checkpoint
            rundir.trim_metrics(engine.run_dir, lambda r: False)
        return None
    arrays, meta = ckpt
    if meta.get("kind") != kind or meta.get("n_params") != engine.model.n_params:
        raise ValidationError(
            f"checkpoint in {engine.run_dir} is from a different run ({meta.get('kind')} "
            f"training of {meta.get('model')}); use another --out or drop --resume")
    if meta.get("seed") != seed:
        raise ValidationError(f"checkpoint in {engine.run_dir} was written with --seed "
                              f"{meta.get('seed')}, not {seed}")
    step = int(meta[step_key])
    rundir.trim_metrics(engine.run_dir, lambda r: r.get(step_key, -1) < step)
    state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    log.info("resuming from %s %d", step_key, step)
    return step, arrays["params"], state, meta


# ---------------------------------------------------------------------------------------------
# full-batch first-order training


def run_full_batch(engine: Engine, optimizer: Optimizer, iterations: int, seed: int,
                   checkpoint_every: int | None, resume: bool, tol: float | None):
    """Gradient descent (with any first-order optimizer) on the full-batch mean loss.

    Record ``t`` describes the parameters after ``t`` updates, so the loop makes
    ``iterations + 1`` passes (the last one only measures).
    """
    params, state, start = engine.model.init(seed), None, 0
    restored = restore_state(engine, "iteration", "full-batch", seed) if resume else None
    if restored is not None:
        start, params, state, _ = restored
    state = state if state is not None else optimizer.init(params)
    records: list[dict[str, Any]] = []
    t0 = last = time.perf_counter()
    stopped = "iterations"
    for t in range(start, iterations + 1):
        with span(f"iteration-{t}"):
            result = full_pass(engine, params)
        now = time.perf_counter()
        check_finite(result.loss, "iteration", t, engine.run_dir)
        emit(engine, pass_record("iteration", t, result, now - last, now - t0), records)
        last = time.perf_counter()  # time spent in on_record is not training time
        if converged(records, tol):
            stopped = "tol"
            break
        if t == iterations:
            break
        updates, state = optimizer.update(result.grad, state, params)
        params = reduce.apply_updates(params, updates)
        if checkpoint_every and (t + 1) % checkpoint_every == 0:
            save_state(engine, "iteration", t + 1, params, state, seed, kind="full-batch")
    save_state(engine, "iteration", records[-1]["iteration"] if records else start, params,
               state, seed, kind="full-batch")
    return params, records, stopped


# ---------------------------------------------------------------------------------------------
# the summary


def _summary(engine: Engine, optimizer, records: list[dict[str, Any]], stopped: str,
             total_seconds: float) -> dict[str, Any]:
    step_key = next((k for k in ("iteration", "epoch") if records and k in records[-1]),
                    "iteration")
    # Record 0 (or the first after a resume) only measures the start; it is no iteration.
    timed = [r["seconds"] for r in records[1:]] or [r["seconds"] for r in records]
    final = {k: v for k, v in records[-1].items()
             if k not in ("seconds", "elapsed", "n_train", step_key)} if records else {}
    return {
        "model": engine.model.name,
        "task": engine.model.task,
        "optimizer": "lbfgs" if isinstance(optimizer, LBFGS) else "first-order",
        step_key + "s": records[-1][step_key] if records else 0,
        "stopped": stopped,
        "final": final,
        "seconds_per_iteration": statistics.median(timed) if timed else None,
        "total_seconds": total_seconds,
        "peak_worker_memory": cluster.peak_worker_memory(engine.dask_client),
        "cache": engine.data.mode,
        "n_chunks": engine.data.info.n_chunks,
        "chunks_per_task": len(engine.data.blocks[0]) if engine.data.blocks else 1,
        "fan_in": engine.fan_in,
        "n_workers": cluster.n_workers(engine.dask_client),
        "n_train": next((r["n_train"] for r in reversed(records) if "n_train" in r), None),
        "dashboard": cluster.dashboard_link(engine.dask_client),
        "run_dir": str(engine.run_dir) if engine.run_dir is not None else None,
    }
