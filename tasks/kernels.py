"""Fused, cache-blocked gradient kernels for the built-in generalised linear models.

A GLM's gradient reads ``X`` twice: ``z = X @ w`` forward, ``X.T @ r`` backward. On a chunk
larger than the CPU cache both reads come from memory, and memory bandwidth is what a GLM pass
costs. :func:`glm_loss_and_grad` walks the chunk in row blocks of about :data:`BLOCK_BYTES`,
doing the forward and the backward product on one block while it is still in cache, so ``X``
is read from memory once; the elementwise work reuses preallocated buffers.

The result is ``model.loss_and_grad``'s ``(loss_sum, grad_sum, n)`` up to rounding (the sums
are added block by block). On a float32 ``X`` both products run in float32 (half the bytes to
read); the per-block results and everything elementwise stay float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from fedpipe.tasks.models import _log_softmax_grad

# Rows per block: about this many bytes of X. A 1 MiB block (2.6k float64 rows of 50 features)
# and its buffers stay in a 2 MiB L2 between the two products; larger blocks measured slower.
BLOCK_BYTES = 2**20
GLM_KINDS = ("linear", "logistic", "softmax")

Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray, int]]


def fused(model: Any) -> Kernel | None:
    """The fused ``kernel(params, X, y) -> (loss_sum, grad_sum, n)`` of a built-in GLM.

    ``None`` for any other model (an MLP, a model of your own): callers then use
    ``model.loss_and_grad``. The model is recognised by its ``spec`` (the built-in factories
    write it) and checked against its parameter count.
    """
    spec = getattr(model, "spec", None) or {}
    kind = spec.get("kind")
    if kind not in GLM_KINDS or model.name != kind:
        return None
    d, k = int(spec["n_features"]), int(spec.get("n_classes", 1))
    intercept = bool(spec.get("intercept", True))
    if model.n_params != d * k + (k if intercept else 0):
        return None

    def kernel(params: np.ndarray, X: np.ndarray, y: np.ndarray):
        return glm_loss_and_grad(kind, d, k, intercept, params, X, y)

    return kernel


def glm_loss_and_grad(kind: str, d: int, k: int, intercept: bool, params: np.ndarray,
                      X: np.ndarray, y: np.ndarray, block_bytes: int | None = None
                      ) -> tuple[float, np.ndarray, int]:
    """``(loss_sum, grad_sum, n)`` of a ``linear``/``logistic``/``softmax`` model on ``X``.

    Parameters
    ----------
    kind : {"linear", "logistic", "softmax"}
    d, k : int
        Features and outputs (``k = 1`` except for softmax).
    intercept : bool
        Whether ``params`` ends with ``k`` intercepts.
    params : ndarray
        Flat float64 ``[coef (d*k), intercept (k)]``.
    X, y : ndarray
        Rows (float32 or float64; anything else is computed as float64) and labels.
    block_bytes : int, optional
        Bytes of ``X`` per block (default :data:`BLOCK_BYTES`).
    """
    if X.dtype not in (np.float32, np.float64):
        X = np.asarray(X, dtype=np.float64)
    n, n_w = X.shape[0], d * k
    y = _labels(kind, y, k)
    W = np.asarray(params[:n_w]).reshape(d, k).astype(X.dtype)
    b = np.asarray(params[n_w:n_w + k]) if intercept else np.zeros(k)
    grad = np.zeros(n_w + (k if intercept else 0))
    grad_w, loss = grad[:n_w].reshape(d, k), 0.0
    step = max((block_bytes or BLOCK_BYTES) // max(X.itemsize * d, 1), 1)
    Z = np.empty((min(step, n), k), dtype=X.dtype)
    for start in range(0, n, step):
        B = X[start:start + step]
        z = np.matmul(B, W, out=Z[:B.shape[0]])
        r = z.astype(np.float64) if X.dtype != np.float64 else z
        r += b
        loss += _residual(kind, r, y[start:start + step])
        grad_w += B.T @ (r.astype(X.dtype, copy=False))
        if intercept:
            grad[n_w:] += np.ones(r.shape[0]) @ r
    return loss, grad, n


def _labels(kind: str, y: np.ndarray, k: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if kind == "softmax":
        return y.astype(np.intp, copy=False)
    y = y.astype(np.float64, copy=False)
    if kind == "logistic" and y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError(f"logistic labels must be 0/1, got {y.min()}..{y.max()}")
    return y


def _residual(kind: str, r: np.ndarray, y: np.ndarray) -> float:
    """Loss sum of the margins ``r`` (n, k); overwrites ``r`` with dLoss/dMargin."""
    if kind == "softmax":
        return _log_softmax_grad(r, y)
    z = r[:, 0]
    if kind == "linear":
        z -= y
        return 0.5 * float(z @ z)
    # log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), and sigmoid(z) = 1 / (1 + exp(-|z|))
    # mirrored about 0.5 for negative z: one exp for both, no masked (where=) operations,
    # which cost several times an exp here.
    a = np.abs(z)
    e = np.exp(np.negative(a))
    loss = 0.5 * (_sum(z) + _sum(a)) + _sum(np.log1p(e, out=a)) - float(y @ z)
    e += 1.0
    np.divide(1.0, e, out=e)
    e -= 0.5
    np.copysign(e, z, out=e)
    e += 0.5
    np.subtract(e, y, out=z)
    return loss


def _sum(v: np.ndarray) -> float:
    # a BLAS dot with ones: several times faster than v.sum() on long vectors
    return float(np.ones(v.shape[0]) @ v)
