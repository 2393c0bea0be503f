"""Models: the conformance suite on every model, closed forms, stability, and real-data sanity."""

import json

import numpy as np
import pytest
from fedpipe.tasks import models as M
from fedpipe.tasks import optimizers as opt
from fedpipe.tasks.checks import check_model

N, D, K = 40, 5, 3


def _data(task, n_outputs=1, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D))
    if task == "regression":
        y = rng.normal(size=(N, n_outputs)) if n_outputs > 1 else rng.normal(size=N)
    else:
        y = rng.integers(0, 2 if task == "binary" else K, N)
    return X, y


MODELS = {
    "linear": lambda: M.linear(D),
    "linear-l2-l1": lambda: M.linear(D, l2=0.3, l1=0.1),
    "linear-no-intercept": lambda: M.linear(D, intercept=False),
    "logistic": lambda: M.logistic(D),
    "logistic-l2": lambda: M.logistic(D, l2=0.5, l1=0.05),
    "softmax": lambda: M.softmax(D, K),
    "softmax-l2-no-intercept": lambda: M.softmax(D, K, l2=0.2, intercept=False),
    "mlp": lambda: M.mlp(D, K, hidden=(8, 6), l2=0.01),
    "mlp-binary": lambda: M.mlp(D, 2, hidden=(4,), task="binary"),
    "mlp-regression": lambda: M.mlp(D, 1, hidden=(7,), task="regression", l1=0.01),
    "mlp-regression-2-outputs": lambda: M.mlp(D, 2, hidden=(3, 3), task="regression"),
    "mlp-no-hidden": lambda: M.mlp(D, K, hidden=()),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_conformance(name):
    model = MODELS[name]()
    n_outputs = 2 if name == "mlp-regression-2-outputs" else 1
    check_model(model, *_data(model.task, n_outputs))


@pytest.mark.parametrize("seed", range(3))
def test_conformance_float_labels_and_float32_features(seed):
    X, y = _data("multiclass", seed=seed)
    check_model(M.softmax(D, K), X.astype(np.float32), y.astype(np.float64), seed=seed)


# ---- closed forms ---------------------------------------------------------------------------


def test_linear_gradient_vanishes_at_least_squares_solution():
    X, y = _data("regression")
    model = M.linear(D)
    A = np.column_stack([X, np.ones(N)])
    solution = np.linalg.lstsq(A, y, rcond=None)[0]
    loss, grad, n = model.loss_and_grad(solution, X, y)
    assert n == N
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)
    residual = A @ solution - y
    assert loss == pytest.approx(0.5 * residual @ residual)


def test_classification_losses_at_zero_params_are_log_k():
    X, y = _data("binary")
    assert M.logistic(D).loss_and_grad(np.zeros(D + 1), X, y)[0] == pytest.approx(N * np.log(2))
    X, y = _data("multiclass")
    model = M.softmax(D, K)
    assert model.loss_and_grad(np.zeros(model.n_params), X, y)[0] == pytest.approx(N * np.log(K))


def test_two_class_softmax_equals_logistic_on_the_logit_difference():
    X, y = _data("binary")
    rng = np.random.default_rng(1)
    soft = M.softmax(D, 2)
    p = rng.normal(size=soft.n_params)
    named = soft.unpack(p)
    w = named["coef"][:, 1] - named["coef"][:, 0]
    b = named["intercept"][1] - named["intercept"][0]
    loss_s = soft.loss_and_grad(p, X, y)[0]
    loss_l = M.logistic(D).loss_and_grad(np.append(w, b), X, y)[0]
    assert loss_s == pytest.approx(loss_l, rel=1e-12)
    np.testing.assert_array_equal(soft.predict(p, X), M.logistic(D).predict(np.append(w, b), X))


@pytest.mark.parametrize("task, k, glm", [
    ("multiclass", K, lambda: M.softmax(D, K)),
    ("regression", 1, lambda: M.linear(D)),
])
def test_mlp_without_hidden_layers_is_the_glm(task, k, glm):
    X, y = _data(task)
    net, ref = M.mlp(D, k, hidden=(), task=task), glm()
    assert net.n_params == ref.n_params
    p = np.random.default_rng(2).normal(size=ref.n_params)
    for a, b in zip(net.loss_and_grad(p, X, y), ref.loss_and_grad(p, X, y), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(net.predict(p, X), ref.predict(p, X), rtol=1e-12)


@pytest.mark.parametrize("model", [M.linear(4, l2=0.7, l1=0.2), M.logistic(4, l2=0.7, l1=0.2),
                                   M.softmax(2, 2, l2=0.7, l1=0.2)])
def test_penalty_closed_form_and_intercept_is_free(model):
    p = np.random.default_rng(0).normal(size=model.n_params)
    named = model.unpack(p)
    w = named["coef"].ravel()
    value, grad = model.penalty(p)
    assert value == pytest.approx(0.5 * 0.7 * w @ w + 0.2 * np.abs(w).sum())
    np.testing.assert_allclose(model.unpack(grad)["coef"].ravel(), 0.7 * w + 0.2 * np.sign(w))
    np.testing.assert_array_equal(model.unpack(grad)["intercept"], 0.0)


def test_mlp_penalty_skips_biases():
    model = M.mlp(3, 2, hidden=(4,), l2=1.0)
    p = np.random.default_rng(0).normal(size=model.n_params)
    grads = model.unpack(model.penalty(p)[1])
    named = model.unpack(p)
    for key in ("W0", "W1"):
        np.testing.assert_array_equal(grads[key], named[key])
    for key in ("b0", "b1"):
        np.testing.assert_array_equal(grads[key], 0.0)


def test_objective_is_mean_loss_plus_penalty():
    X, y = _data("binary")
    model = M.logistic(D, l2=0.1)
    p = np.linspace(-1, 1, model.n_params)
    value, grad = M.objective(model, p, X, y)
    loss, g, n = model.loss_and_grad(p, X, y)
    pen, pen_g = model.penalty(p)
    assert value == pytest.approx(loss / n + pen)
    np.testing.assert_allclose(grad, g / n + pen_g)


# ---- numerical stability --------------------------------------------------------------------


# params whose logit for class 1 (minus class 0) is exactly x, for a 1-feature model
LOGIT_IS_X = {
    "logistic": (lambda: M.logistic(1), [1.0, 0.0]),
    "softmax": (lambda: M.softmax(1, 2), [0.0, 1.0, 0.0, 0.0]),
    "mlp-binary": (lambda: M.mlp(1, 2, hidden=(), task="binary"), [0.0, 1.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("name", sorted(LOGIT_IS_X))
def test_margins_of_1e4_give_exact_finite_losses(name):
    make, params = LOGIT_IS_X[name]
    X = np.array([[1e4], [-1e4], [1e4], [-1e4]])
    y = np.array([1, 1, 0, 0])  # right, wrong, wrong, right
    loss, grad, _ = make().loss_and_grad(np.array(params), X, y)
    assert loss == pytest.approx(2e4, rel=1e-12)  # each wrong row costs |margin|
    assert np.all(np.isfinite(grad))


def test_softmax_logits_of_1e4_do_not_overflow():
    model = M.softmax(2, 3)
    p = np.concatenate([np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]]).ravel(), np.zeros(3)])
    X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    loss, grad, _ = model.loss_and_grad(p, X, np.array([0, 0, 1]))
    assert loss == pytest.approx(2e4)
    assert np.all(np.isfinite(grad))


# ---- initialisation, layout -----------------------------------------------------------------


def test_linear_models_start_at_zero():
    for model in (M.linear(3), M.logistic(3), M.softmax(3, 4)):
        np.testing.assert_array_equal(model.init(5), 0.0)


def test_mlp_init_is_seeded_he_then_glorot():
    model = M.mlp(784, 10, hidden=(256, 128))
    assert model.name == "mlp-784-256-128-10"
    a, b = model.init(0), model.init(1)
    assert not np.array_equal(a, b)
    named = model.unpack(a)
    assert named["W0"].std() == pytest.approx(np.sqrt(2 / 784), rel=0.02)
    assert named["W1"].std() == pytest.approx(np.sqrt(2 / 256), rel=0.05)
    limit = np.sqrt(6 / (128 + 10))
    assert np.abs(named["W2"]).max() <= limit
    assert named["W2"].std() == pytest.approx(limit / np.sqrt(3), rel=0.1)
    assert all(np.all(named[f"b{i}"] == 0) for i in range(3))


def test_pack_inverts_unpack_and_names_shape_errors():
    model = M.mlp(4, 3, hidden=(5,))
    p = model.init(3)
    np.testing.assert_array_equal(M.pack(model, model.unpack(p)), p)
    with pytest.raises(ValueError, match="W1"):
        M.pack(model, {**model.unpack(p), "W1": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="b0"):
        M.pack(model, {k: v for k, v in model.unpack(p).items() if k != "b0"})


@pytest.mark.parametrize("bad", [
    lambda: M.linear(0), lambda: M.softmax(3, 1), lambda: M.logistic(3, l2=-1),
    lambda: M.linear(3, l1=float("nan")),
    lambda: M.mlp(3, 1, task="multiclass"), lambda: M.mlp(3, 2, task="ranking"),
    lambda: M.mlp(3, 2, hidden=(4, 0)),
])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        bad()


# ---- check_model catches broken models ------------------------------------------------------


def _broken(**changes):
    return M.logistic(D)._replace(**changes)


def test_check_model_catches_a_wrong_gradient():
    base = M.logistic(D)

    def lg(p, X, y):
        loss, grad, n = base.loss_and_grad(p, X, y)
        return loss, grad * 1.01, n

    with pytest.raises(AssertionError, match="finite difference"):
        check_model(_broken(loss_and_grad=lg), *_data("binary"))


def test_check_model_catches_means_instead_of_sums():
    base = M.logistic(D)

    def lg(p, X, y):
        loss, grad, n = base.loss_and_grad(p, X, y)
        return loss / max(n, 1), grad / max(n, 1), n

    with pytest.raises(AssertionError, match="chunk"):
        check_model(_broken(loss_and_grad=lg), *_data("binary"))


def test_check_model_catches_float32_arithmetic():
    base = M.logistic(D)

    def lg(p, X, y):
        return base.loss_and_grad(p.astype(X.dtype).astype(np.float64), X, y)

    with pytest.raises(AssertionError, match="float32"):
        check_model(_broken(loss_and_grad=lg), *_data("binary"))


def test_check_model_catches_bad_predictions_and_unpack():
    base = M.logistic(D)
    with pytest.raises(AssertionError, match="int64"):
        check_model(_broken(predict=lambda p, X: base.predict(p, X).astype(float)),
                    *_data("binary"))
    with pytest.raises(AssertionError, match="cover"):
        check_model(_broken(unpack=lambda p: {"coef": p[:D]}), *_data("binary"))


def test_check_model_catches_a_fused_evaluation_that_disagrees():
    base = M.logistic(D)

    def slightly_off(p, X, y):
        loss, pred = base.loss_and_predict(p, X, y)
        return loss * (1 + 1e-6), pred

    with pytest.raises(AssertionError, match="loss_and_predict's loss"):
        check_model(_broken(loss_and_predict=slightly_off), *_data("binary"))
    flipped = _broken(loss_and_predict=lambda p, X, y: (base.loss_and_predict(p, X, y)[0],
                                                        1 - base.predict(p, X)))
    with pytest.raises(AssertionError, match="predictions"):
        check_model(flipped, *_data("binary"))


# ---- the math learns (small real data sets) ------------------------------------------------


def _standardised(X_train, X_test):
    mean, std = X_train.mean(0), X_train.std(0)
    std[std == 0] = 1.0
    return (X_train - mean) / std, (X_test - mean) / std


def test_full_batch_gd_logistic_matches_sklearn_on_breast_cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    X_tr, X_te = _standardised(X_tr, X_te)
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(X_tr, y_tr).score(X_te, y_te)

    # sklearn minimises 0.5||w||^2 + C * sum(loss): the same optimum as mean loss + l2/2 ||w||^2
    model = M.logistic(X.shape[1], l2=1.0 / len(y_tr))
    p = model.init(0)
    for _ in range(2000):
        _, grad = M.objective(model, p, X_tr, y_tr)
        p -= 0.5 * grad  # below 2 / L, L = max eigenvalue of X'X/n / 4 ~ 3.3 here
    accuracy = np.mean(model.predict(p, X_te) == y_te)
    assert abs(accuracy - reference) <= 0.01


def test_mlp_with_adam_minibatches_reaches_95_percent_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    X_tr, X_te = _standardised(X_tr, X_te)
    model = M.mlp(64, 10, hidden=(128,), l2=1e-4)
    optimizer = opt.adam(1e-3)
    p = model.init(0)
    state = optimizer.init(p)
    rng = np.random.default_rng(0)
    for _ in range(15):
        order = rng.permutation(len(y_tr))
        for batch in np.array_split(order, len(order) // 32):
            loss, grad, n = model.loss_and_grad(p, X_tr[batch], y_tr[batch])
            grad = grad / n + model.penalty(p)[1]
            updates, state = optimizer.update(grad, state, p)
            p = opt.apply_updates(p, updates)
    assert np.mean(model.predict(p, X_te) == y_te) >= 0.95


@pytest.mark.parametrize("seed", range(4))
def test_conformance_on_random_shapes(seed):
    rng = np.random.default_rng(100 + seed)
    d, n, k = int(rng.integers(1, 7)), int(rng.integers(3, 30)), int(rng.integers(2, 6))
    X = rng.normal(size=(n, d)) * rng.choice([0.1, 1.0, 10.0])
    hidden = tuple(int(h) for h in rng.integers(1, 9, size=rng.integers(0, 3)))
    check_model(M.linear(d, l2=0.1), X, rng.normal(size=n), seed=seed)
    check_model(M.logistic(d, l1=0.1), X, rng.integers(0, 2, n), seed=seed)
    check_model(M.softmax(d, k), X, rng.integers(0, k, n), seed=seed)
    check_model(M.mlp(d, k, hidden=hidden, l2=0.1), X / 10, rng.integers(0, k, n), seed=seed)


@pytest.mark.parametrize("model, y", [
    (M.softmax(D, K), np.full(N, K)), (M.softmax(D, K), np.full(N, -1)),
    (M.mlp(D, K, hidden=(3,)), np.full(N, K)), (M.logistic(D), np.full(N, -1)),
    (M.logistic(D), np.full(N, 2)),
])
def test_labels_out_of_range_are_rejected_not_wrapped(model, y):
    X, _ = _data("multiclass")
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(model.init(0), X, y)


def test_models_survive_cloudpickle_like_dask_ships_them():
    cloudpickle = pytest.importorskip("cloudpickle")
    X, y = _data("multiclass")
    model = M.mlp(D, K, hidden=(4,))
    clone = cloudpickle.loads(cloudpickle.dumps(model))
    p = model.init(0)
    assert clone.loss_and_grad(p, X, y)[0] == model.loss_and_grad(p, X, y)[0]


@pytest.mark.parametrize("model", [
    M.linear(4, l2=0.1, l1=0.01), M.logistic(4, intercept=False),
    M.softmax(4, 3, l2=1e-3), M.mlp(4, 3, hidden=(5, 2), l2=1e-4),
    M.mlp(4, 1, hidden=(), task="regression"),
], ids=lambda m: m.name)
def test_describe_and_from_spec_round_trip(model):
    spec = M.describe(model)
    rebuilt = M.from_spec(json.loads(json.dumps(spec)))
    assert M.describe(rebuilt) == spec and rebuilt.name == model.name
    params = model.init(3)
    assert rebuilt.init(3).tobytes() == params.tobytes()
    X = np.random.default_rng(0).normal(size=(6, 4))
    assert np.asarray(rebuilt.predict(params, X)).tobytes() == np.asarray(
        model.predict(params, X)).tobytes()
    assert M.describe(model._replace(spec=None)) is None
