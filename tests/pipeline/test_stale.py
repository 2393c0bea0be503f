"""Bounded-staleness training (``--mode async``) on a real cluster: S = 0 is synchronous bit
for bit, the bound holds, a seeded run reproduces and resumes bit-identical."""

from __future__ import annotations

import json

import fedpipe as fp
import pytest
from fedpipe import rundir
from fedpipe.cli.main import main

MODEL, OPT = fp.models.softmax(5, 3, l2=0.01), fp.optimizers.adam(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fedpipe.data.ingest import ingest

    path = str(tmp_path_factory.mktemp("stale") / "s.zarr")
    ingest("synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=0", path,
           chunk_rows=50, progress=False, standardize=True)
    return path


@pytest.fixture(scope="module")
def sync(store, dask_client):
    return _fit(store, dask_client)


def _fit(store, dask_client, mode=None, **kw):
    kw = {"iterations": 6, "chunks_per_task": 1, **kw}
    return fp.fit(store, MODEL, OPT, dask_client=dask_client, mode=mode, **kw)


def _steps(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in records]


@pytest.mark.parametrize("mode", [fp.BoundedStaleness(0), fp.BoundedStaleness(0, groups=5),
                                  fp.BoundedStaleness(0, arrival="seeded", groups=3)],
                         ids=["real", "real-5-groups-streaming", "seeded"])
def test_bound_zero_is_synchronous_training_bit_for_bit(store, dask_client, sync, mode):
    stale = _fit(store, dask_client, mode, cache="stream" if mode.groups == 5 else "auto")
    assert stale.params.tobytes() == sync.params.tobytes()
    assert [r["train_loss"] for r in stale.metrics] == [r["train_loss"] for r in sync.metrics]
    assert all(r["staleness_max"] == 0 for r in stale.metrics[:-1])
    assert stale.metrics[-1] == {**sync.metrics[-1], "seconds": stale.metrics[-1]["seconds"],
                                 "elapsed": stale.metrics[-1]["elapsed"]}
    assert stale.summary["staleness_max"] == 0 and stale.summary["mode"] == "async"


def test_seeded_run_keeps_the_bound_reproduces_and_trains(store, dask_client, sync):
    mode = fp.BoundedStaleness(2, arrival="seeded", groups=4, spread=1.0)
    a, b = _fit(store, dask_client, mode), _fit(store, dask_client, mode)
    assert a.params.tobytes() == b.params.tobytes()
    assert _steps(a.metrics) == _steps(b.metrics)
    lags = [r["staleness_max"] for r in a.metrics[:-1]]
    assert max(lags) == 2 and a.summary["staleness_max"] == 2  # stale steps were taken ...
    assert a.params.tobytes() != sync.params.tobytes()  # ... so it is not the synchronous run
    assert a.metrics[-1]["train_loss"] < 0.95 * a.metrics[0]["train_loss"]
    assert abs(a.metrics[-1]["train_loss"] - sync.metrics[-1]["train_loss"]) < 0.05


def test_real_arrival_keeps_the_bound(store, dask_client):
    run = _fit(store, dask_client, fp.BoundedStaleness(1, groups=6), iterations=8)
    assert max(r["staleness_max"] for r in run.metrics[:-1]) <= 1
    arrived = [g for r in run.metrics[:-1] for g, _ in r["arrivals"]]
    assert sorted(set(arrived)) == list(range(6))  # the arrival order is in the run


class _Stop(Exception):
    """Raised from on_record: the run stops there, as a killed driver would."""


def _stop_at(iteration):
    def on_record(record):
        if record["iteration"] == iteration:
            raise _Stop

    return on_record


@pytest.mark.parametrize("how", ["shorter-run", "stopped"])
def test_seeded_run_resumes_bit_identical(store, dask_client, tmp_path, how):
    mode = fp.BoundedStaleness(3, arrival="seeded", groups=4, spread=1.0)
    whole = _fit(store, dask_client, mode, iterations=7, out=tmp_path / "whole")
    if how == "shorter-run":  # its final checkpoint books the work the next steps need
        _fit(store, dask_client, mode, iterations=3, out=tmp_path / "split")
    else:  # stopped mid-run after the checkpoint of version 4, with groups in flight
        with pytest.raises(_Stop):
            _fit(store, dask_client, mode, iterations=7, out=tmp_path / "split",
                 checkpoint_every=2, on_record=_stop_at(5))
    resumed = _fit(store, dask_client, mode, iterations=7, out=tmp_path / "split",
                   resume=True, checkpoint_every=2)
    assert resumed.params.tobytes() == whole.params.tobytes()
    assert _steps(rundir.read_metrics(tmp_path / "split")) == _steps(
        rundir.read_metrics(tmp_path / "whole"))
    with pytest.raises(fp.ValidationError, match="--max-staleness 3, not 1"):
        _fit(store, dask_client, fp.BoundedStaleness(1, arrival="seeded", groups=4),
             iterations=7, out=tmp_path / "split", resume=True)


def test_cli_async_run_records_staleness(store, dask_client, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", store, "--model", "softmax", "--optimizer", "adam", "--lr", "0.05",
                 "--iterations", "5", "--mode", "async", "--max-staleness", "2",
                 "--arrival", "seeded", "--scheduler", dask_client.scheduler.address,
                 "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "async" and summary["max_staleness"] == 2
    assert summary["staleness_max"] <= 2 and "test_accuracy" in summary["final"]
    records = rundir.read_metrics(out)
    assert [r["iteration"] for r in records] == list(range(6))
    assert all({"staleness_mean", "staleness_max"} <= set(r) for r in records[:-1])
    assert (out / "config.toml").read_text().count('mode = "async"') == 1
