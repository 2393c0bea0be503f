"""Data-parallel training: every chunk is a client that computes one gradient per iteration.

:func:`fit` is the entry point: it checks its arguments, connects to a cluster, places the
model and the data (:mod:`fedpipe.engine.train_data`), runs one of three loops over distributed
passes (:mod:`fedpipe.engine.train_pass`) and writes the run directory (:mod:`fedpipe.engine.train_records`).

One *pass* sends the parameters to the workers once, runs ``grad-…`` tasks (one per block of
row chunks, on chunks loaded once by ``load-…`` tasks, or read from zarr inside the task when
streaming), adds their ``(loss_sum, grad_sum, n)`` with the fixed-order tree of
:mod:`fedpipe.engine.graph` (``sum-…``) and returns ONE gradient to the driver, which applies the
optimizer; the test-set metrics are summed alongside (``eval-…``). Because the tree's shape
depends only on the number of chunks, parameters are bit-identical whatever the number of
workers.

The loops: full-batch first-order (:mod:`fedpipe.engine.train_full`), mini-batch with epochs
(:mod:`fedpipe.engine.minibatch`) and L-BFGS (:mod:`fedpipe.engine.train_lbfgs`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
from distributed import Client
from fedpipe import cluster, resilience, runconfig, rundir
from fedpipe.data import snapshot
from fedpipe.data.store import StoreInfo, read_info
from fedpipe.engine import sharded
from fedpipe.engine.graph import FAN_IN
from fedpipe.engine.minibatch import run_epochs
from fedpipe.engine.stale import BoundedStaleness, check_mode, mode_options, run_stale
from fedpipe.engine.train_data import (
    CACHE_MODES,
    INLINE_PARAM_BYTES,
    MEMORY_SHARE,
    Data,
    choose_cache,
    choose_chunks_per_task,
    load_data,
    read_block,
    send_params,
    stream_block,
    stream_chunk,
)
from fedpipe.engine.train_full import run_full_batch
from fedpipe.engine.train_lbfgs import run_lbfgs
from fedpipe.engine.train_pass import Engine, OnRecord, Pass, block_tasks, full_pass, open_engine
from fedpipe.engine.train_records import (
    check_finite,
    converged,
    emit,
    pass_record,
    restore_state,
    run_summary,
    save_state,
)
from fedpipe.errors import ValidationError
from fedpipe.model import saved as saved_model
from fedpipe.rundir import Run
from fedpipe.tasks.lbfgs import LBFGS
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer

# Names that lived in this module before it was split; importable from here as before.
__all__ = [
    "CACHE_MODES", "INLINE_PARAM_BYTES", "MEMORY_SHARE", "Data", "Engine",
    "OnRecord", "Pass", "block_tasks", "check_finite", "choose_cache", "choose_chunks_per_task",
    "converged", "emit",
    "fit", "full_pass", "load_data", "pass_record", "read_block", "restore_state",
    "run_full_batch", "save_state", "send_params", "stream_block", "stream_chunk",
]

log = logging.getLogger("fedpipe")



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
    overwrite: bool = False,
    tol: float | None = None,
    cache: str = "auto",
    fan_in: int = FAN_IN,
    chunks_per_task: int | None = None,
    on_record: OnRecord | None = None,
    workers: int | None = None,
    threads: int | None = None,
    scheduler: str | None = None,
    config: Mapping[str, Any] | None = None,
    compute_dtype: str | None = None,
    mode: BoundedStaleness | None = None,
    shard_parameters: bool = False,
    shards: int | None = None,
) -> Run:
    """Train ``model`` on the store at ``store`` with ``optimizer`` on a Dask cluster.

    Parameters
    ----------
    store : str
        Path or URL of a fedpipe zarr store.
    model : fedpipe.tasks.models.Model
    optimizer : fedpipe.tasks.optimizers.Optimizer or fedpipe.tasks.lbfgs.LBFGS
        A first-order optimizer (full batch with ``iterations``, mini-batch with ``epochs``) or
        L-BFGS settings (full batch, ``iterations`` only).
    iterations, epochs : int
        Exactly one: full-batch iterations, or passes over the data in mini-batches.
    batch_size : int, optional
        Rows per mini-batch step (epochs only; default: one chunk's rows).
    dask_client : distributed.Client, optional
        Cluster to use; otherwise one is made by :func:`fedpipe.cluster.connect` from
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
    overwrite : bool
        ``out`` holds an earlier run that this one replaces once it has finished (without it,
        such an ``out`` is refused; see :func:`fedpipe.rundir.prepare`).
    tol : float, optional
        Stop when the training objective changes by at most ``tol * max(1, |loss|)``.
    cache : {"auto", "memory", "stream"}
        Keep chunks in worker memory, or read them from zarr on every pass; ``auto`` decides
        from the data size and the cluster's memory.
    fan_in : int
        Inputs per add task of the reduction tree.
    chunks_per_task : int, optional
        Consecutive chunks per ``grad-…`` task (and per ``load-…`` task). Fewer, larger tasks
        cost less scheduling; with ``chunks_per_task == fan_in`` the result is bit-identical
        to one task per chunk (the task computes the tree's first level itself). Default:
        ``fan_in`` or 1, chosen from the number of chunks and the cluster
        (:func:`fedpipe.engine.train_data.choose_chunks_per_task`).
    on_record : callable, optional
        Called with each metrics record right after it is appended to ``metrics.jsonl``
        (its run time is not counted in the records' ``seconds``).
    workers, threads, scheduler : optional
        Cluster to start (LocalCluster workers and threads per worker) or to join (scheduler
        address) when no ``dask_client`` is given.
    config : mapping, optional
        Resolved options written to ``config.toml`` (the CLI passes its arguments). Without
        it, ``config.toml`` holds the ``fedpipe train`` options that repeat this call, read off
        the model and optimizer (:mod:`fedpipe.runconfig`). Settings no option expresses (a model
        of your own, a learning-rate schedule, non-default optimizer hyperparameters, another
        ``fan_in``) are left out and named under ``not_repeatable`` with one logged warning;
        ``fedpipe train --config`` then refuses the file in one line instead of running
        something else.
    compute_dtype : {"float64", "float32"}, optional
        ``"float32"`` keeps a float32 store's rows in float32 on the workers and computes the
        built-in GLMs' matrix products in float32 (:mod:`fedpipe.tasks.kernels`): half the
        bytes to read per pass. Parameters, sums and the optimizer stay float64. Default
        float64; float32 needs a store ingested with ``dtype="float32"``.
    mode : fedpipe.BoundedStaleness, optional
        Bounded-staleness training (``fedpipe train --mode async``): each step adds gradients
        up to ``max_staleness`` versions old instead of waiting for every worker
        (:mod:`fedpipe.engine.stale`, docs/async-train.md). Full batch, first-order only.
    shard_parameters : bool
        Model-parallel training (linear, logistic, softmax; full batch): the weights are cut
        by feature block into ``shards`` blocks, each kept with its optimizer state on one
        worker and never sent (:mod:`fedpipe.engine.sharded`, docs/model-parallel.md).
    shards : int, optional
        Feature blocks of a model-parallel run (default: the store's feature chunks, or 2).

    Returns
    -------
    Run
    """
    _check_arguments(model, optimizer, iterations, epochs, batch_size, test_fraction,
                     checkpoint_every, tol, cache, fan_in, chunks_per_task)
    if mode is not None:
        check_mode(mode, optimizer, epochs)
        if shard_parameters:
            raise ValidationError("--mode async and --model-parallel cannot be combined")
    info = _with_compute_dtype(read_info(store), compute_dtype)
    _check_model_fits(model, info)
    if shard_parameters:
        shards = sharded.check(model, optimizer, iterations, shards, info)
    elif shards is not None:
        raise ValidationError("--shards needs --model-parallel")
    elif info.sparse:
        raise ValidationError(f"store {info.url} holds sparse CSR chunks: train it with "
                              "--model-parallel (fit(..., shard_parameters=True))")
    run_dir = rundir.prepare(out, resume, overwrite) if out is not None else None
    if resume and run_dir is None:
        raise ValidationError("--resume needs --out RUN_DIR (the run to continue)")
    data = snapshot.pin(store, run_dir, resume=resume)  # a refused resume writes nothing
    if run_dir is not None:
        rundir.write_config(run_dir, config if config is not None else runconfig.fit_config(
            store, model, optimizer, info, fan_in=fan_in, default_fan_in=FAN_IN,
            iterations=iterations, epochs=epochs, batch_size=batch_size, tol=tol, seed=seed,
            test_fraction=test_fraction, cache=cache, chunks_per_task=chunks_per_task,
            checkpoint_every=checkpoint_every, resume=resume, out=out,
            compute_dtype=compute_dtype, **mode_options(mode),
            **({"model_parallel": True, "shards": shards} if shard_parameters else {}),
            # a dask_client given overrides these; the result does not depend on the cluster
            **({} if dask_client is not None else
               {"workers": workers, "threads": threads, "scheduler": scheduler})))
    connection = (nullcontext(dask_client) if dask_client is not None
                  else cluster.connect(workers, threads, scheduler))
    # the store is leased and checked at both ends; a silent worker is dropped, not waited for
    with data, connection as dc, resilience.bounded(dc):
        if dask_client is not None:
            log.info("dashboard: %s", cluster.dashboard_link(dc))
        if shard_parameters:
            params, records, summary = sharded.train(
                dc, str(store), info, model, optimizer, shards, iterations, seed, test_fraction,
                checkpoint_every, resume, tol, run_dir, on_record, chunks_per_task)
        else:
            sharded.check_fits_worker(dc, model, optimizer, MEMORY_SHARE)
            per_task = choose_chunks_per_task(dc, info.n_chunks, fan_in, chunks_per_task)
            with open_engine(dc, str(store), info, model, seed, test_fraction, cache, fan_in,
                             per_task, run_dir, on_record) as engine:
                start = time.perf_counter()
                params, records, stopped = _run_loop(engine, optimizer, iterations, epochs,
                                                     batch_size, seed, checkpoint_every, resume,
                                                     tol, mode)
                summary = run_summary(engine, optimizer, records, stopped,
                                      time.perf_counter() - start)
                summary.update(mode_options(mode, records))
        summary[snapshot.KEY] = data.digest
    named = model.unpack(params)
    if run_dir is not None:
        rundir.write_params(run_dir, named)
        saved_model.write(run_dir, model, info)  # model.json + preprocess.json: predict needs no store
        rundir.write_summary(run_dir, summary)
        rundir.publish(run_dir)
    path = None if run_dir is None else rundir.target(run_dir)
    return Run(params, named, records, summary, rundir.read_config(path), path)


def _run_loop(engine: Engine, optimizer, iterations, epochs, batch_size, seed,
              checkpoint_every, resume, tol, mode=None):
    if mode is not None:
        return run_stale(engine, optimizer, mode, iterations, seed, checkpoint_every, resume,
                         tol)
    if isinstance(optimizer, LBFGS):
        return run_lbfgs(engine, optimizer, iterations, seed, checkpoint_every, resume, tol)
    if epochs is not None:
        return run_epochs(engine, optimizer, epochs, batch_size, seed, checkpoint_every,
                          resume, tol)
    return run_full_batch(engine, optimizer, iterations, seed, checkpoint_every, resume, tol)


# ---------------------------------------------------------------------------------------------
# checks

def _check_arguments(model, optimizer, iterations, epochs, batch_size, test_fraction,
                     checkpoint_every, tol, cache, fan_in, chunks_per_task) -> None:
    if not isinstance(model, Model):
        raise ValidationError(f"model must be a fedpipe.tasks.models.Model, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer | LBFGS):
        raise ValidationError(
            f"optimizer must be a fedpipe.tasks.optimizers.Optimizer or fedpipe.tasks.lbfgs.LBFGS, "
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
    if chunks_per_task is not None and chunks_per_task < 1:
        raise ValidationError(f"chunks_per_task must be at least 1, got {chunks_per_task}")


def _with_compute_dtype(info: StoreInfo, compute_dtype: str | None) -> StoreInfo:
    if compute_dtype in (None, "float64"):
        return info
    if compute_dtype != "float32":
        raise ValidationError(f"--compute-dtype must be float64 or float32, got {compute_dtype!r}")
    if info.dtype != "float32":
        raise ValidationError(f"--compute-dtype float32 needs a float32 store: {info.url} holds "
                              f"{info.dtype} (fedpipe ingest --dtype float32)")
    return dataclasses.replace(info, compute_dtype="float32")


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
