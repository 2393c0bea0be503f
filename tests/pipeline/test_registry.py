"""Registry: names become the right objects; bad names and values become ValidationErrors."""

import numpy as np
import pytest
from fedpipe.cli import registry
from fedpipe.errors import ValidationError
from fedpipe.tasks import optimizers
from fedpipe.tasks.checks import check_model, check_optimizer
from fedpipe.tasks.lbfgs import LBFGS
from fedpipe.tasks.optimizers import Optimizer

REGRESSION = {"n_features": 4, "task": "regression", "classes": None}
BINARY = {"n_features": 4, "task": "binary", "classes": ["no", "yes"]}
MULTICLASS = {"n_features": 4, "task": "multiclass", "classes": [0, 1, 2]}

FITS = [("linear", REGRESSION), ("logistic", BINARY), ("softmax", BINARY),
        ("softmax", MULTICLASS), ("mlp", REGRESSION), ("mlp", BINARY), ("mlp", MULTICLASS)]


@pytest.mark.parametrize("name, info", FITS)
def test_every_model_that_fits_passes_the_conformance_check(name, info):
    model = registry.make_model(name, info, hidden="5,3", l2=0.1)
    assert model.task == ("multiclass" if name == "softmax" else info["task"])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, info["n_features"]))
    if info["task"] == "regression":
        y = rng.normal(size=30)
    else:
        y = rng.integers(0, len(info["classes"]), 30)
    check_model(model, X, y)


def test_mlp_sizes_follow_the_store_and_hidden():
    model = registry.make_model("mlp", {"n_features": 64, "task": "multiclass",
                                        "classes": list(range(10))}, hidden="128")
    assert model.name == "mlp-64-128-10"
    assert registry.make_model("mlp", MULTICLASS).name == "mlp-4-256-128-3"  # default hidden
    assert registry.make_model("mlp", REGRESSION, hidden=[2]).name == "mlp-4-2-1"


def test_store_info_objects_work_like_mappings():
    from types import SimpleNamespace

    model = registry.make_model("softmax", SimpleNamespace(**MULTICLASS))
    assert model.n_params == 4 * 3 + 3


@pytest.mark.parametrize("name, info, words", [
    ("softmax", REGRESSION, "regression"),
    ("logistic", REGRESSION, "regression"),
    ("logistic", MULTICLASS, "softmax"),
    ("linear", BINARY, "binary"),
    ("forest", BINARY, "choose from"),
])
def test_models_that_do_not_fit_are_rejected_by_name(name, info, words):
    with pytest.raises(ValidationError, match=words):
        registry.make_model(name, info)


@pytest.mark.parametrize("kwargs, words", [
    ({"l2": -1.0}, "--l2"), ({"l1": float("nan")}, "--l1"),
    ({"hidden": "256,x"}, "--hidden"), ({"hidden": "8,0"}, "--hidden"),
])
def test_bad_model_values_are_rejected(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        registry.make_model("mlp", MULTICLASS, **kwargs)


def test_single_class_store_is_rejected():
    with pytest.raises(ValidationError, match="2 classes"):
        registry.make_model("softmax", {**BINARY, "classes": ["only"]})


@pytest.mark.parametrize("name", sorted(n for n in registry.OPTIMIZERS if n != "lbfgs"))
def test_every_registered_optimizer_passes_the_conformance_check(name):
    assert isinstance(registry.make_optimizer(name, 0.1), Optimizer)
    check_optimizer(lambda lr: registry.OPTIMIZERS[name](lr))


def test_make_optimizer_matches_the_python_api():
    g, p = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    ours = registry.make_optimizer("momentum", 0.3)
    ref = optimizers.momentum(0.3)
    np.testing.assert_array_equal(ours.update(g, ours.init(p), p)[0],
                                  ref.update(g, ref.init(p), p)[0])


def test_lbfgs_gives_settings_and_refuses_a_schedule():
    assert isinstance(registry.make_optimizer("lbfgs", 1.0), LBFGS)
    with pytest.raises(ValidationError, match="lbfgs"):
        registry.make_optimizer("lbfgs", 1.0, schedule="cosine", total_steps=10)


@pytest.mark.parametrize("name, lr, words", [
    ("adamax", 0.1, "choose from"), ("sgd", 0.0, "--lr"), ("sgd", -1.0, "--lr"),
    ("adam", float("inf"), "--lr"), ("adam", "0.1", "--lr"), ("sgd", True, "--lr"),
])
def test_bad_optimizer_names_and_rates_are_rejected(name, lr, words):
    with pytest.raises(ValidationError, match=words):
        registry.make_optimizer(name, lr)


def _rates(optimizer, steps):
    """The rate used at each step, read off sgd updates for a unit gradient."""
    state, out = optimizer.init(np.zeros(1)), []
    for _ in range(steps):
        updates, state = optimizer.update(np.ones(1), state, np.zeros(1))
        out.append(-updates[0])
    return np.array(out)


@pytest.mark.parametrize("spec, expected", [
    ("constant", [0.2] * 4),
    ("step:every=2,factor=0.5", [0.2, 0.2, 0.1, 0.1]),
    ("exponential:rate=0.5", [0.2, 0.1, 0.05, 0.025]),
    ("inverse-time:decay=1", [0.2, 0.1, 0.2 / 3, 0.05]),
    ("inverse_time:decay=1", [0.2, 0.1, 0.2 / 3, 0.05]),
    ("cosine", [0.2, 0.15, 0.05, 0.0]),  # total_steps=3 from the run
    ("cosine:total=2", [0.2, 0.1, 0.0, 0.0]),
])
def test_schedule_specs_are_honoured_by_the_optimizer(spec, expected):
    optimizer = registry.make_optimizer("sgd", 0.2, schedule=spec, total_steps=3)
    np.testing.assert_allclose(_rates(optimizer, 4), expected, atol=1e-15)


def test_schedule_function_is_used_as_given():
    optimizer = registry.make_optimizer("sgd", 1.0, schedule=lambda t: 0.1 * (t + 1))
    np.testing.assert_allclose(_rates(optimizer, 3), [0.1, 0.2, 0.3])


@pytest.mark.parametrize("spec, words", [
    ("warmup", "choose from"), ("step:every=10,gamma=2", "every="),
    ("step:every", "every="), ("step:every=ten", "number"), ("step:every=0", "every"),
    ("cosine", "number of steps"), ("constant:x=1", "no parameters"),
])
def test_bad_schedule_specs_are_rejected(spec, words):
    with pytest.raises(ValidationError, match=words):
        registry.make_optimizer("adam", 0.1, schedule=spec)


def test_registries_name_the_cli_choices():
    assert set(registry.MODELS) == {"linear", "logistic", "softmax", "mlp"}
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "lbfgs"} <= \
        set(registry.OPTIMIZERS)
    assert {"constant", "step", "exponential", "inverse-time", "cosine"} == \
        set(registry.SCHEDULES)
