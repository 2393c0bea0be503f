"""Local training and evaluation of one client: pure NumPy, property checks."""

import numpy as np
import pytest
from fedpipe.tasks import models, optimizers, reduce
from fedpipe.tasks.local import client_rng, local_train, round_lr


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(int)
    return X, y


def _train(model, params, X, y, **kw):
    options = {"epochs": 1, "batch_size": 16, "lr": 0.1, "rng": client_rng(0, 0, "c")} | kw
    return local_train(model, params, X, y, **options)


def test_full_batch_step_is_one_gradient_descent_step(data):
    X, y = data
    model = models.logistic(4, l2=0.1)
    p = model.init(0) + 0.1
    out = _train(model, p, X, y, batch_size=len(y))
    _, g, n = model.loss_and_grad(p, X, y)
    expected = -0.1 * (g / n + model.penalty(p)[1])
    np.testing.assert_allclose(out.packet["delta"], expected, rtol=1e-12, atol=1e-15)
    assert out.packet["n"] == 120 and out.metrics["steps"] == 1 and out.kept == {}


def test_steps_per_epoch_and_loss_decreases(data):
    X, y = data
    model = models.logistic(4)
    first = _train(model, model.init(0), X, y, epochs=1)
    more = _train(model, model.init(0), X, y, epochs=5)
    assert first.metrics["steps"] == 8 and more.metrics["steps"] == 40
    start = model.loss_and_grad(model.init(0), X, y)[0]
    end = model.loss_and_grad(model.init(0) + more.packet["delta"], X, y)[0]
    assert end < start


def test_same_stream_same_result_other_client_other_order(data):
    X, y = data
    model = models.logistic(4)
    a = _train(model, model.init(0), X, y)
    b = _train(model, model.init(0), X, y)
    c = _train(model, model.init(0), X, y, rng=client_rng(0, 0, "other"))
    np.testing.assert_array_equal(a.packet["delta"], b.packet["delta"])
    assert not np.array_equal(a.packet["delta"], c.packet["delta"])


def test_fedprox_pulls_towards_the_global_params(data):
    X, y = data
    model = models.logistic(4)
    free = _train(model, model.init(0), X, y, epochs=3)
    proximal = optimizers.chain(optimizers.add_proximal(5.0), optimizers.sgd(0.1))
    prox = _train(model, model.init(0), X, y, epochs=3, optimizer=proximal)
    assert np.linalg.norm(prox.packet["delta"]) < np.linalg.norm(free.packet["delta"])


def test_the_proximal_transform_is_fedprox_bit_for_bit(data):
    # The client transform gives the bits of the hand-written FedProx step it replaced.
    X, y = data
    model, mu, lr = models.logistic(4, l2=0.1), 0.3, 0.1
    p = model.init(0) + 0.05
    out = _train(model, p, X, y, epochs=2, batch_size=len(y),
                 optimizer=optimizers.chain(optimizers.add_proximal(mu), optimizers.sgd(lr)))
    w = p.copy()
    for _ in range(2):
        _, g, n = model.loss_and_grad(w, X, y)
        grad = g / n + model.penalty(w)[1]
        grad += mu * (w - p)
        w -= lr * grad
    np.testing.assert_array_equal(out.packet["delta"], w - p)


def _scaffold(model, p, X, y, c, ci, **kw):
    client = optimizers.chain(optimizers.control_variates(), optimizers.sgd(0.1))
    return _train(model, p, X, y, optimizer=client,
                  carry={"server/control": c, "client/control": ci}, **kw)


def test_scaffold_control_variate_option_two(data):
    X, y = data
    model = models.logistic(4)
    p = model.init(0)
    c, ci = np.full(p.size, 0.01), np.full(p.size, -0.02)
    out = _scaffold(model, p, X, y, c, ci, batch_size=len(y))
    # One full-batch step: y = x - lr (g + c - ci), so c_i+ = ci - c + (x - y) / lr = g.
    _, g, n = model.loss_and_grad(p, X, y)
    np.testing.assert_allclose(out.kept["client/control"], g / n, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out.packet["control"], out.kept["client/control"] - ci)
    # Many mini-batch steps: still the paper's c_i - c + (x - y) / (K lr), K the steps taken.
    many = _scaffold(model, p, X, y, c, ci, epochs=2, batch_size=16)
    steps = many.metrics["steps"]
    option_two = ci - c - many.packet["delta"] / (steps * 0.1)
    np.testing.assert_allclose(many.kept["client/control"], option_two, rtol=1e-9, atol=1e-12)


def test_carry_must_name_the_client_optimizers_state(data):
    X, y = data
    model = models.logistic(4)
    with pytest.raises(ValueError, match="client/control"):
        _train(model, model.init(0), X, y, optimizer=optimizers.sgd(0.1),
               carry={"client/control": np.zeros(5)})


@pytest.mark.parametrize("model", [models.logistic(4), models.linear(4)], ids=["binary", "linear"])
def test_client_test_sums_add_up_and_an_empty_client_has_no_metrics(data, model):
    # Federated evaluation: each client sends reduce.eval_sums of its test rows; the round's
    # metrics are finish_metrics of their sum, whatever the clients and their order.
    X, y = data
    y = y if model.task != "regression" else X @ np.array([1.0, -2.0, 0.5, 0.0])
    p = model.init(0) + 0.3
    parts = [reduce.eval_sums(model, p, (X[s], y[s])) for s in (slice(0, 50), slice(50, 50),
                                                                   slice(50, 120))]
    np.testing.assert_array_equal(parts[1], np.zeros(len(reduce.EVAL_FIELDS)))
    assert reduce.finish_metrics(parts[1], model.task) == {}
    whole = reduce.finish_metrics(reduce.eval_sums(model, p, (X, y)), model.task)
    for order in (parts, parts[::-1]):
        assert reduce.finish_metrics(reduce.add_sums(*order), model.task) == pytest.approx(whole)
    if model.task == "regression":
        assert set(whole) == {"test_loss", "test_rmse", "test_r2"}
    else:
        assert whole["test_accuracy"] == pytest.approx(np.mean(model.predict(p, X) == y))


def test_round_lr_takes_a_constant_or_a_schedule():
    assert round_lr(0.5, 9) == 0.5
    assert round_lr(lambda r: 1.0 / (r + 1), 3) == 0.25


def test_any_optimizer_runs_the_local_steps(data):
    # The client update is an Optimizer: sgd(lr) is the default bit for bit, and adam's
    # full-batch steps follow its own init/update from a fresh state every round.
    from fedpipe.tasks import optimizers

    X, y = data
    model = models.logistic(4, l2=0.1)
    p = model.init(0) + 0.1
    default = _train(model, p, X, y, epochs=2)
    explicit = _train(model, p, X, y, epochs=2, optimizer=optimizers.sgd(0.1))
    np.testing.assert_array_equal(default.packet["delta"], explicit.packet["delta"])
    adam = optimizers.adam(0.05)
    out = _train(model, p, X, y, epochs=3, batch_size=len(y), optimizer=adam)
    w, state = p.copy(), adam.init(p)
    for _ in range(3):
        _, g, n = model.loss_and_grad(w, X, y)
        updates, state = adam.update(g / n + model.penalty(w)[1], state, w)
        w = w + updates
    np.testing.assert_allclose(out.packet["delta"], w - p, rtol=1e-12, atol=1e-15)
    assert not np.allclose(out.packet["delta"], _train(model, p, X, y, epochs=3,
                                                       batch_size=len(y)).packet["delta"])
