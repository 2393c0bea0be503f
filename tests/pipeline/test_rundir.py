"""The run directory: round trips, TOML, and checkpoints that survive a crash mid-write."""

import os
import tomllib

import numpy as np
import pytest
from fedpipe import rundir
from fedpipe.errors import ValidationError


def test_round_trip(tmp_path):
    run_dir = rundir.prepare(tmp_path / "run")
    rundir.write_params(run_dir, {"coef": np.arange(3.0), "intercept": np.array([1.0])})
    rundir.append_metrics(run_dir, {"iteration": 0, "train_loss": np.float64(0.5)})
    rundir.append_metrics(run_dir, {"iteration": 1, "train_loss": 0.25})
    rundir.write_summary(run_dir, {"iterations": 1, "final": {"train_loss": 0.25}})
    rundir.write_config(run_dir, {"model": "logistic", "lr": 0.1, "hidden": [4, 2], "l1": None})
    run = rundir.load_run(run_dir)
    np.testing.assert_array_equal(run.params["coef"], np.arange(3.0))
    assert [m["iteration"] for m in run.metrics] == [0, 1]
    assert run.summary["final"]["train_loss"] == 0.25
    assert run.config == {"model": "logistic", "lr": 0.1, "hidden": [4, 2]}


def test_prepare_clears_old_run_unless_resuming(tmp_path):
    run_dir = rundir.prepare(tmp_path)
    rundir.append_metrics(run_dir, {"iteration": 0})
    rundir.save_checkpoint(run_dir, {"params": np.zeros(2)}, {"iteration": 3})
    rundir.prepare(tmp_path, resume=True)
    assert rundir.load_checkpoint(run_dir) is not None
    rundir.prepare(tmp_path)
    assert rundir.load_checkpoint(run_dir) is None
    assert rundir.read_metrics(run_dir) == []


def test_prepare_rejects_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        rundir.prepare(tmp_path / "f")


def test_toml_nested_tables_and_escapes():
    text = rundir.to_toml(
        {"a": 1, "flag": True, "s": 'q"uote\n', "opt": {"lr": 1e-3, "sched": {"name": "cos"}},
         "x": float("inf"), "odd key": "v"}
    )
    assert tomllib.loads(text) == {"a": 1, "flag": True, "s": 'q"uote\n', "x": float("inf"),
                                   "odd key": "v", "opt": {"lr": 1e-3, "sched": {"name": "cos"}}}


def test_checkpoint_round_trip(tmp_path):
    arrays = {"params": np.linspace(0, 1, 5), "opt/step": np.array(7)}
    rundir.save_checkpoint(tmp_path, arrays, {"iteration": 7, "seed": 3})
    loaded, meta = rundir.load_checkpoint(tmp_path)
    assert meta == {"iteration": 7, "seed": 3}
    np.testing.assert_array_equal(loaded["params"], arrays["params"])
    assert int(loaded["opt/step"]) == 7


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    rundir.save_checkpoint(tmp_path, {"params": np.ones(4)}, {"iteration": 1})

    class Crash(BaseException):
        pass

    real_savez = np.savez

    def half_written(handle, **arrays):  # write some bytes, then "lose power"
        real_savez(handle, **arrays)
        handle.truncate(10)
        raise Crash

    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(Crash):
        rundir.save_checkpoint(tmp_path, {"params": np.full(4, 9.0)}, {"iteration": 2})
    monkeypatch.undo()
    arrays, meta = rundir.load_checkpoint(tmp_path)
    assert meta["iteration"] == 1
    np.testing.assert_array_equal(arrays["params"], np.ones(4))
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    rundir.save_checkpoint(tmp_path, {"params": np.ones(2)}, {"iteration": 1})

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        rundir.save_checkpoint(tmp_path, {"params": np.zeros(2)}, {"iteration": 2})
    monkeypatch.undo()
    assert rundir.load_checkpoint(tmp_path)[1]["iteration"] == 1


def test_torn_metrics_line_is_skipped_and_trim(tmp_path):
    for i in range(4):
        rundir.append_metrics(tmp_path, {"iteration": i})
    with open(tmp_path / rundir.METRICS, "a") as handle:
        handle.write('{"iteration": 4, "tr')
    assert [m["iteration"] for m in rundir.read_metrics(tmp_path)] == [0, 1, 2, 3]
    rundir.trim_metrics(tmp_path, lambda r: r["iteration"] < 2)
    assert [m["iteration"] for m in rundir.read_metrics(tmp_path)] == [0, 1]


def test_load_run_missing_dir(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        rundir.load_run(tmp_path / "nope")
