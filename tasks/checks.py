"""Conformance checks run against every model and optimizer (scikit-learn ``estimator_checks``
style): one function per contract, raising ``AssertionError`` with a message naming what broke.

Use them on your own model or optimizer before handing it to fedpipe::

    check_model(my_model, X, y)
    check_optimizer(lambda lr: my_optimizer(lr))
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np

from .models import TASKS, Model
from .optimizers import Optimizer, apply_updates, describe, from_spec
from .schedules import Schedule

# --------------------------------------------------------------------------------------------
# models


def _fail(message: str) -> None:
    # A real exception rather than `assert`, so the checks still run under `python -O`.
    raise AssertionError(message)


def _call(model: Model, params: np.ndarray, X: np.ndarray, y: np.ndarray):
    out = model.loss_and_grad(params, X, y)
    if not (isinstance(out, tuple) and len(out) == 3):
        _fail(f"{model.name}: loss_and_grad must return (loss_sum, grad_sum, n), got {type(out)}")
    loss, grad, n = out
    grad = np.asarray(grad)
    if grad.shape != (model.n_params,) or grad.dtype != np.float64:
        _fail(f"{model.name}: grad has shape {grad.shape} dtype {grad.dtype}, "
              f"expected ({model.n_params},) float64")
    if not (np.isfinite(loss) and np.all(np.isfinite(grad))):
        _fail(f"{model.name}: loss or gradient is not finite")
    return float(loss), grad, n


def _check_init(model: Model, seed: int) -> np.ndarray:
    if model.task not in TASKS:
        _fail(f"{model.name}: task {model.task!r} is not one of {TASKS}")
    p = model.init(seed)
    if not (isinstance(p, np.ndarray) and p.shape == (model.n_params,) and p.dtype == np.float64):
        _fail(f"{model.name}: init must return a float64 vector of shape ({model.n_params},)")
    if not np.array_equal(p, model.init(seed)):
        _fail(f"{model.name}: init({seed}) is not deterministic")
    return p


def _check_gradient(model, params, X, y, rng, rtol, max_coords) -> None:
    """Central differences along a random direction and on sampled coordinates."""
    _, grad, _ = _call(model, params, X, y)

    def loss_at(p):
        return _call(model, p, X, y)[0]

    direction = rng.normal(size=model.n_params)
    h = 1e-6 * max(1.0, float(np.abs(params).max(initial=0.0)))
    fd = (loss_at(params + h * direction) - loss_at(params - h * direction)) / (2 * h)
    exact = float(grad @ direction)
    if abs(fd - exact) > rtol * max(abs(exact), np.abs(grad).sum(), 1e-8):
        _fail(f"{model.name}: directional derivative {exact:.8g} != finite difference {fd:.8g}")

    coords = np.arange(model.n_params)
    if model.n_params > max_coords:
        coords = rng.choice(model.n_params, size=max_coords, replace=False)
    scale = max(float(np.abs(grad).max()), 1e-8)
    for i in coords:
        step = np.zeros(model.n_params)
        step[i] = h
        fd = (loss_at(params + step) - loss_at(params - step)) / (2 * h)
        if abs(fd - grad[i]) > rtol * scale:
            _fail(f"{model.name}: d loss / d p[{i}] = {grad[i]:.8g} but finite difference "
                  f"gives {fd:.8g}")


def _check_chunks(model, params, X, y, rng) -> None:
    """Sums over uneven chunks (one of them empty) equal the whole-array result."""
    n = X.shape[0]
    loss, grad, count = _call(model, params, X, y)
    if count != n:
        _fail(f"{model.name}: loss_and_grad counted {count} rows, X has {n}")
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(2, n - 1), replace=False))
    bounds = [0, *cuts.tolist(), n, n]  # the trailing [n:n] chunk is empty
    parts = [_call(model, params, X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:],
                                                                  strict=True)]
    total_loss = sum(p[0] for p in parts)
    total_grad = np.sum([p[1] for p in parts], axis=0)
    if sum(p[2] for p in parts) != n:
        _fail(f"{model.name}: chunk row counts do not add up to {n}")
    if not np.isclose(total_loss, loss, rtol=1e-10, atol=1e-12):
        _fail(f"{model.name}: chunked loss sum {total_loss!r} != whole-array {loss!r}")
    if not np.allclose(total_grad, grad, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(grad).max())):
        _fail(f"{model.name}: chunked gradient sum differs from the whole-array gradient")


def _check_predict(model, params, X) -> None:
    pred = np.asarray(model.predict(params, X))
    if pred.shape[:1] != (X.shape[0],) or pred.ndim > 2:
        _fail(f"{model.name}: predict returned shape {pred.shape} for {X.shape[0]} rows")
    if model.task == "regression":
        if pred.dtype != np.float64:
            _fail(f"{model.name}: regression predict must return float64, got {pred.dtype}")
    elif pred.dtype != np.int64 or pred.ndim != 1 or (pred.size and pred.min() < 0):
        _fail(f"{model.name}: classification predict must return int64 class indices (n,), "
              f"got {pred.dtype} {pred.shape}")


def _check_unpack_penalty(model, params) -> None:
    named = model.unpack(params)
    if not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in named.items()):
        _fail(f"{model.name}: unpack must return a dict of str -> ndarray")
    flat = np.concatenate([v.reshape(-1) for v in named.values()]) if named else np.zeros(0)
    if not np.array_equal(flat, params):
        _fail(f"{model.name}: unpack's arrays, ravelled in order, must cover the {model.n_params} "
              f"params exactly (got {flat.size} values)")
    value, grad = model.penalty(params)
    if not (np.isfinite(value) and np.shape(grad) == (model.n_params,)):
        _fail(f"{model.name}: penalty must return (finite float, grad of shape (n_params,))")


def check_model(model: Model, X: np.ndarray, y: np.ndarray, seed: int = 0,
                rtol: float = 1e-5, max_coords: int = 40) -> None:
    """Check that ``model`` honours the :class:`~fedpipe.tasks.models.Model` contract on ``(X, y)``.

    Checks: ``init`` is deterministic float64 of length ``n_params``; the gradient equals
    central finite differences (a random direction plus up to ``max_coords`` coordinates,
    relative tolerance ``rtol``) for the loss and for the penalty; sums over uneven chunks (one
    empty) equal the whole-array result; float32 input gives the float64 answer; inputs are
    not mutated; ``predict`` has one entry per row (int64 classes or float64 values); the
    optional ``loss_and_predict`` agrees with both; ``unpack`` covers every parameter, in order.

    Use a few dozen rows: every finite difference costs two ``loss_and_grad`` calls.

    Raises
    ------
    AssertionError
        Naming the model and the broken contract.
    """
    rng = np.random.default_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.shape[0] < 3:
        _fail("check_model needs at least 3 rows")
    # Step off the init point: zeros would hide sign errors and exactly symmetric gradients.
    params = _check_init(model, seed) + 0.1 * rng.normal(size=model.n_params)
    originals = (params.copy(), X.copy(), y.copy())
    _check_gradient(model, params, X, y, rng, rtol, max_coords)
    _check_chunks(model, params, X, y, rng)
    if not all(np.array_equal(a, b) for a, b in zip(originals, (params, X, y), strict=True)):
        _fail(f"{model.name}: loss_and_grad mutated its inputs")

    X32 = X.astype(np.float32)
    loss32, grad32, _ = _call(model, params, X32, y)
    loss64, grad64, _ = _call(model, params, X32.astype(np.float64), y)
    if not (np.isclose(loss32, loss64, rtol=1e-12) and np.allclose(grad32, grad64, rtol=1e-12)):
        _fail(f"{model.name}: float32 input is not computed in float64")

    _check_predict(model, params, X)
    _check_loss_and_predict(model, params, X, y)
    _check_unpack_penalty(model, params)
    _check_gradient(_penalty_as_loss(model), params, X, y, rng, rtol, max_coords)


def _check_loss_and_predict(model: Model, params: np.ndarray, X: np.ndarray,
                            y: np.ndarray) -> None:
    """The optional fused evaluation agrees with ``loss_and_grad`` and ``predict``."""
    fused = getattr(model, "loss_and_predict", None)
    if fused is None:
        return
    loss, pred = fused(params, X, y)
    if not np.isclose(loss, _call(model, params, X, y)[0], rtol=1e-12):
        _fail(f"{model.name}: loss_and_predict's loss differs from loss_and_grad's")
    if not np.array_equal(pred, model.predict(params, X)):
        _fail(f"{model.name}: loss_and_predict's predictions differ from predict's")


def _penalty_as_loss(model: Model) -> Model:
    """The penalty dressed as a loss, so the same finite-difference check covers it."""

    def loss_and_grad(params, X, y):
        value, grad = model.penalty(params)
        return float(value), np.asarray(grad, dtype=np.float64), X.shape[0]

    return model._replace(name=f"{model.name} penalty", loss_and_grad=loss_and_grad)


# --------------------------------------------------------------------------------------------
# optimizers

MakeOptimizer = Callable[[float | Schedule], Optimizer]
ClosedForm = Callable[[float, np.ndarray, np.ndarray], np.ndarray]


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer) as saved:
        return {key: saved[key] for key in saved.files}


def _check_state(name: str, state: dict, step: int) -> None:
    if not (isinstance(state, dict) and all(isinstance(v, np.ndarray) for v in state.values())):
        _fail(f"{name}: state must be a dict of ndarrays")
    if "step" not in state or state["step"].shape != () or int(state["step"]) != step:
        _fail(f"{name}: state['step'] must be a 0-d integer array equal to {step}")
    restored = _roundtrip(state)
    if restored.keys() != state.keys() or not all(
            np.array_equal(restored[k], state[k]) for k in state):
        _fail(f"{name}: state does not survive np.savez / np.load unchanged")


def _quadratic(n: int, rng: np.random.Generator):
    curvature = rng.uniform(0.5, 2.0, n)
    centre = rng.normal(size=n)

    def loss(p):
        return 0.5 * float(curvature @ (p - centre) ** 2)

    def grad(p):
        return curvature * (p - centre)

    return loss, grad


def _run(opt: Optimizer, grad, params, state, steps):
    for _ in range(steps):
        updates, state = opt.update(grad(params), state, params)
        params = apply_updates(params, updates)
    return params, state


def _check_first_step(make_opt, closed_form, grad, p0) -> None:
    lr = 0.1
    opt = make_opt(lr)
    state = opt.init(p0)
    g = grad(p0)
    before = (g.copy(), p0.copy(), {k: v.copy() for k, v in state.items()})
    updates, new_state = opt.update(g, state, p0)
    if not (np.array_equal(g, before[0]) and np.array_equal(p0, before[1])
            and all(np.array_equal(state[k], before[2][k]) for k in state)):
        _fail("optimizer update mutated its inputs")
    if np.shape(updates) != p0.shape or np.asarray(updates).dtype != np.float64:
        _fail(f"updates must be float64 of shape {p0.shape}")
    _check_state("after one update", new_state, 1)
    if closed_form is not None:
        expected = closed_form(lr, g, p0)
        if not np.allclose(updates, expected, rtol=1e-12, atol=1e-15):
            _fail(f"first update {updates} != closed form {expected}")


def _check_resume(make_opt, grad, p0, steps: int = 6) -> None:
    opt = make_opt(0.05)
    straight, _ = _run(opt, grad, p0, opt.init(p0), steps)
    half, state = _run(opt, grad, p0, opt.init(p0), steps // 2)
    resumed_opt = make_opt(0.05)  # a fresh process rebuilds the optimizer from its config
    resumed, _ = _run(resumed_opt, grad, half.copy(), _roundtrip(state), steps - steps // 2)
    if not np.array_equal(straight, resumed):
        _fail("a state saved with np.savez and reloaded does not continue identically")


def _check_schedule(make_opt, p0, rng, steps: int = 5) -> None:
    """Against a fixed gradient sequence, update(t) under a schedule == schedule(t) * update
    at rate 1: the rate scales the step and nothing else."""

    def schedule(t):
        return 0.3 * 0.5**t + 0.01 * t

    grads = rng.normal(size=(steps, p0.size))
    scheduled, unit = make_opt(schedule), make_opt(1.0)
    s_state, u_state = scheduled.init(p0), unit.init(p0)
    for t in range(steps):
        s_up, s_state = scheduled.update(grads[t], s_state, p0)
        u_up, u_state = unit.update(grads[t], u_state, p0)
        if not np.allclose(s_up, schedule(t) * u_up, rtol=1e-12, atol=1e-15):
            _fail(f"step {t}: the learning-rate schedule is not honoured")


def _check_spec(make_opt, grad, p0, steps: int = 4) -> None:
    """A spec, when the optimizer has one, is plain JSON that :func:`from_spec` turns back
    into an optimizer with the same spec and bit-identical updates."""
    opt = make_opt(0.05)
    spec = describe(opt)
    if spec is None:
        return  # an optimizer may not say how it was built: its runs then cannot be repeated
    try:
        reread = json.loads(json.dumps(spec))
    except (TypeError, ValueError) as exc:
        _fail(f"spec {spec!r} is not plain JSON: {exc}")
    if reread != spec:
        _fail(f"spec {spec!r} changes through JSON (tuples or non-string keys?)")
    try:
        rebuilt = from_spec(reread)
    except (TypeError, ValueError, KeyError) as exc:
        _fail(f"from_spec({spec!r}) fails: {exc}")
    if describe(rebuilt) != spec:
        _fail(f"from_spec gives an optimizer whose spec is {describe(rebuilt)!r}, not {spec!r}")
    ours, _ = _run(opt, grad, p0, opt.init(p0), steps)
    theirs, _ = _run(rebuilt, grad, p0, rebuilt.init(p0), steps)
    if not np.array_equal(ours, theirs):
        _fail(f"the optimizer rebuilt from its spec {spec!r} takes other steps")


def check_optimizer(make_opt: MakeOptimizer, closed_form: ClosedForm | None = None,
                    n: int = 5, seed: int = 0) -> None:
    """Check that the optimizers built by ``make_opt(lr)`` honour the Optimizer contract.

    Checks on a separable quadratic ``0.5 * sum(a * (p - c)**2)``: state is a dict of ndarrays
    with a 0-d ``step`` that survives ``np.savez``; ``update`` does not mutate its inputs;
    the first update equals ``closed_form(lr, grads, params)`` when given; a state saved and
    reloaded half-way continues bit-identically; a schedule ``lr(t)`` scales update ``t`` by
    exactly ``lr(t)``; a spec (``optimizer.spec``, if not ``None``) survives JSON and
    ``from_spec`` rebuilds an optimizer that takes the same steps; 200 small steps decrease
    the loss.

    Parameters
    ----------
    make_opt : callable
        ``make_opt(lr) -> Optimizer`` where ``lr`` is a float or a schedule.
    closed_form : callable, optional
        ``closed_form(lr, grads, params) -> updates`` of the first step from a fresh state.

    Raises
    ------
    AssertionError
        Naming the broken contract.
    """
    rng = np.random.default_rng(seed)
    loss, grad = _quadratic(n, rng)
    p0 = rng.normal(size=n) * 2.0
    _check_state("after init", make_opt(0.1).init(p0), 0)
    _check_first_step(make_opt, closed_form, grad, p0)
    _check_resume(make_opt, grad, p0)
    _check_schedule(make_opt, p0, rng)
    _check_spec(make_opt, grad, p0)
    opt = make_opt(0.02)
    final, _ = _run(opt, grad, p0, opt.init(p0), 200)
    if not loss(final) < loss(p0):
        _fail(f"200 steps at lr=0.02 did not decrease a quadratic ({loss(p0)} -> {loss(final)})")
