"""Model-parallel training: the parameters sharded by feature block, each block on one worker.

``fit(..., shard_parameters=True, shards=S)`` (``fedpipe train --model-parallel --shards S``)
lands here. Shard ``j`` holds the weight rows of its feature columns, ``W_j``, and their
optimizer state on the worker lent the resource ``client-mp<j>`` (:func:`fedpipe.engine.lend.lend`,
as federated clients are pinned), in :mod:`fedpipe.engine.shard_worker`. One iteration is one
graph and one small result:

1. ``fwd-…`` (row chunk ``i``, shard ``j``) on shard ``j``'s worker: ``X_ij @ W_j``;
2. ``head-…`` (row chunk ``i``): the partial outputs added in shard order (the reduction over
   feature blocks), plus the intercept; loss sums and the residual ``R_i``;
3. ``step-…`` (shard ``j``) on its worker: ``sum_i X_ij.T @ R_i`` in row order (the reduction
   over row blocks) and ``W_j``'s optimizer step, in place.

Only ``Z`` and ``R`` (rows x classes) travel; the intercept (classes) stays on the driver with
its own optimizer state. The math is :mod:`fedpipe.tasks.sharded`'s and equals the unsharded
model's, so the parameters equal data-parallel ``fit``'s up to the order of the sums (~1e-12).

A checkpoint is one generation ``shards/<iteration>/shard-<j>.npz`` written by each shard's own
worker, plus ``checkpoint.npz`` (the intercept, its optimizer state, the shard layout) by the
driver after them. When a worker dies its shards are lost; the run rebuilds every shard from the
last checkpoint (or from the start without one), says so in the log and the summary
(``rebuilt``), and goes on.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, span
from fedpipe import cluster, rundir
from fedpipe.data.blocks import feature_chunk
from fedpipe.data.store import ChunkRef, StoreInfo, chunk_refs, split_row_counts
from fedpipe.engine import lend, placement, runlog, shard_worker
from fedpipe.engine.graph import FAN_IN
from fedpipe.engine.shard_worker import ShardLost
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.tasks import sharded
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer, apply_updates
from fedpipe.tasks.reduce import EVAL_FIELDS, finish_metrics

log = logging.getLogger("fedpipe")

KIND = "model-parallel"
MAX_REBUILDS = 3


class Layout(NamedTuple):
    """The fixed context of one model-parallel fit."""

    dask_client: Client
    token: str
    url: str
    info: StoreInfo
    model: Model
    optimizer: Optimizer
    bounds: list[tuple[int, int]]
    n_out: int
    intercept: bool
    n_train: int
    groups: list[list[ChunkRef]]  # row blocks: consecutive chunks handled by one task each
    test_fraction: float
    seed: int
    run_dir: Path | None

    def pin(self, j: int) -> dict[str, float]:
        return placement.resources_of([f"mp{j}"])


def check(model: Model, optimizer: Any, iterations: int | None, shards: int | None,
          info: StoreInfo) -> int:
    """Refuse what model-parallel training does not do, in one line; the number of shards."""
    try:
        n_features, _, _ = sharded.layout(model)
        if not isinstance(optimizer, Optimizer):
            raise ValueError("model-parallel training takes a first-order optimizer, not L-BFGS")
        sharded.check_blockwise(optimizer)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if iterations is None:
        raise ValidationError("model-parallel training is full-batch: use --iterations, "
                              "not --epochs")
    if n_features != info.n_features:
        raise ValidationError(f"model has {n_features} features, store {info.url} "
                              f"{info.n_features}")
    width = feature_chunk(info)
    n_shards = shards or max(1, -(-info.n_features // width) if width else 2)
    try:
        sharded.feature_bounds(info.n_features, n_shards, width)
    except ValueError as exc:
        raise ValidationError(f"--shards: {exc}") from None
    return n_shards


@contextmanager
def placed(dask_client: Client, url: str, info: StoreInfo, model: Model, optimizer: Optimizer,
           n_shards: int, test_fraction: float, seed: int, run_dir: Path | None,
           chunks_per_task: int = FAN_IN) -> Iterator[Layout]:
    """Lend each shard's resource to a worker for the run; drop the shards at the end."""
    token = uuid.uuid4().hex
    bounds = sharded.feature_bounds(info.n_features, n_shards, feature_chunk(info))
    _, n_out, intercept = sharded.layout(model)
    n_train = sum(split_row_counts(info, ref, test_fraction=test_fraction, seed=seed)[0]
                  for ref in chunk_refs(info))
    widths = {f"mp{j}": (b - a) * n_out for j, (a, b) in enumerate(bounds)}
    refs = chunk_refs(info)
    groups = [refs[i:i + chunks_per_task] for i in range(0, len(refs), chunks_per_task)]
    layout = Layout(dask_client, token, url, info, model, optimizer, bounds, n_out, intercept,
                    n_train, groups, test_fraction, seed, run_dir)
    with lend.lend(dask_client, widths, token):
        try:
            yield layout
        finally:
            dask_client.run(shard_worker.drop, token)


def install(layout: Layout, blocks: list[np.ndarray] | None, source: Path | None) -> None:
    """Put every shard on its worker: fresh ``blocks`` or the checkpoint generation ``source``."""
    spec = layout.model.spec or {}
    dc = layout.dask_client
    futures = [dc.submit(shard_worker.install, layout.token, j, cols, layout.optimizer,
                         spec.get("l2", 0.0), spec.get("l1", 0.0),
                         None if blocks is None else blocks[j],
                         None if source is None else str(source),
                         key=f"install-{layout.token}-{j}-{uuid.uuid4().hex[:8]}",
                         resources=layout.pin(j), pure=False)
               for j, cols in enumerate(layout.bounds)]
    dc.gather(futures)


def iteration(layout: Layout, b: np.ndarray, apply: bool,
              save_to: Path | None) -> tuple[float, np.ndarray]:
    """One forward/backward over every row block: ``(sum of block penalties, their sums)``.

    Submitted as ONE graph (one message to the scheduler), each shard's tasks in a layer that
    carries its resource (the annotation rides on the layer: nothing optimises this graph).
    """
    token = uuid.uuid4().hex[:12]
    n_shards = len(layout.bounds)
    fwd = [[(f"fwd-{token}", g, j) for j in range(n_shards)] for g in range(len(layout.groups))]
    heads = [(f"head-{token}", g) for g in range(len(layout.groups))]
    steps = [(f"step-{token}", j) for j in range(n_shards)]
    layers: dict[str, MaterializedLayer] = {}
    for j in range(n_shards):
        tasks = {fwd[g][j]: (partial(shard_worker.forward, layout.token, j, layout.url,
                                     layout.info, g, refs, layout.test_fraction, layout.seed,
                                     j == 0),)
                 for g, refs in enumerate(layout.groups)}
        tasks[steps[j]] = (partial(shard_worker.backward, layout.token, j, layout.n_train, apply,
                                   None if save_to is None else str(save_to)), *heads)
        layers[f"shard-{token}-{j}"] = MaterializedLayer(
            tasks, annotations={"resources": layout.pin(j)})
    layers[f"head-{token}"] = MaterializedLayer(
        {heads[g]: (partial(shard_worker.head_task, layout.model.task, b), *fwd[g])
         for g in range(len(layout.groups))})
    graph = HighLevelGraph(layers, {name: set() for name in layers})
    results = layout.dask_client.gather(layout.dask_client.get(graph, steps, sync=False))
    return float(sum(p for p, _ in results)), results[0][1]


def gather_params(layout: Layout, b: np.ndarray) -> np.ndarray:
    """The flat parameter vector (blocks fetched from their workers once, at the end)."""
    dc = layout.dask_client
    blocks = dc.gather([dc.submit(shard_worker.fetch, layout.token, j, resources=layout.pin(j),
                                  key=f"fetch-{layout.token}-{j}", pure=False)
                        for j in range(len(layout.bounds))])
    return sharded.join_params(blocks, b)


def run_loop(layout: Layout, iterations: int, checkpoint_every: int | None, resume: bool,
             tol: float | None, on_record) -> tuple[np.ndarray, list[dict], str, list[dict]]:
    """Full-batch training of the sharded model: ``(params, records, stopped, rebuilds)``."""
    rebuilds: list[dict] = []
    start, b, state = _start(layout, resume)
    records: list[dict[str, Any]] = []
    while True:
        try:
            b, stopped = _iterate(layout, start, b, state, iterations, checkpoint_every, tol,
                                  on_record, records)
            return gather_params(layout, b), records, stopped, rebuilds
        except ShardLost as exc:
            if len(rebuilds) >= MAX_REBUILDS:
                raise TrainingError(f"shards lost {len(rebuilds) + 1} times: {exc}") from exc
            start, b, state = _start(layout, resume=True, fallback=True)
            rebuilds.append({"at_iteration": records[-1]["iteration"] if records else start,
                             "from_iteration": start})
            log.warning("a worker holding shards was lost; every shard rebuilt from %s",
                        f"the checkpoint of iteration {start}" if start else "the start")
            records[:] = [r for r in records if r["iteration"] < start]


def _iterate(layout: Layout, start: int, b: np.ndarray, state: dict, iterations: int,
             checkpoint_every: int | None, tol: float | None, on_record,
             records: list[dict]) -> tuple[np.ndarray, str]:
    t0 = last = time.perf_counter()
    for t in range(start, iterations + 1):
        final = t == iterations
        due = checkpoint_every and (t + 1) % checkpoint_every == 0 and not final
        save_to = _generation(layout, t + 1 if due else t) if (due or final) else None
        with span(f"iteration-{t}"):
            pen, sums = iteration(layout, b, apply=not final, save_to=save_to)
        record = _record(layout, t, sums, pen, time.perf_counter() - last,
                         time.perf_counter() - t0)
        if not np.isfinite(record["train_loss"]):
            raise TrainingError(f"training loss became {record['train_loss']} at iteration {t} "
                                "(diverged: try a smaller --lr)")
        records.append(record)
        runlog.emit(layout.run_dir, on_record, record)
        last = time.perf_counter()
        if _converged(records, tol):
            _checkpoint(layout, t, b, state, write_shards=True)
            return b, "tol"
        if final:
            _checkpoint(layout, t, b, state)
            return b, "iterations"
        if layout.intercept:
            k = layout.n_out
            updates, state = layout.optimizer.update(sums[2:2 + k] / layout.n_train, state, b)
            b = apply_updates(b, updates)
        if due:
            _checkpoint(layout, t + 1, b, state)
    return b, "iterations"


def _record(layout: Layout, t: int, sums: np.ndarray, pen: float, seconds: float,
            elapsed: float) -> dict[str, Any]:
    k = layout.n_out
    loss = float(sums[0]) / max(int(sums[1]), 1) + pen
    metrics = finish_metrics(sums[2 + k: 2 + k + len(EVAL_FIELDS)], layout.model.task)
    return {"iteration": t, "train_loss": loss, **metrics, "n_train": int(sums[1]),
            "seconds": seconds, "elapsed": elapsed}


def _converged(records: list[dict], tol: float | None) -> bool:
    if tol is None or len(records) < 2:
        return False
    prev, last = records[-2]["train_loss"], records[-1]["train_loss"]
    return abs(prev - last) <= tol * max(1.0, abs(last))


def _generation(layout: Layout, step: int) -> Path | None:
    return None if layout.run_dir is None else layout.run_dir / "shards" / str(step)


def _checkpoint(layout: Layout, step: int, b: np.ndarray, state: dict,
                write_shards: bool = False) -> None:
    """The driver's part of checkpoint ``step``, after every shard wrote its block."""
    if layout.run_dir is None:
        return
    if write_shards:  # a stop between scheduled generations: the shards write theirs now
        iteration(layout, b, apply=False, save_to=_generation(layout, step))
    runlog.save_state(layout.run_dir, b, state,
                      {"iteration": step, "seed": layout.seed, "model": layout.model.name,
                       "kind": KIND, "model_n_params": layout.model.n_params,
                       "bounds": [list(c) for c in layout.bounds]})
    generations = layout.run_dir / "shards"
    for old in generations.iterdir() if generations.exists() else ():  # the ones before
        if old.name != str(step):
            shutil.rmtree(old, ignore_errors=True)


def _start(layout: Layout, resume: bool, fallback: bool = False):
    """``(iteration, intercept, its optimizer state)``, the shards installed to match."""
    loaded = runlog.load_state(layout.run_dir) if resume and layout.run_dir else None
    if loaded is None:
        if resume and not fallback:
            log.info("no checkpoint to resume from: starting at the beginning")
        if layout.run_dir is not None:
            rundir.trim_metrics(layout.run_dir, lambda r: False)
        params = layout.model.init(layout.seed)
        blocks, b = sharded.split_params(params, layout.bounds, layout.n_out, layout.intercept)
        install(layout, blocks, None)
        return 0, b, layout.optimizer.init(b)
    b, state, _, meta = loaded
    if meta.get("kind") != KIND or meta.get("model_n_params") != layout.model.n_params:
        raise ValidationError(f"checkpoint in {layout.run_dir} is from a different run "
                              f"({meta.get('kind')} training of {meta.get('model')}); use "
                              "another --out or drop --resume")
    if [tuple(c) for c in meta.get("bounds", [])] != list(layout.bounds):
        raise ValidationError(f"checkpoint in {layout.run_dir} has {len(meta['bounds'])} "
                              f"shards, not {len(layout.bounds)}: resume with --shards "
                              f"{len(meta['bounds'])}")
    if meta.get("seed") != layout.seed:
        raise ValidationError(f"checkpoint in {layout.run_dir} was written with --seed "
                              f"{meta.get('seed')}, not {layout.seed}")
    step = int(meta["iteration"])
    install(layout, None, _generation(layout, step))
    runlog.rewind(layout.run_dir, "iteration", step)
    log.info("resuming from iteration %d (%d shards read by their workers)", step,
             len(layout.bounds))
    return step, b, state


def summary(layout: Layout, records: list[dict], stopped: str, seconds: float,
            rebuilds: list[dict]) -> dict[str, Any]:
    """``summary.json`` of a model-parallel run (the data-parallel summary's keys)."""
    final = {k: v for k, v in records[-1].items()
             if k not in ("seconds", "elapsed", "n_train", "iteration")} if records else {}
    k = layout.n_out
    dc = layout.dask_client
    return {
        "model": layout.model.name, "task": layout.model.task, "optimizer": "first-order",
        "iterations": records[-1]["iteration"] if records else 0, "stopped": stopped,
        "final": final, **runlog.timing(records, "iteration", skip_first=True),
        "total_seconds": seconds, "peak_worker_memory": cluster.peak_worker_memory(dc),
        "n_chunks": layout.info.n_chunks, "n_workers": cluster.n_workers(dc),
        "n_train": layout.n_train, "dashboard": cluster.dashboard_link(dc),
        "run_dir": runlog.where(layout.run_dir).get("run_dir"),
        "model_parallel": {
            "shards": len(layout.bounds), "bounds": [list(c) for c in layout.bounds],
            # what travels per iteration: partial outputs and residuals, float64
            "activation_bytes_per_iteration": activation_bytes(layout.info, len(layout.bounds), k),
            "parameter_bytes": layout.model.n_params * 8,
        },
        "rebuilt": rebuilds,
    }


def activation_bytes(info: StoreInfo, n_shards: int, n_out: int) -> int:
    """Bytes of ``Z`` parts and residuals one iteration moves: ``2 * rows * classes * shards``."""
    return 2 * info.n_rows * n_out * n_shards * 8


def train(dask_client: Client, url: str, info: StoreInfo, model: Model, optimizer: Optimizer,
          n_shards: int, iterations: int, seed: int, test_fraction: float,
          checkpoint_every: int | None, resume: bool, tol: float | None, run_dir: Path | None,
          on_record, chunks_per_task: int | None = None
          ) -> tuple[np.ndarray, list[dict], dict[str, Any]]:
    """Model-parallel training on ``dask_client``: ``(flat params, records, summary)``."""
    with placed(dask_client, url, info, model, optimizer, n_shards, test_fraction, seed,
                run_dir, chunks_per_task or FAN_IN) as layout:
        log.info("model-parallel: %d parameters in %d shards of columns %s", model.n_params,
                 n_shards, layout.bounds)
        start = time.perf_counter()
        params, records, stopped, rebuilds = run_loop(layout, iterations, checkpoint_every,
                                                      resume, tol, on_record)
        return params, records, summary(layout, records, stopped,
                                        time.perf_counter() - start, rebuilds)


def state_vectors(optimizer: Any) -> int:
    """Parameter-sized arrays an optimizer keeps (adam: 2), besides the step counter."""
    if not isinstance(optimizer, Optimizer):
        return 2 * getattr(optimizer, "memory", 10)  # L-BFGS keeps pairs of vectors
    return sum(1 for v in optimizer.init(np.zeros(2)).values() if np.ndim(v) > 0)


def check_fits_worker(dask_client: Client, model: Model, optimizer: Any, share: float) -> None:
    """Refuse data-parallel training whose parameters, gradient and optimizer state exceed
    ``share`` of the smallest worker memory limit: every worker would hold them whole."""
    limits = [w.get("memory_limit") or 0
              for w in dask_client.scheduler_info(n_workers=-1)["workers"].values()]
    if not limits or min(limits) <= 0:
        return
    need = model.n_params * 8 * (2 + state_vectors(optimizer))
    if need > share * min(limits):
        raise ValidationError(
            f"model {model.name} has {model.n_params:,} parameters ({need / 2**20:.0f} MiB with "
            f"its gradient and optimizer state), more than {share:.0%} of a worker's memory "
            f"limit ({min(limits) / 2**20:.0f} MiB): train it with --model-parallel "
            "(fit(..., shard_parameters=True))")
