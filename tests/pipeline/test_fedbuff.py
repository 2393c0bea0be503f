"""Buffered asynchronous federated training (FedBuff) on a real in-process cluster."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from distributed import Client
from fedpipe.cli.main import main
from fedpipe.data import store
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.errors import ValidationError
from fedpipe.tasks import aggregate, fedbuff, models, privacy
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=1"
MODE = fedbuff.buffered(buffer_size=3, max_concurrency=5, staleness_exponent=0.5,
                        max_staleness=2, speeds=fedbuff.two_tier(0.3, 10))


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fedbuff") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=10, chunk_rows=30, scheme="dirichlet",
                             alpha=0.5, name="fed")


@pytest.fixture(scope="module")
def dask_client(fed_store):
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    with placement.simulation_cluster(placement.assign_clients(rows, 2), processes=False,
                                      dashboard_address="127.0.0.1:0") as dc:
        yield dc


def _run(url, dc, **kwargs):
    options = dict(rounds=8, mode=MODE, dask_client=dc, seed=3, batch_size=16, lr=0.2,
                   eval_every=4) | kwargs
    return federate(url, models.softmax(5, 3), **options)


def test_virtual_clock_run_is_reproducible_and_staleness_is_bounded(fed_store, dask_client,
                                                                     tmp_path):
    a = _run(fed_store, dask_client, out=str(tmp_path / "a"))
    b = _run(fed_store, dask_client)
    np.testing.assert_array_equal(a.params, b.params)
    assert a.params.tobytes() != models.softmax(5, 3).init(3).tobytes()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [r["version"] for r in records] == list(range(1, 9))
    assert all(r["staleness"]["max"] <= MODE.max_staleness for r in records)
    assert all(r["aggregated"] == MODE.buffer_size for r in records)
    times = [r["virtual_time"] for r in records]
    assert times == sorted(times) and times[-1] == a.summary["clock"]
    # the slow tier makes stale updates: some are weighted, some beyond S = 2 dropped
    assert any(r["staleness"]["max"] > 0 for r in records)
    assert a.summary["updates_dropped_stale"] == sum(r["dropped_stale"] for r in records) > 0
    assert "test_accuracy" in records[3] and "test_accuracy" in records[7]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["mode"]["buffer_size"] == 3 and summary["version"] == 8
    assert "mode = \"async\"" in (tmp_path / "a" / "config.toml").read_text()
    assert (tmp_path / "a" / "params.npz").exists()


def test_resume_after_an_interruption_ends_bit_identical(fed_store, dask_client, tmp_path):
    whole = _run(fed_store, dask_client)

    def interrupt(record):
        if record["version"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # after the checkpoint of version 4 (in flight: 5)
        _run(fed_store, dask_client, out=str(tmp_path / "cut"), checkpoint_every=4,
             on_record=interrupt)
    resumed = _run(fed_store, dask_client, out=str(tmp_path / "cut"), resume=True)
    np.testing.assert_array_equal(resumed.params, whole.params)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == list(range(1, 9))
    assert resumed.summary["clock"] == whole.summary["clock"]


def test_clipping_runs_in_the_async_chain(fed_store, dask_client):
    chain = (aggregate.validate(), privacy.clip(0.05), aggregate.weighted_mean())
    run = _run(fed_store, dask_client, stages=chain, rounds=3, eval_every=3)
    assert all(h["aggregation"]["clip/clipped"] > 0 for h in run.metrics)


@pytest.mark.parametrize("kwargs, flag", [
    ({"strategy": aggregate.scaffold()}, "scaffold"),
    ({"fraction": 0.5}, "--fraction"),
    ({"stages": (aggregate.validate(), privacy.clip(1.0), privacy.dp_mean(10.0),
                 privacy.gaussian_noise(1.0, 1.0, seed=0))}, "--dp"),
    ({"mode": fedbuff.buffered(max_concurrency=11)}, "--max-concurrency"),
])
def test_unsupported_combinations_are_refused(fed_store, dask_client, kwargs, flag):
    with pytest.raises(ValidationError, match=flag):
        _run(fed_store, dask_client, **kwargs)


@pytest.mark.parametrize("extra, flag", [
    (["--secure-aggregation"], "--secure-aggregation"),
    (["--dp", "central", "--clip", "1", "--noise-multiplier", "1"], "--dp"),
    (["--strategy", "scaffold"], "--strategy scaffold"),
    (["--client-speeds", "gamma:2"], "--client-speeds"),
    (["--clock", "wall", "--client-speeds", "two-tier:0.2,10"], "--client-speeds"),
])
def test_cli_refuses_in_one_line_naming_the_flag(fed_store, capsys, extra, flag):
    code = main(["federate", fed_store, "--model", "softmax", "--rounds", "2", "--mode", "async",
                 *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err


def test_async_options_without_mode_async_are_refused(fed_store, capsys):
    code = main(["federate", fed_store, "--model", "softmax", "--rounds", "2",
                 "--buffer-size", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--buffer-size" in err and len(err.splitlines()) == 1


def test_wall_clock_takes_updates_as_they_arrive_within_the_bound(fed_store, dask_client):
    mode = fedbuff.buffered(buffer_size=2, max_concurrency=4, max_staleness=0, clock="wall")
    run = _run(fed_store, dask_client, mode=mode, rounds=4, eval_every=4)
    assert [h["version"] for h in run.metrics] == [1, 2, 3, 4]
    assert all(h["staleness"]["max"] == 0 for h in run.metrics)  # S = 0: fresh updates only
    times = [h["clock_time"] for h in run.metrics]
    assert times == sorted(times) and "test_accuracy" in run.metrics[-1]


@pytest.mark.slow
@pytest.mark.chaos  # a cluster of real worker processes, one SIGKILLed and restarted (~20 s)
def test_a_killed_client_worker_changes_nothing_on_the_virtual_clock(fed_store, tmp_path):
    """SIGKILL of a worker mid-run: Dask runs its clients' lost tasks again on the worker its
    nanny restarts (the clients' resources lent again), from the same inputs; the virtual
    clock orders updates by simulated time, so the run ends on the same bits."""
    from test_any_cluster import _report, plain_cluster

    killed: dict = {}
    with plain_cluster(tmp_path) as (address, _), Client(address) as dc:
        whole = _run(fed_store, dc)

        def kill(record):
            if record["version"] == 2 and not killed:
                victim = max(dc.run(_report).values(), key=lambda r: len(r["resident"]))
                killed.update(victim)
                os.kill(victim["pid"], signal.SIGKILL)  # the worker process, not its nanny

        run = _run(fed_store, dc, on_record=kill)
        after = {r["nanny"]: r for r in dc.run(_report).values()}
    assert killed["resident"] and after[killed["nanny"]]["pid"] != killed["pid"]
    assert run.summary["updates_failed"] == 0
    np.testing.assert_array_equal(run.params, whole.params)
