"""The worker side of model-parallel training: feature blocks of the parameters held in place.

Each shard ``j`` (a feature block ``W_j``, its optimizer state and its columns of the rows it
has read) lives in :data:`SHARDS` of the worker process that carries the shard's resource
(:mod:`fedpipe.engine.sharded` pins every task of shard ``j`` there). The scheduler does not
know about these arrays, so it never moves them; they leave the worker only as a checkpoint file
written by this worker, or once at the end of the run (:func:`fetch`). A restarted worker has
an empty :data:`SHARDS`: its tasks raise :class:`ShardLost` and the driver rebuilds the shard
from the last checkpoint.

The arithmetic is :mod:`fedpipe.tasks.sharded`'s; here is only where the arrays are kept.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe.data.blocks import read_columns
from fedpipe.data.store import ChunkRef, StoreInfo
from fedpipe.tasks import sharded
from fedpipe.tasks.optimizers import Optimizer

SHARDS: dict[tuple[str, int], dict[str, Any]] = {}
_LOCK = threading.Lock()


class ShardLost(RuntimeError):
    """A task of a shard ran on a worker that does not hold it (the holder died)."""


def _shard(token: str, j: int) -> dict[str, Any]:
    with _LOCK:
        entry = SHARDS.get((token, j))
    if entry is None:
        raise ShardLost(f"shard {j} of run {token} is not on this worker (its worker was lost)")
    return entry


def shard_file(directory: str | os.PathLike[str], j: int) -> Path:
    """Where shard ``j`` of a checkpoint generation is written."""
    return Path(directory) / f"shard-{j}.npz"


def install(token: str, j: int, cols: tuple[int, int], optimizer: Optimizer, l2: float,
            l1: float, W: np.ndarray | None = None, source: str | None = None) -> int:
    """Put shard ``j`` on this worker: ``W`` fresh (with a new optimizer state) or its
    checkpoint file ``source`` (read here: the block never passes through the driver).
    Returns the bytes held for parameters and optimizer state."""
    if source is not None:
        with np.load(shard_file(source, j)) as f:
            W = f["W"]
            state = {k[4:]: f[k] for k in f.files if k.startswith("opt/")}
    else:
        state = optimizer.init(W.reshape(-1))
    entry = {"W": np.array(W, dtype=np.float64), "state": state, "optimizer": optimizer,
             "l2": l2, "l1": l1, "cols": tuple(cols), "rows": {}}
    with _LOCK:
        SHARDS[(token, j)] = entry
    return int(entry["W"].nbytes + sum(np.asarray(v).nbytes for v in state.values()))


def forward(token: str, j: int, url: str, info: StoreInfo, group: int,
            refs: Sequence[ChunkRef], test_fraction: float, seed: int,
            with_labels: bool) -> tuple:
    """``(Z_train, Z_test, y_train, y_test)``: partial outputs of the row chunks ``refs`` (row
    block ``group``) through feature block ``j`` (labels only from the first shard). The
    block's columns are read on first use and kept here."""
    entry = _shard(token, j)
    rows = entry["rows"].get(group)
    if rows is None:
        rows = _read_group(url, info, refs, entry["cols"], test_fraction, seed)
        entry["rows"][group] = rows
    (X_tr, y_tr), (X_te, y_te) = rows
    W = entry["W"]
    return (sharded.block_forward(X_tr, W), sharded.block_forward(X_te, W),
            y_tr if with_labels else None, y_te if with_labels else None)


def _read_group(url: str, info: StoreInfo, refs: Sequence[ChunkRef], cols: tuple[int, int],
                test_fraction: float, seed: int) -> tuple:
    parts = [read_columns(url, info, ref, cols, test_fraction=test_fraction, seed=seed)
             for ref in refs]
    return tuple((_stack([p[side][0] for p in parts]), np.concatenate([p[side][1] for p in parts]))
                 for side in (0, 1))


def _stack(blocks: list) -> Any:
    if hasattr(blocks[0], "tocsr"):  # scipy.sparse chunks stay sparse
        import scipy.sparse as sp

        return sp.vstack(blocks, format="csr")
    return np.concatenate(blocks)


def head_task(task: str, b: np.ndarray, *parts: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One row block's ``(sums, residual)``: ``sums = [loss_sum, n, *residual column sums,
    *test eval sums]`` from the feature blocks' partial outputs, added in shard order."""
    y_tr, y_te = parts[0][2], parts[0][3]
    loss, R = sharded.head(task, [p[0] for p in parts], b, y_tr)
    test = sharded.head_eval(task, [p[1] for p in parts], b, y_te)
    sums = np.concatenate([[loss, len(y_tr)], R.sum(axis=0), test])
    return sums, R


def backward(token: str, j: int, n: int, apply: bool, save_to: str | None,
             *heads: tuple) -> tuple[float, np.ndarray | None]:
    """Shard ``j``'s gradient summed over the row blocks (in their order) and, with ``apply``,
    its optimizer's step in place; then its checkpoint file when ``save_to`` is given.

    Returns the block's penalty at the parameters of the forward pass and, for shard 0, the
    row blocks' ``sums`` added in order (the driver's one small result of the iteration).
    """
    entry = _shard(token, j)
    W = entry["W"]
    pen, _ = sharded.block_penalty(W, entry["l2"], entry["l1"])
    if apply:
        grad = np.zeros_like(W)
        for group, (_, R) in enumerate(heads):
            grad += sharded.block_grad(entry["rows"][group][0][0], R)
        W, state, pen = sharded.block_step(entry["optimizer"], W, entry["state"], grad, n,
                                           entry["l2"], entry["l1"])
        entry["W"], entry["state"] = W, state
    if save_to is not None:
        _save(save_to, j, entry)
    sums = None
    if j == 0:
        sums = heads[0][0].copy()
        for s, _ in heads[1:]:
            sums += s
    return pen, sums


def _save(directory: str, j: int, entry: dict[str, Any]) -> None:
    path = shard_file(directory, j)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
    np.savez(tmp, W=entry["W"], **{f"opt/{k}": v for k, v in entry["state"].items()})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fetch(token: str, j: int) -> np.ndarray:
    """Shard ``j``'s block, to gather the final parameters (once, at the end of the run)."""
    return _shard(token, j)["W"]


def held(token: str, j: int) -> bool:
    """Whether this worker holds shard ``j`` (a test's probe)."""
    with _LOCK:
        return (token, j) in SHARDS


def drop(token: str) -> int:
    """Forget every shard of run ``token`` on this worker; returns how many there were."""
    with _LOCK:
        keys = [k for k in SHARDS if k[0] == token]
        for k in keys:
            del SHARDS[k]
    return len(keys)
