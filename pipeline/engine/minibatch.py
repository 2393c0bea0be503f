"""Mini-batch training with epochs: each step sums the gradient of a few rows of some chunks.

The epoch's row order is derived from ``(seed, epoch)`` alone: chunks in a seeded order, rows
of each chunk in a seeded order, cut into consecutive batches of ``batch_size`` rows. A batch
may span chunks; each piece is one ``grad-…`` task on the worker holding that chunk, and the
pieces are added by the same fixed-order tree as full-batch training. Checkpoints are taken
at epoch ends, so the "RNG state" to save is just ``(seed, epoch)``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from distributed import span
from fedpipe.data.store import split_row_counts
from fedpipe.engine.graph import tree_sum
from fedpipe.engine.train_data import SIDES, on_side, send_params, stream_chunk
from fedpipe.engine.train_pass import Engine, Pass, full_pass
from fedpipe.engine.train_records import (
    check_finite,
    converged,
    emit,
    pass_record,
    save_state,
    start_state,
)
from fedpipe.tasks import reduce
from fedpipe.tasks.optimizers import Optimizer, apply_updates

KIND = "mini-batch"
Piece = tuple[int, np.ndarray]  # (chunk index, rows of that chunk)


def epoch_batches(counts: list[int], batch_size: int, seed: int, epoch: int) -> list[list[Piece]]:
    """The batches of one epoch, each a list of ``(chunk, rows)`` pieces in a fixed order.

    Parameters
    ----------
    counts : list of int
        Training rows of each chunk.
    batch_size : int
        Rows per batch (the last batch of the epoch may be smaller).
    seed, epoch : int
        Seed the order: the same pair gives the same batches on every run.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(counts))
    chunk_ids = np.concatenate([np.full(counts[c], c) for c in order] or [np.zeros(0, int)])
    rows = np.concatenate([rng.permutation(counts[c]) for c in order] or [np.zeros(0, int)])
    batches = []
    for start in range(0, len(rows), batch_size):
        ids, picked = chunk_ids[start:start + batch_size], rows[start:start + batch_size]
        # Chunks in order of first appearance: the tree's leaf order is part of the result.
        firsts = sorted(np.unique(ids, return_index=True)[1])
        batches.append([(int(ids[i]), np.sort(picked[ids == ids[i]])) for i in firsts])
    return batches


def train_row_counts(engine: Engine) -> list[int]:
    """Training rows per chunk, from the store's metadata and the split mask (no task, no read).

    Counting on the workers would read every chunk when streaming, a whole extra pass over
    the data before the first batch; the metadata gives the same counts (see
    :func:`fedpipe.data.store.split_row_counts`).
    """
    data = engine.data
    return [split_row_counts(data.info, ref, test_fraction=data.test_fraction, seed=data.seed)[0]
            for ref in data.refs]


def batch_gradient(engine: Engine, params: np.ndarray, pieces: list[Piece]):
    """Objective and gradient of the mean loss over one batch (plus the penalty)."""
    dc, data, token = engine.dask_client, engine.data, f"grad-{uuid.uuid4().hex}"
    sent = send_params(dc, params)
    if data.mode == "memory":
        per_block = len(data.blocks[0])  # chunk c is item c % per_block of block c // per_block
        leaves = [dc.submit(on_side, reduce.block_batch_loss_and_grad, SIDES["train"],
                            engine.model_future, sent, data.loaded[c // per_block],
                            c % per_block, rows, key=(token, j))
                  for j, (c, rows) in enumerate(pieces)]
    else:
        leaves = [dc.submit(stream_chunk, reduce.batch_loss_and_grad, engine.model_future, sent,
                            data.url, data.refs[c], "train", data.test_fraction, data.seed,
                            data.info, rows, key=(token, j)) for j, (c, rows) in enumerate(pieces)]
    loss_sum, grad_sum, n = tree_sum(dc, leaves, engine.fan_in, "sum").result()
    return reduce.objective(loss_sum, grad_sum, n, engine.model, params)


def run_epochs(engine: Engine, optimizer: Optimizer, epochs: int, batch_size: int | None,
               seed: int, checkpoint_every: int | None, resume: bool, tol: float | None):
    """Mini-batch training for ``epochs`` epochs; one record per epoch (and one for epoch 0).

    ``train_loss`` of a record is the full training objective at the epoch's end parameters
    (one extra pass per epoch, which also gives the test metrics).
    """
    counts = train_row_counts(engine)
    batch_size = batch_size or max(engine.data.info.chunk_rows, 1)
    start, params, state = start_state(engine, optimizer, "epoch", KIND, seed, resume)
    records: list[dict[str, Any]] = []
    t0 = last = time.perf_counter()
    stopped = "epochs"
    for epoch in range(start, epochs + 1):
        if epoch > start:
            with span(f"epoch-{epoch}"):
                params, state = _one_epoch(engine, optimizer, params, state, counts,
                                           batch_size, seed, epoch)
        result: Pass = full_pass(engine, params)
        now = time.perf_counter()
        check_finite(result.loss, "epoch", epoch, engine.run_dir)
        emit(engine, pass_record("epoch", epoch, result, now - last, now - t0,
                                 steps=int(state["step"])), records)
        last = time.perf_counter()  # time spent in on_record is not training time
        if epoch > start and checkpoint_every and epoch % checkpoint_every == 0:
            save_state(engine, "epoch", epoch, params, state, seed, kind=KIND)
        if converged(records, tol):
            stopped = "tol"
            break
    save_state(engine, "epoch", records[-1]["epoch"], params, state, seed, kind=KIND)
    return params, records, stopped


def _one_epoch(engine, optimizer, params, state, counts, batch_size, seed, epoch):
    for pieces in epoch_batches(counts, batch_size, seed, epoch):
        loss, grad = batch_gradient(engine, params, pieces)
        check_finite(loss, "epoch", epoch, engine.run_dir)
        updates, state = optimizer.update(grad, state, params)
        params = apply_updates(params, updates)
    return params, state
