"""Optimizers: the conformance suite on each, closed forms of the first steps, properties."""

import json

import numpy as np
import pytest
from fedpipe.tasks import optimizers as opt
from fedpipe.tasks import schedules as sch
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


# ---------------------------------------------------------------------------------------------
# transforms, chain and specs


def _steps(optimizer, grads, params):
    state, out = optimizer.init(params), []
    for g in grads:
        updates, state = optimizer.update(g, state, params)
        out.append(updates)
        params = opt.apply_updates(params, updates)
    return np.array(out), state


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_is_a_chain_of_transforms(weight_decay):
    rng = np.random.default_rng(1)
    grads, p0 = rng.normal(size=(8, 5)), rng.normal(size=5)
    decay = [opt.add_decayed_weights(weight_decay)] if weight_decay else []
    chained = opt.chain(opt.scale_by_adam(), *decay, opt.scale(-0.03))
    ours, state = _steps(opt.adam(0.03, weight_decay=weight_decay), grads, p0)
    theirs, chained_state = _steps(chained, grads, p0)
    assert ours.tobytes() == theirs.tobytes()
    assert state.keys() == chained_state.keys() == {"mu", "nu", "step"}


def test_clip_by_global_norm_bounds_the_norm_and_keeps_the_direction():
    rng = np.random.default_rng(2)
    clip = opt.clip_by_global_norm(1.5)
    state = clip.init(np.zeros(4))
    for g in rng.normal(size=(20, 4)) * rng.uniform(0.1, 5.0, size=(20, 1)):
        clipped, _ = clip.update(g, state, None)
        assert np.linalg.norm(clipped) <= 1.5 * (1 + 1e-12)
        assert np.allclose(clipped / np.linalg.norm(clipped), g / np.linalg.norm(g))
        if np.linalg.norm(g) <= 1.5:
            assert np.array_equal(clipped, g)


def test_a_schedule_scales_by_its_value_at_the_step():
    grads = np.ones((4, 2))
    updates, _ = _steps(opt.scale_by_schedule(sch.step_decay(1.0, every=2, factor=0.5)), grads,
                        np.zeros(2))
    assert updates[:, 0].tolist() == [1.0, 1.0, 0.5, 0.5]


def test_chain_refuses_two_transforms_with_the_same_state():
    with pytest.raises(ValueError, match="mu"):
        opt.chain(opt.scale_by_adam(), opt.scale_by_yogi()).init(np.zeros(3))


@pytest.mark.parametrize("optimizer", [
    *(factory(0.05) for factory in opt.OPTIMIZERS.values()),
    opt.adam(sch.cosine(0.1, 50, final=0.01), b1=0.8, weight_decay=1e-3),
    opt.momentum(sch.step_decay(0.2, every=3), beta=0.5, nesterov=True),
    opt.chain(opt.clip_by_global_norm(2.0), opt.scale_by_rms(0.8),
              opt.scale_by_schedule(sch.exponential(0.1, rate=0.9))),
], ids=lambda o: o.spec["kind"])
def test_describe_and_from_spec_round_trip(optimizer):
    spec = opt.describe(optimizer)
    rebuilt = opt.from_spec(json.loads(json.dumps(spec)))
    assert opt.describe(rebuilt) == spec
    rng = np.random.default_rng(3)
    grads, p0 = rng.normal(size=(6, 4)), rng.normal(size=4)
    assert _steps(rebuilt, grads, p0)[0].tobytes() == _steps(optimizer, grads, p0)[0].tobytes()


def test_the_spec_names_the_factory_and_its_hyperparameters():
    assert opt.describe(opt.adam(0.01)) == {"kind": "adam", "lr": 0.01, "b1": 0.9, "b2": 0.999,
                                            "eps": 1e-8, "weight_decay": 0.0}
    assert opt.describe(opt.sgd(sch.constant(0.2)))["lr"] == {"kind": "constant", "lr": 0.2}
    # a rate function of your own cannot be written down: the optimizer says so
    assert opt.describe(opt.sgd(lambda step: 0.1)) is None
    with pytest.raises(ValueError, match="unknown optimizer kind 'lion'"):
        opt.from_spec({"kind": "lion", "lr": 0.1})


def test_check_optimizer_catches_a_spec_that_does_not_rebuild_it():
    def doubled(lr):
        inner = opt.sgd(lr)
        return inner._replace(update=lambda g, s, p: (2 * inner.update(g, s, p)[0],
                                                      inner.update(g, s, p)[1]))

    with pytest.raises(AssertionError, match="rebuilt from its spec"):
        check_optimizer(doubled)
