"""Pure per-chunk functions the data-parallel engine runs on workers, and the sums it adds up.

Each chunk task returns a tuple of *sums* (``loss_sum``, ``grad_sum``, ``n``, ...), so that any
grouping of chunks adds up to the same totals; :func:`add_sums` adds them in argument order,
which makes a fixed reduction tree bit-for-bit reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from fedpipe.tasks import kernels

# Names of the entries of :func:`eval_sums`' vector (kept in one place for finish_metrics).
EVAL_FIELDS = ("loss_sum", "n", "correct", "sse", "y_sum", "y_sq_sum")
# Rows of a chunk are handed to the model in slices of about this many bytes of X: a model
# reads X twice (X @ w, then X.T @ r), and a slice that fits in the CPU cache is read from
# memory once instead of twice, which halves a memory-bound GLM's time per chunk.
SLICE_BYTES = 4 * 2**20


def add_sums(*parts: Any) -> Any:
    """Element-wise sum of same-shaped tuples (or arrays, or numbers), left to right.

    Parameters
    ----------
    *parts
        Chunk results, e.g. ``(loss_sum, grad_sum, n)`` tuples.

    Returns
    -------
    The sum, of the same structure as each part.
    """
    if not parts:
        raise ValueError("add_sums needs at least one part")
    total = parts[0]
    for part in parts[1:]:
        if isinstance(total, tuple):
            total = tuple(a + b for a, b in zip(total, part, strict=True))
        else:
            total = total + part
    return total


def aligned(array: np.ndarray) -> np.ndarray:
    """``array``, copied only if its buffer is not aligned to its item size.

    Arrays unpickled from Dask's network frames can start at any byte; NumPy then bypasses
    BLAS for ``@`` and sums in another order, which would make results depend on how the
    bytes travelled. Aligning first keeps every worker on the same code path, bit for bit.
    """
    if hasattr(array, "tocsr"):  # scipy.sparse (a sparse store's rows): no buffer to align
        return array
    return np.require(array, requirements="A")


def row_slices(X: np.ndarray, slice_bytes: int | None = None) -> list[slice]:
    """Consecutive row ranges of ``X`` of about ``slice_bytes`` (:data:`SLICE_BYTES`) each.

    At least one row per slice, and one empty slice for no rows. Depends only on the shape
    and dtype, so every worker slices a chunk the same way.
    """
    n = X.shape[0]
    if hasattr(X, "tocsr"):  # sparse rows cost their non-zeros: one slice
        return [slice(0, n)]
    row_bytes = max(X.itemsize * int(np.prod(X.shape[1:], dtype=np.int64)), 1)
    step = max((slice_bytes or SLICE_BYTES) // row_bytes, 1)
    return [slice(i, i + step) for i in range(0, n, step)] or [slice(0, 0)]


def chunk_loss_and_grad(model: Any, params: np.ndarray, data: tuple[np.ndarray, np.ndarray]):
    """``model.loss_and_grad`` on one chunk ``data = (X, y)``: ``(loss_sum, grad_sum, n)``.

    Computed over cache-sized :func:`row_slices` and added left to right: the same sums as
    the whole chunk up to rounding, in a fixed order (bit-identical wherever it runs). The
    built-in GLMs use their fused kernel (:func:`fedpipe.tasks.kernels.fused`) instead.
    """
    X, y, params = aligned(data[0]), aligned(data[1]), aligned(params)
    if (kernel := kernels.fused(model)) is not None:
        return kernel(params, X, y)
    return add_sums(*(model.loss_and_grad(params, X[rows], y[rows]) for rows in row_slices(X)))


def batch_loss_and_grad(
    model: Any, params: np.ndarray, data: tuple[np.ndarray, np.ndarray], rows: np.ndarray
):
    """``model.loss_and_grad`` on the ``rows`` of one chunk (a piece of a mini-batch)."""
    X, y = data
    return model.loss_and_grad(aligned(params), aligned(X[rows]), aligned(y[rows]))


Chunk = tuple[np.ndarray, np.ndarray]


def block_loss_and_grad(model: Any, params: np.ndarray, block: Sequence[Chunk]):
    """:func:`chunk_loss_and_grad` of each chunk of a block, added left to right.

    A block of ``fan_in`` consecutive chunks gives exactly the value of the first level of the
    fixed reduction tree over those chunks, so fusing it into one task changes no bit.
    """
    return add_sums(*(chunk_loss_and_grad(model, params, chunk) for chunk in block))


def block_eval_sums(model: Any, params: np.ndarray, block: Sequence[Chunk]) -> np.ndarray:
    """:func:`eval_sums` of each chunk of a block, added left to right."""
    return add_sums(*(eval_sums(model, params, chunk) for chunk in block))


def block_batch_loss_and_grad(model: Any, params: np.ndarray, block: Sequence[Chunk],
                              index: int, rows: np.ndarray):
    """:func:`batch_loss_and_grad` on the ``rows`` of chunk ``index`` of a block."""
    return batch_loss_and_grad(model, params, block[index], rows)


def eval_sums(model: Any, params: np.ndarray, data: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sums that metrics are made of, for one chunk: see :data:`EVAL_FIELDS`.

    ``correct`` counts right class predictions (classification); ``sse``, ``y_sum`` and
    ``y_sq_sum`` give RMSE and R² (regression). Unused entries are zero. Computed over
    cache-sized :func:`row_slices`, as :func:`chunk_loss_and_grad`.
    """
    X, y, params = aligned(data[0]), aligned(data[1]), aligned(params)
    return add_sums(*(_eval_slice(model, params, X[rows], y[rows]) for rows in row_slices(X)))


def _eval_slice(model: Any, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros(len(EVAL_FIELDS))
    if len(y) == 0:
        return out
    fused = getattr(model, "loss_and_predict", None)  # a user's model may not have it
    if fused is not None:
        loss_sum, pred = fused(params, X, y)
        n = X.shape[0]
    else:
        loss_sum, _, n = model.loss_and_grad(params, X, y)
        pred = model.predict(params, X)
    out[0], out[1] = loss_sum, n
    if model.task == "regression":
        y = np.asarray(y, dtype=np.float64).reshape(pred.shape)
        out[3] = np.sum((pred - y) ** 2)
        out[4], out[5] = np.sum(y), np.sum(y * y)
    else:
        out[2] = np.count_nonzero(pred.reshape(-1) == np.asarray(y).reshape(-1))
    return out


def objective(loss_sum: float, grad_sum: np.ndarray, n: int, model: Any, params: np.ndarray):
    """Mean loss plus penalty and its gradient, from the summed chunk results.

    Returns
    -------
    (float, np.ndarray)
        ``loss_sum / n + penalty(params)`` and its gradient.
    """
    pen, pen_grad = model.penalty(params)
    n = max(int(n), 1)
    return float(loss_sum) / n + float(pen), np.asarray(grad_sum) / n + pen_grad


def finish_metrics(sums: Sequence[float], task: str, prefix: str = "test") -> dict[str, float]:
    """Turn an :func:`eval_sums` total into ``{prefix}_loss`` and accuracy or RMSE and R²."""
    s = dict(zip(EVAL_FIELDS, (float(v) for v in sums), strict=True))
    n = s["n"]
    if n == 0:
        return {}
    metrics = {f"{prefix}_loss": s["loss_sum"] / n}
    if task == "regression":
        centred = s["y_sq_sum"] - s["y_sum"] ** 2 / n
        metrics[f"{prefix}_rmse"] = float(np.sqrt(s["sse"] / n))
        metrics[f"{prefix}_r2"] = 1.0 - s["sse"] / centred if centred > 0 else float("nan")
    else:
        metrics[f"{prefix}_accuracy"] = s["correct"] / n
    return metrics

