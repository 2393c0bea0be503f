"""Optimizers: the conformance suite on each, closed forms of the first steps, properties."""

import numpy as np
import pytest
from fedpipe.tasks import optimizers as opt
from fedpipe.tasks.checks import check_optimizer

EPS = 1e-8

# make_opt(lr) and the first update from a fresh state, written from each paper's equations.
CASES = {
    "sgd": (opt.sgd, lambda lr, g, p: -lr * g),
    "momentum": (opt.momentum, lambda lr, g, p: -lr * g),
    "momentum-nesterov": (lambda lr: opt.momentum(lr, 0.8, nesterov=True),
                          lambda lr, g, p: -lr * (1 + 0.8) * g),
    "nesterov": (opt.nesterov, lambda lr, g, p: -lr * 1.9 * g),
    "adagrad": (opt.adagrad, lambda lr, g, p: -lr * g / (np.abs(g) + EPS)),
    "rmsprop": (opt.rmsprop, lambda lr, g, p: -lr * g / (np.sqrt(0.1) * np.abs(g) + EPS)),
    "adam": (opt.adam, lambda lr, g, p: -lr * g / (np.abs(g) + EPS)),
    "adamw": (lambda lr: opt.adam(lr, weight_decay=0.1),
              lambda lr, g, p: -lr * (g / (np.abs(g) + EPS) + 0.1 * p)),
    "adamw-alias": (lambda lr: opt.adamw(lr, weight_decay=0.1),
                    lambda lr, g, p: -lr * (g / (np.abs(g) + EPS) + 0.1 * p)),
    # nu_1 = 1e-6 + 1e-3 * g^2 whenever g^2 > 1e-6 (true for the check's gradients)
    "yogi": (opt.yogi, lambda lr, g, p: -lr * 0.1 * g / (np.sqrt(1e-6 + 1e-3 * g * g) + 1e-3)),
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance(name, seed):
    make_opt, closed_form = CASES[name]
    check_optimizer(make_opt, closed_form, n=3 + 4 * seed, seed=seed)


def _run_constant(optimizer, g, steps):
    state, out = optimizer.init(np.zeros_like(g)), []
    for _ in range(steps):
        updates, state = optimizer.update(g, state, np.zeros_like(g))
        out.append(updates)
    return out, state


def test_adam_bias_correction_makes_constant_gradient_steps_equal():
    g = np.array([3.0, -0.2, 1e-3])
    steps, _ = _run_constant(opt.adam(0.1, eps=0.0 + 1e-12), g, 5)
    for u in steps:
        np.testing.assert_allclose(u, -0.1 * np.sign(g), rtol=1e-6)


def test_adagrad_constant_gradient_decays_as_inverse_sqrt():
    g = np.array([2.0, -0.5])
    steps, _ = _run_constant(opt.adagrad(0.3, eps=1e-12), g, 4)
    for t, u in enumerate(steps, start=1):
        np.testing.assert_allclose(u, -0.3 * np.sign(g) / np.sqrt(t), rtol=1e-9)


def test_heavy_ball_velocity_is_geometric_sum():
    g = np.array([1.0, -2.0])
    steps, state = _run_constant(opt.momentum(0.5, beta=0.5), g, 3)
    np.testing.assert_allclose(state["velocity"], (1 + 0.5 + 0.25) * g)
    np.testing.assert_allclose(steps[-1], -0.5 * 1.75 * g)


def test_yogi_second_moment_stays_positive():
    rng = np.random.default_rng(3)
    o = opt.yogi(0.1)
    state = o.init(np.zeros(50))
    for _ in range(100):
        g = rng.normal(size=50) * rng.choice([1e-4, 1.0, 1e3])
        _, state = o.update(g, state, np.zeros(50))
        assert np.all(state["nu"] > 0)


def test_decoupled_weight_decay_shrinks_params_with_zero_gradient():
    p = np.array([1.0, -2.0])
    o = opt.adam(0.1, weight_decay=0.5)
    updates, _ = o.update(np.zeros(2), o.init(p), p)
    np.testing.assert_allclose(updates, -0.1 * 0.5 * p)


def test_apply_updates_adds():
    np.testing.assert_array_equal(opt.apply_updates(np.array([1.0, 2]), np.array([0.5, -1])),
                                  [1.5, 1.0])


@pytest.mark.parametrize("bad", [
    lambda: opt.sgd(0.0), lambda: opt.sgd(-1.0), lambda: opt.adam(float("nan")),
    lambda: opt.momentum(0.1, beta=1.0), lambda: opt.adam(0.1, b2=-0.1),
    lambda: opt.rmsprop(0.1, eps=0.0), lambda: opt.adam(0.1, weight_decay=-1.0),
])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_check_optimizer_catches_a_wrong_closed_form():
    with pytest.raises(AssertionError, match="closed form"):
        check_optimizer(opt.sgd, lambda lr, g, p: -2 * lr * g)


def test_check_optimizer_catches_in_place_state_mutation():
    def leaky(lr):
        inner = opt.momentum(lr)

        def update(g, state, params):
            state["velocity"] *= 0.9  # writes into the caller's arrays: not pure
            state["velocity"] += g
            return -lr * state["velocity"], {**state, "step": state["step"] + 1}

        return inner._replace(update=update)

    with pytest.raises(AssertionError, match="mutated"):
        check_optimizer(leaky)


def test_check_optimizer_catches_an_ignored_schedule():
    def frozen(lr):
        rate = lr(0) if callable(lr) else lr
        return opt.sgd(rate)

    with pytest.raises(AssertionError, match="schedule"):
        check_optimizer(frozen)


def test_check_optimizer_catches_state_hidden_outside_the_state_dict():
    def hidden(lr):
        inner = opt.adam(lr)
        cache = {}

        def update(g, state, params):
            # momentum kept on the closure: a resumed process starts it over
            updates, new = inner.update(g, {**state, "mu": cache.get("mu", state["mu"])}, params)
            cache["mu"] = new["mu"]
            return updates, new

        return inner._replace(update=update)

    with pytest.raises(AssertionError):
        check_optimizer(hidden)
