"""Model-parallel GLM math: one feature block's share of a linear model's passes.

A linear, logistic or softmax model's weights ``W`` (features x classes) are cut by rows into
feature blocks ``W_j``; a chunk of rows ``X_i`` is cut the same way into ``X_ij``. Then

* forward: ``Z_i = sum_j X_ij @ W_j + b`` (:func:`block_forward`, then :func:`head`, which adds
  the partial outputs in the order of ``j``: a fixed-order sum over feature blocks);
* loss and residual on the row block: ``R_i = dL/dZ_i`` (rows x classes, :func:`head`);
* backward: ``grad W_j = sum_i X_ij.T @ R_i`` (:func:`block_grad`, summed over row blocks in
  the order of ``i`` by the caller), then ``W_j``'s own optimizer steps (:func:`block_step`).

Only ``Z`` and ``R`` (rows x classes) cross blocks, never ``W_j``. The optimizer runs on each
block separately, which equals one optimizer on the flat vector for element-wise transforms
(sgd, momentum, adam, ...); a transform that couples all entries (``clip_by_global_norm``)
does not split and is refused by :func:`check_blockwise`. The losses are those of
:mod:`fedpipe.tasks.models` (sums over rows), so the result equals the unsharded model's.

Sparse chunks (``scipy.sparse`` CSR matrices) work unchanged: ``@`` and ``.T @`` are all the
blocks need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from fedpipe.tasks import models as models_mod
from fedpipe.tasks.optimizers import Optimizer, State, apply_updates
from fedpipe.tasks.reduce import EVAL_FIELDS

SHARDABLE = ("linear", "logistic", "softmax")


def layout(model: models_mod.Model) -> tuple[int, int, bool]:
    """``(n_features, n_outputs, intercept)`` of a shardable model, from its spec."""
    spec = model.spec or {}
    if spec.get("kind") not in SHARDABLE:
        raise ValueError(f"model-parallel training shards linear, logistic and softmax models, "
                         f"not {model.name}")
    return int(spec["n_features"]), int(spec.get("n_classes", 1)), bool(spec["intercept"])


def check_blockwise(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose update of one entry depends on other entries."""
    spec = optimizer.spec
    text = repr(spec)
    if spec is None or "clip_by_global_norm" in text:
        raise ValueError("model-parallel training needs an element-wise optimizer (sgd, "
                         "momentum, adagrad, rmsprop, adam, yogi): a global-norm clip or an "
                         "optimizer without a spec does not split by feature block")


def feature_bounds(n_features: int, n_shards: int, block: int | None = None) -> list[tuple[int, int]]:
    """Contiguous column ranges of ``n_shards`` feature blocks, as even as possible.

    With ``block`` (the store's feature-chunk width) the cuts fall on chunk edges, so each
    shard reads whole stored chunks.
    """
    if n_shards < 1 or n_shards > n_features:
        raise ValueError(f"shards must be in 1..{n_features} (features), got {n_shards}")
    unit = block or 1
    n_units = -(-n_features // unit)
    if n_shards > n_units:
        raise ValueError(f"{n_shards} shards but the store has {n_units} feature chunks")
    cuts = [round(u * n_units / n_shards) * unit for u in range(n_shards + 1)]
    cuts[-1] = n_features
    return [(a, min(b, n_features)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def split_params(params: np.ndarray, bounds: Sequence[tuple[int, int]], n_out: int,
                 intercept: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """The flat GLM vector ``[coef, intercept]`` as feature blocks ``W_j`` and intercept ``b``."""
    d = bounds[-1][1]
    W = np.asarray(params[: d * n_out], dtype=np.float64).reshape(d, n_out)
    b = np.array(params[d * n_out:], dtype=np.float64) if intercept else np.zeros(0)
    return [W[a:z].copy() for a, z in bounds], b


def join_params(blocks: Sequence[np.ndarray], b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split_params`: one flat vector for ``params.npz`` and ``predict``."""
    return np.concatenate([np.concatenate([W.reshape(-1) for W in blocks]), b.reshape(-1)])


def block_forward(X: Any, W: np.ndarray) -> np.ndarray:
    """Partial outputs ``X_ij @ W_j`` (rows x outputs) of one chunk's feature block."""
    return np.asarray(X @ W, dtype=np.float64).reshape(X.shape[0], W.shape[1])


def block_grad(X: Any, R: np.ndarray) -> np.ndarray:
    """``X_ij.T @ R_i``: one row block's gradient sum for feature block ``j``."""
    return np.asarray(X.T @ R, dtype=np.float64).reshape(X.shape[1], R.shape[1])


def head(task: str, parts: Sequence[np.ndarray], b: np.ndarray,
         y: np.ndarray) -> tuple[float, np.ndarray]:
    """Loss sum and residual ``dL/dZ`` of one row block from its partial outputs.

    ``parts`` are added in their order (the fixed-order sum over feature blocks), then the
    intercept ``b`` (empty: none).
    """
    Z = parts[0].copy()
    for part in parts[1:]:
        Z += part
    if b.size:
        Z += b
    if task == "multiclass":
        loss = models_mod._log_softmax_grad(Z, models_mod._labels(y))
        return loss, Z
    z, y = Z[:, 0], np.asarray(y, dtype=np.float64).reshape(-1)
    if task == "binary":
        loss = models_mod._softplus_sum(z) - float(y @ z)
        r = models_mod._sigmoid(z) - y
    else:
        r = z - y
        loss = 0.5 * float(r @ r)
    return loss, r[:, None]


def head_eval(task: str, parts: Sequence[np.ndarray], b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:func:`fedpipe.tasks.reduce.eval_sums` of one row block's test rows, from partial outputs."""
    out = np.zeros(len(EVAL_FIELDS))
    if len(y) == 0:
        return out
    Z = np.sum(np.stack(parts), axis=0) + (b if b.size else 0.0)
    if task == "multiclass":
        pred = np.argmax(Z, axis=1)
    elif task == "binary":
        pred = (Z[:, 0] > 0).astype(np.int64)
    else:
        pred = Z[:, 0]
    loss, _ = head(task, [Z], np.zeros(0), y)
    out[0], out[1] = loss, len(y)
    if task == "regression":
        yv = np.asarray(y, dtype=np.float64).reshape(-1)
        out[3], out[4], out[5] = np.sum((pred - yv) ** 2), yv.sum(), yv @ yv
    else:
        out[2] = np.count_nonzero(pred == np.asarray(y).reshape(-1))
    return out


def block_penalty(W: np.ndarray, l2: float, l1: float) -> tuple[float, np.ndarray]:
    """``0.5 * l2 * ||W_j||^2 + l1 * ||W_j||_1`` and its (sub)gradient, as the model's penalty."""
    w = W.reshape(-1)
    if l2 == 0.0 and l1 == 0.0:
        return 0.0, np.zeros_like(w)
    return 0.5 * l2 * float(w @ w) + l1 * float(np.abs(w).sum()), l2 * w + l1 * np.sign(w)


def block_step(optimizer: Optimizer, W: np.ndarray, state: State, grad_sum: np.ndarray,
               n: int, l2: float, l1: float) -> tuple[np.ndarray, State, float]:
    """One optimizer step of feature block ``W_j`` on the mean loss plus its penalty.

    Returns
    -------
    (W_new, state_new, penalty)
        ``penalty`` is the block's penalty at ``W`` (before the step), for the objective.
    """
    pen, pen_grad = block_penalty(W, l2, l1)
    grad = grad_sum.reshape(-1) / max(int(n), 1) + pen_grad
    updates, state = optimizer.update(grad, state, W.reshape(-1))
    return apply_updates(W.reshape(-1), updates).reshape(W.shape), state, pen
