"""Federated rounds on a real (in-process) cluster whose workers carry client resources."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from fedpipe.data import index, store
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.tasks import aggregate, models, optimizers, reduce
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=800&n_features=5&n_classes=3&seed=1"
REGRESSION = "synthetic:regression?n_samples=400&n_features=5&seed=2"
N_CLIENTS = 8


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fed") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=N_CLIENTS, chunk_rows=50, name="fed")


@pytest.fixture(scope="module")
def dask_client(fed_store):
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    with placement.simulation_cluster(placement.assign_clients(rows, 2), processes=False,
                                      dashboard_address=":0") as dc:
        yield dc


def _model():
    return models.softmax(5, 3, l2=0.01)


def _client_train_rows(url: str) -> tuple[np.ndarray, np.ndarray]:
    info = store.read_info(url)
    parts = [store.read_chunk(url, ref, split="train", test_fraction=0.2, seed=0, info=info)
             for c in sorted(info.partitions["fed"]["clients"], key=int)
             for ref in store.chunk_refs(info, partition="fed", client=c)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_fedavg_with_one_full_batch_step_is_gradient_descent(fed_store, dask_client):
    model, lr, rounds = _model(), 0.5, 4
    run = federate(fed_store, model, rounds=rounds, local_epochs=1, batch_size=10_000, lr=lr,
                   dask_client=dask_client, eval_every=rounds)
    X, y = _client_train_rows(fed_store)
    p = model.init(0)
    for _ in range(rounds):  # the serial NumPy reference: data-parallel gradient descent
        _, g, n = model.loss_and_grad(p, X, y)
        p = p - lr * (g / n + model.penalty(p)[1])
    np.testing.assert_allclose(run.params, p, rtol=1e-10, atol=1e-12)
    assert [r["aggregated"] for r in run.metrics] == [N_CLIENTS] * rounds


@pytest.mark.parametrize("strategy", [aggregate.fedprox(0.1), aggregate.scaffold()],
                         ids=["fedprox", "scaffold"])
def test_one_task_per_worker_equals_one_task_per_client(fed_store, dask_client, strategy):
    kwargs = dict(rounds=3, strategy=strategy, local_epochs=2, batch_size=16, lr=0.1,
                  fraction=0.5, dask_client=dask_client, seed=3)
    batched = federate(fed_store, _model(), batch_clients=True, **kwargs)
    single = federate(fed_store, _model(), batch_clients=False, **kwargs)
    np.testing.assert_array_equal(batched.params, single.params)
    assert [r["test_loss"] for r in batched.metrics] == [r["test_loss"] for r in single.metrics]
    assert [r["sampled"] for r in batched.metrics] == [4, 4, 4]


@pytest.mark.parametrize("strategy", [aggregate.fedadam(0.05), aggregate.scaffold()],
                         ids=["fedadam", "scaffold"])
def test_resume_ends_bit_identical(fed_store, dask_client, tmp_path, strategy):
    kwargs = dict(strategy=strategy, local_epochs=1, batch_size=16, lr=0.1, fraction=0.5,
                  dask_client=dask_client, seed=5)
    whole = federate(fed_store, _model(), rounds=4, out=str(tmp_path / "whole"), **kwargs)
    federate(fed_store, _model(), rounds=2, checkpoint_every=1, out=str(tmp_path / "cut"), **kwargs)
    resumed = federate(fed_store, _model(), rounds=4, resume=True, out=str(tmp_path / "cut"),
                       **kwargs)
    np.testing.assert_array_equal(resumed.params, whole.params)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
    assert json.loads(lines[-1])["test_loss"] == whole.metrics[-1]["test_loss"]


def test_client_transforms_go_with_any_client_optimizer(fed_store, dask_client):
    # FedProx's and SCAFFOLD's terms are transforms chained before the client's optimizer,
    # so an adam client takes them too (SCAFFOLD used to refuse anything but sgd).
    adam = optimizers.adam(0.02)
    kwargs = dict(rounds=3, local_epochs=1, batch_size=16, dask_client=dask_client, seed=3)
    plain = federate(fed_store, _model(), strategy=aggregate.fedavg()._replace(client=adam),
                     **kwargs)
    for strategy in (aggregate.fedprox(0.5), aggregate.scaffold()):
        run = federate(fed_store, _model(), strategy=strategy._replace(client=adam), **kwargs)
        assert run.metrics[-1]["train_loss"] < run.metrics[0]["train_loss"]
        assert not np.array_equal(run.params, plain.params)  # the client term acted


def _client_test_rows(url: str, client: str) -> tuple[np.ndarray, np.ndarray]:
    info = store.read_info(url)
    parts = [store.read_chunk(url, ref, split="test", test_fraction=0.2, seed=0, info=info)
             for ref in store.chunk_refs(info, partition="fed", client=client)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _test_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("test_")}


def test_regression_run_reports_the_data_parallel_test_metrics(dask_client, tmp_path):
    url = partitioned_store(str(tmp_path / "reg.zarr"), source=REGRESSION, clients=N_CLIENTS,
                            chunk_rows=50, name="fed")
    model = models.linear(5)
    records: list[dict] = []  # with per-client records, which run.metrics leaves out
    run = federate(url, model, rounds=2, lr=0.1, dask_client=dask_client,
                   on_record=records.append)
    assert all({"test_loss", "test_rmse", "test_r2"} <= set(r) for r in run.metrics)
    # The serial reference: the data-parallel engine's sums of each client's own test rows.
    sums = {c: reduce.eval_sums(model, run.params, _client_test_rows(url, c))
            for c in map(str, range(N_CLIENTS))}
    record = records[-1]
    for client, client_sums in sums.items():
        expected = reduce.finish_metrics(client_sums, model.task)
        assert set(expected) == {"test_loss", "test_rmse", "test_r2"}
        assert _test_metrics(record["clients"][client]) == pytest.approx(expected, rel=1e-12)
    total = reduce.finish_metrics(reduce.add_sums(*sums.values()), model.task)
    assert _test_metrics(record) == pytest.approx(total, rel=1e-12)


def test_no_test_rows_means_no_test_metrics(fed_store, dask_client):
    # As `fedpipe train --test-fraction 0`: no test_* entry, not a test_loss of 0/0.
    records: list[dict] = []
    federate(fed_store, _model(), rounds=1, test_fraction=0.0, dask_client=dask_client,
             on_record=records.append)
    record = records[0]
    assert record["aggregated"] == N_CLIENTS and not _test_metrics(record)
    assert not any(_test_metrics(rec) for rec in record["clients"].values())


def _marker(url: str, client: str) -> np.ndarray:
    info = store.read_info(url)
    ref = store.chunk_refs(info, partition="fed", client=client)[0]
    return store.read_chunk(url, ref, split="train", test_fraction=0.2, seed=0, info=info)[0][0]


def _on_client(model, marker, effect):
    """A model whose gradient misbehaves (``effect``) on batches holding one client's row."""
    inner = model.loss_and_grad

    def loss_and_grad(p, X, y):
        loss, g, n = inner(p, X, y)
        if np.any(np.all(X == marker, axis=1)):
            g = effect(g)
        return loss, g, n

    return model._replace(loss_and_grad=loss_and_grad)


def test_non_finite_update_is_rejected_and_the_round_goes_on(fed_store, dask_client):
    model = _on_client(_model(), _marker(fed_store, "3"), lambda g: g * np.nan)
    records: list[dict] = []
    run = federate(fed_store, model, rounds=2, dask_client=dask_client, lr=0.1,
                   on_record=records.append)
    for record in records:
        assert "non-finite" in record["rejected"]["3"]
        assert record["aggregated"] == N_CLIENTS - 1
        # Each client reports its time to finish and what it sent; a rejected one sent nothing.
        sent = {c: m["update_bytes"] for c, m in record["clients"].items() if "update_bytes" in m}
        assert sent["3"] == 0 and all(b >= run.params.nbytes for c, b in sent.items() if c != "3")
        assert all(m["seconds"] > 0 for m in record["clients"].values() if "seconds" in m)
    assert np.all(np.isfinite(run.params))


def test_too_few_valid_updates_stops_with_a_clear_message(fed_store, dask_client):
    model = _model()._replace(loss_and_grad=lambda p, X, y: (0.0, p * np.nan, len(y)))
    with pytest.raises(TrainingError, match="fewer than --min-clients 2"):
        federate(fed_store, model, rounds=2, min_clients=2, dask_client=dask_client)


def test_late_client_is_dropped_at_the_deadline(fed_store, dask_client):
    def slow(g):
        time.sleep(4.0)
        return g

    model = _on_client(_model(), _marker(fed_store, "5"), slow)
    start = time.perf_counter()
    records: list[dict] = []
    federate(fed_store, model, rounds=1, dask_client=dask_client, deadline=2.0,
             batch_size=1000, eval_every=1, on_record=records.append)
    record = records[0]
    assert record["dropped"]["5"] == "late"
    assert 1 <= record["aggregated"] < N_CLIENTS
    assert "train_loss" not in record["clients"].get("5", {})  # its late result was discarded
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"fraction": 0.0}, "--fraction must be in"),
    ({"fraction": 1.01}, "--fraction must be in"),
    ({"clients_per_round": 2, "min_clients": 3}, "--min-clients 3 must be between"),
    ({"partition": "nope"}, "has no partition 'nope'"),
    ({"rounds": 0}, "--rounds must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(fed_store, dask_client, kwargs, match):
    options = {"rounds": 1, "dask_client": dask_client} | kwargs
    with pytest.raises(ValidationError, match=match) as info:
        federate(fed_store, _model(), **options)
    assert "\n" not in str(info.value)


def test_partition_that_does_not_match_the_store(fed_store, dask_client, tmp_path):
    import shutil

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(fed_store, copy)
    # A copy whose client table gives client 0 seven rows more, under a matching checksum.
    record_file = tmp_path / "copy.zarr" / index.partition_key("fed")
    record = json.loads(record_file.read_text())
    table_file = tmp_path / "copy.zarr" / record["path"] / index.CLIENTS_FILE
    table = json.loads(table_file.read_text())
    table["n_rows"][0] += 7
    table_file.write_text(json.dumps(table))
    record["clients_sha256"] = hashlib.sha256(table_file.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValidationError, match="made for another version of the store"):
        federate(copy, _model(), rounds=1, dask_client=dask_client)


def test_cli_federate_writes_the_run_directory(tmp_path, capsys):
    from fedpipe.cli.main import main

    path = partitioned_store(str(tmp_path / "s.zarr"), source=SOURCE, clients=4, chunk_rows=100,
                             name="p")
    out = tmp_path / "run"
    code = main(["federate", path, "--model", "softmax", "--rounds", "2", "--workers", "1",
                 "--partition", "p", "--strategy", "fedavgm", "--server-lr", "0.5",
                 "--clients-per-round", "3", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["seconds_per_round"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(len([c for c, m in r["clients"].items() if "train_loss" in m]) == 3
               for r in records)
    assert all("test_accuracy" in m for m in records[-1]["clients"].values())
    assert {"params.npz", "summary.json", "config.toml", "checkpoint.npz"} <= {
        p.name for p in out.iterdir()}
    assert main(["federate", path, "--model", "softmax", "--rounds", "1", "--fraction", "2"]) == 2
    assert "argument --fraction: must be a number in (0, 1]" in capsys.readouterr().err
    for flags in (["--alpha", "0.5"], ["--scheme", "dirichlet"]):  # ignored silently before
        assert main(["federate", path, "--model", "softmax", "--rounds", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{flags[0]} only apply with --clients" in err


def test_external_scheduler_is_used_not_replaced(fed_store, dask_client):
    # The deployment path: connect by address, discover the client workers, start nothing.
    address = dask_client.scheduler.address
    before = set(dask_client.scheduler_info()["workers"])
    run = federate(fed_store, _model(), rounds=1, scheduler=address)
    assert run.metrics[0]["aggregated"] == N_CLIENTS
    assert set(dask_client.scheduler_info()["workers"]) == before


def test_fewer_workers_than_client_resources(fed_store):
    with placement.simulation_cluster([["0", "1"], ["2"]], processes=False,
                                      dashboard_address=":0") as dc:
        with pytest.raises(TrainingError, match="no worker carries resource client-3, "
                                                "client-4, client-5 and 2 more"):
            federate(fed_store, _model(), rounds=1, dask_client=dc)


def test_scheme_iid_from_an_earlier_runs_config_file_is_not_an_error():
    import argparse

    from fedpipe.cli.federate import _check_partition_options

    args = argparse.Namespace(clients=None, scheme="iid", alpha=None)
    _check_partition_options(args, set())  # RUN_DIR/config.toml of a run on a named partition
    with pytest.raises(ValidationError, match="--scheme only apply with --clients"):
        _check_partition_options(args, {"scheme"})
    with pytest.raises(ValidationError, match="--scheme only apply with --clients"):
        _check_partition_options(argparse.Namespace(clients=None, scheme="dirichlet",
                                                    alpha=None), set())


def test_driver_history_keeps_no_per_client_records(fed_store, dask_client, tmp_path):
    # Issue 12: per-client records belong in metrics.jsonl; kept on the driver they grew it by
    # clients x rounds. What stays in memory per round must not depend on the clients.
    seen: list[dict] = []
    run = federate(fed_store, _model(), rounds=3, lr=0.1, dask_client=dask_client,
                   out=str(tmp_path / "run"), on_record=seen.append)
    assert all(len(rec["clients"]) == N_CLIENTS for rec in seen)  # on_record gets everything
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [len(rec["clients"]) for rec in lines] == [N_CLIENTS] * 3  # and so does the file
    # The driver keeps each round's own figures, nothing per client.
    assert run.metrics == [{k: v for k, v in rec.items() if k != "clients"} for rec in seen]


def _rows_of(url: str, client: str) -> tuple[np.ndarray, np.ndarray]:
    info = store.read_info(url)
    parts = [store.read_chunk(url, ref, split="train", test_fraction=0.2, seed=0, info=info)
             for ref in store.chunk_refs(info, partition="fed", client=client)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_strategy_as_data_clients_run_its_optimizer(fed_store, dask_client):
    # Strategy(client=adam, local_epochs=2, server=adam): the serial reference runs the same
    # values by hand, client by client.
    from fedpipe.tasks import optimizers

    client, server = optimizers.adam(0.05), optimizers.adam(0.1)
    strategy = aggregate.Strategy("adam-adam", server, client=client, local_epochs=2)
    model = _model()
    run = federate(fed_store, model, rounds=2, strategy=strategy, batch_size=10_000,
                   dask_client=dask_client, eval_every=2)
    p, server_state = model.init(0), server.init(model.init(0))
    rows = {c: _rows_of(fed_store, c) for c in map(str, range(N_CLIENTS))}
    for _ in range(2):
        weighted, total = np.zeros_like(p), 0
        for X, y in rows.values():
            w, state = p.copy(), client.init(p)
            for _ in range(2):
                _, g, n = model.loss_and_grad(w, X, y)
                updates, state = client.update(g / n + model.penalty(w)[1], state, w)
                w = w + updates
            weighted, total = weighted + len(y) * (w - p), total + len(y)
        updates, server_state = server.update(-weighted / total, server_state, p)
        p = p + updates
    np.testing.assert_allclose(run.params, p, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValidationError, match="sets client: drop lr="):
        federate(fed_store, model, rounds=1, strategy=strategy, lr=0.1, dask_client=dask_client)
    with pytest.raises(ValidationError, match="sets local_epochs"):
        federate(fed_store, model, rounds=1, strategy=strategy, local_epochs=3,
                 dask_client=dask_client)


class _Graphs(SchedulerPlugin):
    """The keys of every graph the driver submits: one graph per wave of a round's tasks."""

    name = "count-graphs"

    def __init__(self):
        self.graphs: list[list[str]] = []

    def update_graph(self, scheduler, *, keys, **kwargs):
        self.graphs.append([str(k) for k in keys])


def test_an_evaluated_round_costs_one_wave_of_client_tasks(fed_store, dask_client):
    rounds = 4
    recorder = _Graphs()
    dask_client.cluster.scheduler.add_plugin(recorder)
    try:
        run = federate(fed_store, _model(), rounds=rounds, dask_client=dask_client)
    finally:
        dask_client.cluster.scheduler.remove_plugin(name=recorder.name)
    waves = [g for g in recorder.graphs if any(k.startswith(("local-", "eval-")) for k in g)]
    # One wave a round (evaluating the previous round's result while training), plus the
    # last round's evaluation: 5, where evaluating apart costs 8.
    assert len(waves) == rounds + 1
    assert all(k.startswith("eval-") for k in waves[-1])
    assert all("test_accuracy" in h for h in run.metrics)
    # Each record's test metrics are those of the params after its round, as when evaluated
    # apart (per-client tasks take that path), and training is unchanged bit for bit.
    apart = federate(fed_store, _model(), rounds=rounds, dask_client=dask_client,
                     batch_clients=False)
    np.testing.assert_array_equal(run.params, apart.params)
    def tests(history):
        return [{k: v for k, v in h.items() if k.startswith("test_")} for h in history]

    assert tests(run.metrics) == tests(apart.metrics)
