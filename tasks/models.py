"""Models as plain functions of one flat float64 parameter vector.

A :class:`Model` bundles pure functions; nothing is stored on it between calls. Every
``loss_and_grad`` returns *sums* over the rows it was given, ``(loss_sum, grad_sum, n)``, so
per-chunk results add up exactly in any reduction tree; the objective minimised is
``loss_sum_total / n_total + penalty(params)``. Inputs may be float32: arithmetic is float64.

Per-row losses:

* ``linear``: ``0.5 * (x @ coef + intercept - y) ** 2`` (half squared error, so the gradient of
  the row is simply ``residual * x``).
* ``logistic``: binary cross-entropy with labels 0/1, ``log(1 + exp(z)) - y * z``.
* ``softmax`` and classification ``mlp``: cross-entropy ``logsumexp(z) - z[y]`` with integer
  labels ``0..K-1``.
* regression ``mlp``: half squared error summed over outputs.

Penalties (``penalty(params) -> (value, grad)``, added once to the mean loss) are
``0.5 * l2 * ||w||^2 + l1 * ||w||_1`` over weights only: intercepts and biases are never
penalised. The L1 gradient is the subgradient ``l1 * sign(w)`` (0 at 0).

Matrix products go through BLAS, so results are bit-reproducible for a fixed BLAS thread count;
a different count may change the last bits (pin it, e.g. one BLAS thread per Dask worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

TASKS = ("regression", "binary", "multiclass")


class Model(NamedTuple):
    """A model: pure functions over a flat float64 parameter vector ``p`` of length ``n_params``.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"logistic"`` or ``"mlp-64-128-10"``.
    n_params : int
        Length of the flat parameter vector.
    init : Callable[[int], ndarray]
        ``init(seed) -> p``: initial parameters.
    loss_and_grad : Callable[[ndarray, ndarray, ndarray], tuple[float, ndarray, int]]
        ``loss_and_grad(p, X, y) -> (loss_sum, grad_sum, n)``: sums over the rows of ``X``.
    predict : Callable[[ndarray, ndarray], ndarray]
        ``predict(p, X)``: int64 class indices for classification, float64 values for regression.
    penalty : Callable[[ndarray], tuple[float, ndarray]]
        ``penalty(p) -> (value, grad)``, added once to the mean loss.
    unpack : Callable[[ndarray], dict[str, ndarray]]
        Named arrays (``coef``, ``intercept``, ``W0``, ``b0``, ...) whose sizes add to ``n_params``.
    task : str
        ``"regression"``, ``"binary"`` or ``"multiclass"``.
    loss_and_predict : Callable[[ndarray, ndarray, ndarray], tuple[float, ndarray]] or None
        Optional ``loss_and_predict(p, X, y) -> (loss_sum, predict(p, X))`` from one forward
        pass. Evaluation uses it when given: test metrics need the loss and the predictions,
        not the gradient, and on a GLM the gradient and a second ``X @ w`` are two thirds of
        the work. Without it, evaluation calls ``loss_and_grad`` and ``predict``.
    predict_proba : Callable[[ndarray, ndarray], ndarray] or None
        ``predict_proba(p, X)``: class probabilities of shape ``(n, n_classes)`` (classifiers
        only; ``predict`` is their argmax up to ties).
    spec : dict or None
        How the model was built, as plain JSON values: ``{"kind": "softmax", "n_features": 13,
        "n_classes": 3, "l2": 0.001, ...}``. :func:`from_spec` builds the same model again, so a
        saved run can predict without the code or the store that trained it. ``None`` for a
        model that cannot say (then a run of it cannot be loaded back for prediction).
    """

    name: str
    n_params: int
    init: Callable[[int], np.ndarray]
    loss_and_grad: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray, int]]
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]
    penalty: Callable[[np.ndarray], tuple[float, np.ndarray]]
    unpack: Callable[[np.ndarray], dict[str, np.ndarray]]
    task: str
    loss_and_predict: Callable[[np.ndarray, np.ndarray, np.ndarray],
                               tuple[float, np.ndarray]] | None = None
    predict_proba: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    spec: dict | None = None

    def __hash__(self) -> int:
        # The functions identify a model; ``spec`` is a dict (unhashable) that follows from them.
        return hash(tuple(self)[:-1])


# --------------------------------------------------------------------------------------------
# shared pieces


def _as_float(X: np.ndarray) -> np.ndarray:
    """Float64 view (or one copy for float32/int input): all arithmetic is float64.

    A scipy.sparse matrix (a model trained on a sparse store) stays sparse: ``X @ W`` of a
    CSR matrix and a dense ``W`` is dense, and costs the non-zeros, not rows x columns.
    """
    if hasattr(X, "tocsr"):
        return X.tocsr().astype(np.float64, copy=False)
    return np.asarray(X, dtype=np.float64)


def _labels(y: np.ndarray) -> np.ndarray:
    """Class indices as intp; stores may hand labels back as floats."""
    return np.asarray(y).reshape(-1).astype(np.intp, copy=False)


def _check_positive(**sizes: int) -> None:
    for key, value in sizes.items():
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


def _check_reg(l2: float, l1: float) -> None:
    if not (l2 >= 0 and l1 >= 0 and np.isfinite(l2) and np.isfinite(l1)):  # NaN fails too
        raise ValueError(f"l2 and l1 must be >= 0, got l2={l2}, l1={l1}")


def _make_penalty(
    n_params: int, weights: Sequence[slice], l2: float, l1: float
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Penalty over the ``weights`` slices of the flat vector; the other entries are free."""

    def penalty(params: np.ndarray) -> tuple[float, np.ndarray]:
        grad = np.zeros(n_params)
        if l2 == 0.0 and l1 == 0.0:
            return 0.0, grad
        value = 0.0
        for sl in weights:
            w = params[sl]
            value += 0.5 * l2 * float(w @ w) + l1 * float(np.abs(w).sum())
            grad[sl] = l2 * w + l1 * np.sign(w)
        return value, grad

    return penalty


def _zeros_init(n_params: int) -> Callable[[int], np.ndarray]:
    def init(seed: int = 0) -> np.ndarray:
        return np.zeros(n_params)

    return init


def _row_max(Z: np.ndarray) -> np.ndarray:
    """Row maxima; a loop over the few columns beats ``Z.max(axis=1)`` ~4x on tall arrays."""
    if Z.shape[1] > 64:
        return Z.max(axis=1)
    out = Z[:, 0].copy()
    for k in range(1, Z.shape[1]):
        np.maximum(out, Z[:, k], out=out)
    return out


def _col_sum(A: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Column sums as a BLAS gemv: several times faster than ``A.sum(axis=0)`` on tall arrays."""
    return np.matmul(np.ones(A.shape[0]), A, out=out)


def _log_softmax_grad(Z: np.ndarray, y: np.ndarray) -> float:
    """Cross-entropy sum of logits ``Z`` (n, K); overwrites ``Z`` with ``softmax(Z) - onehot(y)``.

    Subtracting the row maximum before ``exp`` keeps it finite for any logit magnitude.
    """
    if y.size and (y.min() < 0 or y.max() >= Z.shape[1]):
        # a negative index would silently pick the last class
        raise ValueError(f"labels must be class indices 0..{Z.shape[1] - 1}, "
                         f"got {y.min()}..{y.max()}")
    rows = np.arange(Z.shape[0])
    Z -= _row_max(Z)[:, None]
    picked = Z[rows, y].sum()
    np.exp(Z, out=Z)
    sums = Z @ np.ones(Z.shape[1])
    loss = float(np.log(sums).sum() - picked)
    Z *= (1.0 / sums)[:, None]
    Z[rows, y] -= 1.0
    return loss


def _softplus_sum(z: np.ndarray) -> float:
    """``sum(log(1 + exp(z)))`` without overflow: ``max(z, 0) + log1p(exp(-|z|))``.

    Written out because ``np.logaddexp`` is ~50x slower than ``exp`` + ``log1p`` here.
    """
    return float(np.maximum(z, 0.0).sum() + np.log1p(np.exp(-np.abs(z))).sum())


def softmax_rows(Z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``Z`` (n, K), shifted by the row maximum so ``exp`` is finite."""
    Z = np.exp(Z - _row_max(Z)[:, None])
    Z /= Z @ np.ones(Z.shape[1])[:, None]
    return Z


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # tanh form: stable for any |z| (exp(-z) would overflow for z << 0) and one transcendental.
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# --------------------------------------------------------------------------------------------
# generalised linear models: params = [coef (d*k), intercept (k)]


def _glm_layout(d: int, k: int, intercept: bool):
    n_w = d * k
    n_params = n_w + (k if intercept else 0)

    def split(params: np.ndarray) -> tuple[np.ndarray, np.ndarray | float]:
        W = params[:n_w] if k == 1 else params[:n_w].reshape(d, k)
        b = (params[n_w] if k == 1 else params[n_w:]) if intercept else 0.0
        return W, b

    def unpack(params: np.ndarray) -> dict[str, np.ndarray]:
        W, b = split(np.asarray(params, dtype=np.float64))
        out = {"coef": np.array(W)}
        if intercept:
            out["intercept"] = np.array(b)
        return out

    return n_w, n_params, split, unpack


def linear(n_features: int, l2: float = 0.0, l1: float = 0.0, intercept: bool = True) -> Model:
    """Linear regression with half squared loss ``0.5 * (X @ coef + intercept - y) ** 2``.

    Parameters
    ----------
    n_features : int
        Number of input columns.
    l2, l1 : float
        Penalty weights on ``coef`` (``0.5 * l2 * ||coef||^2 + l1 * ||coef||_1``); L1 uses the
        subgradient ``sign(coef)``.
    intercept : bool
        Fit an unpenalised intercept (default True).

    Returns
    -------
    Model
        ``task="regression"``; zeros init; ``predict`` returns float64 values of shape ``(n,)``.
    """
    _check_positive(n_features=n_features)
    _check_reg(l2, l1)
    n_w, n_params, split, unpack = _glm_layout(n_features, 1, intercept)

    def loss_and_grad(params, X, y):
        X = _as_float(X)
        w, b = split(params)
        r = X @ w
        r += b - np.asarray(y, dtype=np.float64).reshape(-1)
        grad = np.empty(n_params)
        grad[:n_w] = X.T @ r  # a transposed BLAS gemv: no copy of X
        if intercept:
            grad[n_w] = r.sum()
        return 0.5 * float(r @ r), grad, X.shape[0]

    def predict(params, X):
        w, b = split(params)
        return _as_float(X) @ w + b

    def loss_and_predict(params, X, y):
        pred = predict(params, X)
        r = pred - np.asarray(y, dtype=np.float64).reshape(-1)
        return 0.5 * float(r @ r), pred

    penalty = _make_penalty(n_params, [slice(0, n_w)], l2, l1)
    spec = {"kind": "linear", "n_features": int(n_features), "l2": float(l2), "l1": float(l1),
            "intercept": bool(intercept)}
    return Model("linear", n_params, _zeros_init(n_params), loss_and_grad, predict, penalty,
                 unpack, "regression", loss_and_predict, spec=spec)


def logistic(n_features: int, l2: float = 0.0, intercept: bool = True, l1: float = 0.0) -> Model:
    """Binary logistic regression on labels 0/1 (cross-entropy of ``sigmoid(X @ coef + b)``).

    The row loss is ``log(1 + exp(z)) - y * z``, computed as
    ``max(z, 0) + log1p(exp(-|z|)) - y * z`` so it stays finite for margins of any
    size (``log(1 + exp(1e4))`` would overflow).

    Parameters
    ----------
    n_features : int
        Number of input columns.
    l2, l1 : float
        Penalty weights on ``coef`` (intercept is never penalised).
    intercept : bool
        Fit an intercept (default True).

    Returns
    -------
    Model
        ``task="binary"``; zeros init; ``predict`` returns int64 labels 0/1.
    """
    _check_positive(n_features=n_features)
    _check_reg(l2, l1)
    n_w, n_params, split, unpack = _glm_layout(n_features, 1, intercept)

    def margin_loss(params, X, y):
        w, b = split(params)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"logistic labels must be 0/1, got {y.min()}..{y.max()}")
        z = _as_float(X) @ w
        z += b
        return z, y, _softplus_sum(z) - float(y @ z)

    def loss_and_grad(params, X, y):
        X = _as_float(X)
        z, y, loss = margin_loss(params, X, y)
        r = _sigmoid(z)
        r -= y
        grad = np.empty(n_params)
        grad[:n_w] = X.T @ r
        if intercept:
            grad[n_w] = r.sum()
        return loss, grad, X.shape[0]

    def predict(params, X):
        w, b = split(params)
        return ((_as_float(X) @ w + b) > 0).astype(np.int64)

    def loss_and_predict(params, X, y):
        z, _, loss = margin_loss(params, X, y)
        return loss, (z > 0).astype(np.int64)

    penalty = _make_penalty(n_params, [slice(0, n_w)], l2, l1)
    def predict_proba(params, X):
        w, b = split(params)
        p1 = _sigmoid(_as_float(X) @ w + b)
        return np.column_stack([1.0 - p1, p1])

    spec = {"kind": "logistic", "n_features": int(n_features), "l2": float(l2), "l1": float(l1),
            "intercept": bool(intercept)}
    return Model("logistic", n_params, _zeros_init(n_params), loss_and_grad, predict, penalty,
                 unpack, "binary", loss_and_predict, predict_proba, spec)


def softmax(n_features: int, n_classes: int, l2: float = 0.0, intercept: bool = True,
            l1: float = 0.0) -> Model:
    """Multinomial (softmax) regression on integer labels ``0..n_classes-1``.

    Parameters
    ----------
    n_features, n_classes : int
        Input columns and classes (``n_classes >= 2``).
    l2, l1 : float
        Penalty weights on ``coef`` (shape ``(n_features, n_classes)``), never on ``intercept``.
    intercept : bool
        Fit one intercept per class (default True).

    Returns
    -------
    Model
        ``task="multiclass"``; zeros init; ``predict`` returns int64 class indices.
    """
    _check_positive(n_features=n_features)
    if n_classes < 2:
        raise ValueError(f"softmax needs n_classes >= 2, got {n_classes}")
    _check_reg(l2, l1)
    n_w, n_params, split, unpack = _glm_layout(n_features, n_classes, intercept)

    def loss_and_grad(params, X, y):
        X = _as_float(X)
        W, b = split(params)
        Z = X @ W
        Z += b
        loss = _log_softmax_grad(Z, _labels(y))
        grad = np.empty(n_params)
        np.matmul(X.T, Z, out=grad[:n_w].reshape(n_features, n_classes))
        if intercept:
            _col_sum(Z, out=grad[n_w:])
        return loss, grad, X.shape[0]

    def predict(params, X):
        W, b = split(params)
        return np.argmax(_as_float(X) @ W + b, axis=1).astype(np.int64)

    def loss_and_predict(params, X, y):
        W, b = split(params)
        Z = _as_float(X) @ W
        Z += b
        pred = np.argmax(Z, axis=1).astype(np.int64)  # before Z is overwritten below
        return _log_softmax_grad(Z, _labels(y)), pred

    penalty = _make_penalty(n_params, [slice(0, n_w)], l2, l1)
    def predict_proba(params, X):
        W, b = split(params)
        return softmax_rows(_as_float(X) @ W + b)

    spec = {"kind": "softmax", "n_features": int(n_features), "n_classes": int(n_classes),
            "l2": float(l2), "l1": float(l1), "intercept": bool(intercept)}
    return Model("softmax", n_params, _zeros_init(n_params), loss_and_grad, predict, penalty,
                 unpack, "multiclass", loss_and_predict, predict_proba, spec)


# --------------------------------------------------------------------------------------------
# multilayer perceptron: params = [W0, b0, W1, b1, ...], Wi of shape (fan_in, fan_out)

Layer = tuple[slice, slice, tuple[int, int]]  # where W and b sit in the flat vector, W's shape


def _mlp_layout(sizes: Sequence[int]) -> tuple[list[Layer], int]:
    layers, offset = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = slice(offset, offset + fan_in * fan_out)
        b = slice(w.stop, w.stop + fan_out)
        layers.append((w, b, (fan_in, fan_out)))
        offset = b.stop
    return layers, offset


def _mlp_init(layers: list[Layer], n_params: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    params = np.zeros(n_params)
    for i, (w, _, (fan_in, fan_out)) in enumerate(layers):
        if i < len(layers) - 1:  # ReLU layers: He keeps the activation variance constant
            params[w] = rng.normal(0.0, np.sqrt(2.0 / fan_in), fan_in * fan_out)
        else:  # linear/softmax output: Glorot balances forward and backward variance
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            params[w] = rng.uniform(-limit, limit, fan_in * fan_out)
    return params


def _mlp_weights(layers: list[Layer], params: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Views (no copies) of each layer's ``W`` and ``b`` in the flat vector."""
    return [(params[w].reshape(shape), params[b]) for w, b, shape in layers]


def _mlp_forward(wb: list[tuple[np.ndarray, np.ndarray]], X: np.ndarray) -> list[np.ndarray]:
    """Inputs of every layer followed by the output logits/values (ReLU applied in place)."""
    acts = [X]
    for i, (W, b) in enumerate(wb):
        A = acts[-1] @ W
        A += b
        if i < len(wb) - 1:
            np.maximum(A, 0.0, out=A)
        acts.append(A)
    return acts


def _mlp_backward(layers: list[Layer], wb, acts: list[np.ndarray], D: np.ndarray,
                  n_params: int) -> np.ndarray:
    """Backpropagate ``D = dLoss/dOutput``, writing each layer's gradient into one flat buffer."""
    grad = np.empty(n_params)
    for i in range(len(layers) - 1, -1, -1):
        w, b, shape = layers[i]
        A = acts[i]
        np.matmul(A.T, D, out=grad[w].reshape(shape))
        _col_sum(D, out=grad[b])
        if i:
            D_prev = D @ wb[i][0].T
            D_prev *= A > 0  # ReLU derivative: A = relu(z) is positive exactly where z > 0
            D = D_prev
    return grad


def mlp(n_features: int, n_outputs: int, hidden: Sequence[int] = (256, 128),
        task: str = "multiclass", l2: float = 0.0, l1: float = 0.0) -> Model:
    """Multilayer perceptron with ReLU hidden layers.

    Classification (``task="multiclass"`` or ``"binary"``) uses a softmax output over
    ``n_outputs`` classes (2 for binary) and cross-entropy; regression uses a linear output and
    half squared error summed over the ``n_outputs`` targets.

    Parameters
    ----------
    n_features, n_outputs : int
        Input columns and output units, e.g. ``mlp(784, 10, (256, 128))`` is 784-256-128-10.
    hidden : sequence of int
        Hidden layer widths (may be empty: then it is a linear/softmax model).
    task : str
        ``"multiclass"``, ``"binary"`` or ``"regression"``.
    l2, l1 : float
        Penalty weights on the weight matrices (biases are never penalised).

    Returns
    -------
    Model
        ``init(seed)`` draws He-normal hidden weights and a Glorot-uniform output layer, biases
        zero. ``predict`` returns int64 classes, or float64 values (shape ``(n,)`` when
        ``n_outputs == 1``).

    References
    ----------
    He, Zhang, Ren & Sun (2015), "Delving deep into rectifiers", ICCV.
    Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward neural
    networks", AISTATS.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    hidden = tuple(int(h) for h in hidden)
    _check_positive(n_features=n_features, n_outputs=n_outputs,
                    **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    if task != "regression" and n_outputs < 2:
        raise ValueError(f"a classification mlp needs n_outputs >= 2 classes, got {n_outputs}")
    _check_reg(l2, l1)
    sizes = (int(n_features), *hidden, int(n_outputs))
    layers, n_params = _mlp_layout(sizes)
    classify = task != "regression"

    def init(seed: int = 0) -> np.ndarray:
        return _mlp_init(layers, n_params, seed)

    def loss_and_grad(params, X, y):
        X = _as_float(X)
        wb = _mlp_weights(layers, params)
        acts = _mlp_forward(wb, X)
        D = acts.pop()  # the output, overwritten in place with dLoss/dOutput
        if classify:
            loss = _log_softmax_grad(D, _labels(y))
        else:
            D -= np.asarray(y, dtype=np.float64).reshape(D.shape)
            loss = 0.5 * float(np.vdot(D, D))
        return loss, _mlp_backward(layers, wb, acts, D, n_params), X.shape[0]

    def predict(params, X):
        return _outputs(_mlp_forward(_mlp_weights(layers, params), _as_float(X))[-1])

    def _outputs(out):
        if classify:
            return np.argmax(out, axis=1).astype(np.int64)
        return out[:, 0] if n_outputs == 1 else out

    def loss_and_predict(params, X, y):
        out = _mlp_forward(_mlp_weights(layers, params), _as_float(X))[-1]
        pred = _outputs(out)
        if classify:  # argmax made its own array before the loss overwrites ``out``
            return _log_softmax_grad(out, _labels(y)), pred
        out = out - np.asarray(y, dtype=np.float64).reshape(out.shape)
        return 0.5 * float(np.vdot(out, out)), pred

    def unpack(params):
        out = {}
        for i, (W, b) in enumerate(_mlp_weights(layers, np.asarray(params, dtype=np.float64))):
            out[f"W{i}"], out[f"b{i}"] = np.array(W), np.array(b)
        return out

    penalty = _make_penalty(n_params, [w for w, _, _ in layers], l2, l1)
    def predict_proba(params, X):
        return softmax_rows(_mlp_forward(_mlp_weights(layers, params), _as_float(X))[-1])

    name = "mlp-" + "-".join(str(s) for s in sizes)
    spec = {"kind": "mlp", "n_features": int(n_features), "n_outputs": int(n_outputs),
            "hidden": list(hidden), "task": task, "l2": float(l2), "l1": float(l1)}
    return Model(name, n_params, init, loss_and_grad, predict, penalty, unpack, task,
                 loss_and_predict, predict_proba if classify else None, spec)


def pack(model: Model, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``model.unpack``: named arrays (e.g. a loaded ``params.npz``) -> flat vector.

    Raises
    ------
    ValueError
        If a name is missing or a shape differs from the model's.
    """
    template = model.unpack(np.zeros(model.n_params))
    parts = []
    for key, ref in template.items():
        if key not in arrays:
            raise ValueError(f"{model.name}: missing parameter array {key!r}")
        value = np.asarray(arrays[key], dtype=np.float64)
        if value.shape != ref.shape:
            raise ValueError(f"{model.name}: {key} has shape {value.shape}, expected {ref.shape}")
        parts.append(value.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def objective(model: Model, params: np.ndarray, X: np.ndarray, y: np.ndarray
              ) -> tuple[float, np.ndarray]:
    """Serial reference of the objective: ``loss_sum / n + penalty`` and its gradient."""
    loss, grad, n = model.loss_and_grad(params, X, y)
    pen, pen_grad = model.penalty(params)
    return loss / max(n, 1) + pen, grad / max(n, 1) + pen_grad


BUILDERS: dict[str, Callable[..., Model]] = {"linear": linear, "logistic": logistic,
                                             "softmax": softmax, "mlp": mlp}


def describe(model: Model) -> dict | None:
    """How ``model`` was built (its ``spec``), e.g. ``{"kind": "softmax", "n_features": 13,
    ...}``; ``None`` for a model that cannot say."""
    return None if model.spec is None else dict(model.spec)


def from_spec(spec: dict) -> Model:
    """The model ``spec`` describes (a ``Model.spec`` read back from JSON), built again.

    Raises
    ------
    ValueError
        An unknown ``kind`` or arguments its builder refuses.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in BUILDERS:
        raise ValueError(f"unknown model kind {kind!r} (built-in kinds: {', '.join(BUILDERS)})")
    if "hidden" in spec:
        spec["hidden"] = tuple(spec["hidden"])
    return BUILDERS[kind](**spec)
