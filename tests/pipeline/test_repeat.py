"""A run started from Python writes the config.toml that ``fedpipe … --config`` repeats."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fedpipe import runconfig, rundir
from fedpipe.cli import config, registry
from fedpipe.cli.main import main
from fedpipe.data import store
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.engine.train import fit
from fedpipe.tasks import aggregate, models, optimizers, schedules
from fedpipe.tasks.lbfgs import lbfgs
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=1"
INFO = SimpleNamespace(n_features=5, task="multiclass", classes=[0, 1, 2])


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("repeat") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=4, chunk_rows=50, name="p4",
                             standardize=True)


@pytest.fixture(scope="module")
def dask_client(fed_store):
    # Client-resource workers serve federate; fit runs on them too.
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["p4"]["clients"].items()}
    with placement.simulation_cluster(placement.assign_clients(rows, 2), processes=False,
                                      dashboard_address=":0") as dc:
        yield dc


def _same_params(one, two) -> None:
    a, b = rundir.load_run(one).named, rundir.load_run(two).named
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def _repeat(command: str, run, again, dask_client, capsys) -> int:
    code = main([command, "--config", str(run / "config.toml"), "--out", str(again),
                 "--scheduler", dask_client.scheduler.address, "-q"])
    capsys.readouterr()
    return code


def _same_config_but_where(command, one, two) -> None:
    """The CLI's own config.toml of the repeat holds what the Python call's said, and the
    command's defaults for the rest (out and scheduler aside)."""
    a, b = rundir.load_run(one).config, rundir.load_run(two).config
    assert config.command_values(command, {k: v for k, v in a.items() if k != "out"}) == {
        k: v for k, v in b.items() if k not in ("out", "scheduler", *config.RECORDS)}


# ---------------------------------------------------------------------------------------------
# fit -> fedpipe train --config


@pytest.mark.parametrize(("model", "optimizer", "length"), [
    (models.softmax(5, 3, l2=1e-3), optimizers.adam(0.05), {"iterations": 3}),
    (models.mlp(5, 3, hidden=(8,), l2=1e-4, l1=1e-5), optimizers.nesterov(0.1),
     {"epochs": 2, "batch_size": 64}),
    (models.softmax(5, 3, l2=1e-2), lbfgs(), {"iterations": 3}),
    (models.softmax(5, 3), optimizers.sgd(schedules.step_decay(0.5, every=2)),
     {"iterations": 3}),
], ids=["adam", "mlp-minibatch", "lbfgs", "schedule"])
def test_fit_from_python_repeats_with_fedpipe_train(fed_store, dask_client, tmp_path, capsys,
                                                    model, optimizer, length):
    first, again = tmp_path / "first", tmp_path / "again"
    fit(fed_store, model, optimizer, seed=3, test_fraction=0.25, dask_client=dask_client,
        out=first, **length)
    assert runconfig.NOT_REPEATABLE not in rundir.load_run(first).config
    assert _repeat("train", first, again, dask_client, capsys) == 0
    _same_params(first, again)
    _same_config_but_where("train", first, again)


def test_fit_with_a_rate_function_names_it_and_the_cli_refuses(fed_store, dask_client, tmp_path,
                                                               capsys, caplog):
    run = tmp_path / "scheduled"
    with caplog.at_level(logging.WARNING, logger="fedpipe"):
        fit(fed_store, models.softmax(5, 3), optimizers.sgd(lambda step: 0.5 / (1 + step)),
            iterations=3, dask_client=dask_client, out=run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "optimizer: " in warnings[0]
    saved = rundir.load_run(run).config
    assert saved["model"] == "softmax" and saved["iterations"] == 3  # what can be said, is
    assert "optimizer" not in saved and "lr" not in saved  # never the CLI's default sgd 0.1
    assert saved[runconfig.NOT_REPEATABLE][0].startswith("optimizer: ")
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot repeat its run" in err and "optimizer" in err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# federate -> fedpipe federate --config


@pytest.mark.parametrize(("model", "strategy", "options"), [
    (models.softmax(5, 3, l2=0.01), aggregate.fedadam(0.05),
     {"fraction": 0.5, "min_clients": 2}),
    (models.mlp(5, 3, hidden=(8, 4)), aggregate.fedprox(0.1),
     {"clients_per_round": 3, "deadline": 60.0, "eval_every": 2}),
    (models.softmax(5, 3), aggregate.scaffold(0.5), {}),
], ids=["fedadam", "fedprox-mlp", "scaffold"])
def test_federate_from_python_repeats_with_fedpipe_federate(fed_store, dask_client, tmp_path,
                                                            capsys, model, strategy, options):
    first, again = tmp_path / "first", tmp_path / "again"
    federate(fed_store, model, rounds=2, strategy=strategy, local_epochs=1, batch_size=16,
             lr=0.1, seed=4, test_fraction=0.25, dask_client=dask_client, out=str(first),
             **options)
    saved = rundir.load_run(first).config
    assert runconfig.NOT_REPEATABLE not in saved and saved["partition"] == "p4"
    assert _repeat("federate", first, again, dask_client, capsys) == 0
    _same_params(first, again)
    _same_config_but_where("federate", first, again)


def test_federate_with_a_schedule_repeats_it(fed_store, dask_client, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    federate(fed_store, models.softmax(5, 3), rounds=2, lr=schedules.cosine(0.2, 5, final=0.01),
             batch_size=16, dask_client=dask_client, out=str(first))
    saved = rundir.load_run(first).config
    assert (saved["lr"], saved["lr_schedule"]) == (0.2, "cosine:total=5,final=0.01")
    assert _repeat("federate", first, again, dask_client, capsys) == 0
    _same_params(first, again)
    _same_config_but_where("federate", first, again)


def test_federate_with_stages_and_a_rate_function_names_them(fed_store, dask_client, tmp_path,
                                                             capsys, caplog):
    run = tmp_path / "custom"
    with caplog.at_level(logging.WARNING, logger="fedpipe"):
        federate(fed_store, models.softmax(5, 3), rounds=1, lr=lambda rnd: 0.1 * 0.5**rnd,
                 stages=aggregate.default_chain(), dask_client=dask_client, out=str(run))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    saved = rundir.load_run(run).config
    assert [s.split(":")[0] for s in saved[runconfig.NOT_REPEATABLE]] == ["lr", "stages"]
    assert "lr" not in saved and saved["strategy"] == "fedavg"
    assert main(["federate", "--config", str(run / "config.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr: a schedule function" in err


# ---------------------------------------------------------------------------------------------
# reading options off objects (no cluster)


@pytest.mark.parametrize(("model", "expected"), [
    (models.softmax(5, 3), {"model": "softmax", "l2": 0.0, "l1": 0.0}),
    (models.softmax(5, 3, l2=0.3, l1=1e-20), {"model": "softmax", "l2": 0.3, "l1": 1e-20}),
    (models.softmax(5, 3, l1=0.02), {"model": "softmax", "l2": 0.0, "l1": 0.02}),
    (models.mlp(5, 3, hidden=(7, 2), l2=1e-4), {"model": "mlp", "hidden": "7,2", "l2": 1e-4,
                                                "l1": 0.0}),
    (models.mlp(5, 3, hidden=()), {"model": "mlp", "hidden": "", "l2": 0.0, "l1": 0.0}),
])
def test_model_options_rebuild_the_model(model, expected):
    assert runconfig.model_options(model, INFO) == {"hidden": None, **expected}
    options = {k: v for k, v in expected.items() if k != "model"}
    assert registry.make_model(expected["model"], INFO, **options).spec == model.spec


@pytest.mark.parametrize("model", [
    models.softmax(5, 3, intercept=False),
    models.Model("mine", *models.softmax(5, 3)[1:]),
    models.linear(5),  # does not fit a classification store
    models.softmax(4, 3),  # another number of features
    models.softmax(5, 3)._replace(spec=None),  # a model that cannot say how it was built
], ids=["no-intercept", "renamed", "wrong-task", "wrong-size", "no-spec"])
def test_models_the_cli_cannot_build(model):
    with pytest.raises(runconfig.NotExpressible, match=repr(model.name)):
        runconfig.model_options(model, INFO)


def test_federate_has_no_l1():
    with pytest.raises(runconfig.NotExpressible, match="no --l1"):
        runconfig.model_options(models.softmax(5, 3, l1=0.1), INFO, l1_option=False)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam",
                                  "adamw", "yogi"])
@pytest.mark.parametrize("lr", [0.1, 0.123456789, 3e-5])
def test_optimizer_options_read_the_rate_exactly(name, lr):
    assert runconfig.optimizer_options(getattr(optimizers, name)(lr)) == {"optimizer": name,
                                                                         "lr": lr}


@pytest.mark.parametrize("schedule", [
    schedules.constant(0.3), schedules.step_decay(0.1, every=10),
    schedules.exponential(0.2, rate=0.9, decay_steps=3), schedules.inverse_time(1e-5, decay=2),
    schedules.cosine(0.1, 40, final=0.001),
], ids=lambda s: s.spec["kind"])
def test_a_schedule_is_written_as_the_lr_schedule_the_cli_reads(schedule):
    options = runconfig.optimizer_options(optimizers.adam(schedule))
    rebuilt = registry.make_optimizer(options["optimizer"], options["lr"],
                                      options.get("lr_schedule"), total_steps=7)
    assert optimizers.describe(rebuilt)["lr"] in (schedule.spec, schedule.spec["lr"])


@pytest.mark.parametrize("optimizer", [
    optimizers.sgd(lambda step: 0.1),
    optimizers.adam(0.1, b1=0.8),
    optimizers.momentum(0.1, beta=0.95),
    optimizers.chain(optimizers.clip_by_global_norm(1.0), optimizers.scale(-0.1)),
    lbfgs(memory=5),
], ids=["rate-function", "adam-b1", "momentum-beta", "chain", "lbfgs-memory"])
def test_optimizers_the_cli_cannot_build(optimizer):
    with pytest.raises(runconfig.NotExpressible):
        runconfig.optimizer_options(optimizer)


def test_strategy_options():
    assert runconfig.strategy_options(aggregate.fedprox(0.2, server_lr=0.5)) == {
        "strategy": "fedprox", "server_lr": 0.5, "mu": 0.2}
    assert runconfig.strategy_options(aggregate.fedyogi(0.03)) == {"strategy": "fedyogi",
                                                                   "server_lr": 0.03}
    for other in (aggregate.fedadam(0.05, eps=1e-2), aggregate.fedavgm(beta=0.5),
                  aggregate.Strategy("mine", optimizers.sgd(1.0))):
        with pytest.raises(runconfig.NotExpressible, match=repr(other.name)):
            runconfig.strategy_options(other)


def test_runconfig_writes_the_names_the_cli_reads():
    assert {*optimizers.OPTIMIZERS, "lbfgs"} == set(registry.OPTIMIZERS)
    assert set(runconfig.SCHEDULE_NAMES.values()) == set(registry.SCHEDULES)
    assert set(runconfig.STRATEGIES) == set(registry.STRATEGIES)
    assert set(models.BUILDERS) == set(registry.MODELS)


def test_the_engines_import_nothing_of_the_cli():
    code = ("import sys, fedpipe.engine.train, fedpipe.engine.federate; "
            "print(sorted(m for m in sys.modules if m.startswith('fedpipe.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
