"""``fedpipe train`` end to end: run directory, JSON, one-line errors, a real kill and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.engine.train import fit
from fedpipe.tasks import models, optimizers


@pytest.fixture(scope="module")
def dask_client():
    with (LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                       dashboard_address="127.0.0.1:0") as cluster,
          Client(cluster) as dask_client):
        yield dask_client


def test_train_writes_the_run_directory(small_store, tmp_path, capsys, dask_client):
    store = small_store(standardize=True)
    out = tmp_path / "run"
    code = main(["train", store, "--model", "softmax", "--optimizer", "adam", "--lr", "0.05",
                 "--iterations", "4", "--scheduler", dask_client.scheduler.address,
                 "--out", str(out), "--checkpoint-every", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 4 and summary["peak_worker_memory"] > 0
    assert {"train_loss", "test_loss", "test_accuracy"} <= set(summary["final"])
    assert summary["seconds_per_iteration"] > 0 and summary["total_seconds"] > 0
    assert {p.name for p in out.iterdir()} >= {"params.npz", "metrics.jsonl", "summary.json",
                                                "config.toml", "checkpoint.npz"}
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["model"] == "softmax" and config["lr"] == 0.05 and config["iterations"] == 4
    assert len(rundir.read_metrics(out)) == 5


@pytest.mark.parametrize("argv,culprit", [
    (["--model", "svm", "--iterations", "2"], "--model"),
    (["--model", "linear", "--iterations", "2"], "does not fit"),
    (["--model", "softmax", "--optimizer", "adam", "--lr", "0", "--iterations", "2"], "--lr"),
    (["--model", "softmax", "--optimizer", "sgdx", "--iterations", "2"], "--optimizer"),
    (["--model", "softmax"], "--iterations"),
])
def test_bad_input_is_one_line_and_exit_2(small_store, capsys, argv, culprit):
    code = main(["train", small_store(), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and culprit in err


def test_missing_store_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.zarr"), "--model", "softmax",
                 "--iterations", "1"]) == 2
    assert "nope.zarr" in capsys.readouterr().err


@pytest.mark.chaos  # a CLI process killed and resumed: ~13 s; make test keeps the in-process resume tests
def test_killed_run_resumes_to_the_uninterrupted_params(small_store, tmp_path, dask_client):
    store = small_store(standardize=True)
    out = tmp_path / "killed"
    args = ["train", store, "--model", "softmax", "--optimizer", "momentum", "--lr", "0.1",
            "--iterations", "60", "--workers", "1", "--threads", "1", "--out", str(out),
            "--checkpoint-every", "5", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "fedpipe.cli.main", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = rundir.load_checkpoint(out) if (out / "checkpoint.npz").exists() else None
            if ckpt is not None and ckpt[1]["iteration"] >= 10:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.skip("the run finished before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = rundir.load_checkpoint(out)[1]["iteration"]
    assert 10 <= killed_at < 60 and not (out / "summary.json").exists()
    resumed_at = main([*args, "--resume", "--scheduler", dask_client.scheduler.address])
    assert resumed_at == 0
    whole = fit(store, models.softmax(5, 3), optimizers.momentum(0.1), iterations=60,
                dask_client=dask_client)
    resumed = np.load(out / "params.npz")
    np.testing.assert_array_equal(resumed["coef"], whole.named["coef"])
    assert resumed["coef"].tobytes() == whole.named["coef"].tobytes()
    steps = [r["iteration"] for r in rundir.read_metrics(out)]
    assert steps == list(range(61))


def test_config_file_gives_the_options(small_store, tmp_path, capsys, dask_client):
    store = small_store()
    config = Path(tmp_path / "train.toml")
    config.write_text(f'store = "{store}"\nmodel = "softmax"\niterations = 2\n'
                      f'scheduler = "{dask_client.scheduler.address}"\n')
    assert main(["train", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iterations"] == 2


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_reusing_a_finished_runs_out_keeps_its_results(small_store, tmp_path, capsys,
                                                       dask_client):
    store, out = small_store(standardize=True), tmp_path / "run"
    argv = ["train", store, "--model", "softmax", "--lr", "0.05", "--iterations", "2",
            "--out", str(out)]
    assert main([*argv, "--scheduler", dask_client.scheduler.address]) == 0
    before = _snapshot(out)
    # The case: a new run into the same --out whose scheduler cannot be reached.
    unreachable = ["--scheduler", "tcp://127.0.0.1:9", "--iterations", "3"]
    assert main([*argv, *unreachable]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert _snapshot(out) == before  # config.toml included: nothing was written
    # With --overwrite the earlier run stays whole until the new one has finished.
    assert main([*argv, *unreachable, "--overwrite"]) != 0
    assert _snapshot(out) == before
    assert main([*argv, "--scheduler", dask_client.scheduler.address, "--iterations", "3",
                 "--overwrite"]) == 0
    assert len(rundir.read_metrics(out)) == 4

