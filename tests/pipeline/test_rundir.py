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
    np.testing.assert_array_equal(run.named["coef"], np.arange(3.0))
    np.testing.assert_array_equal(run.params, [0.0, 1.0, 2.0, 1.0])  # flat, in file order
    assert [m["iteration"] for m in run.metrics] == [0, 1]
    assert run.summary["final"]["train_loss"] == 0.25
    assert run.config == {"model": "logistic", "lr": 0.1, "hidden": [4, 2]}


def _finished_run(run_dir, value):
    rundir.append_metrics(run_dir, {"iteration": 0})
    rundir.save_checkpoint(run_dir, {"params": np.full(2, value)}, {"iteration": 3})
    rundir.write_params(run_dir, {"coef": np.full(2, value)})
    rundir.write_summary(run_dir, {"value": value})


def test_a_new_run_refuses_an_earlier_runs_results(tmp_path):
    _finished_run(rundir.prepare(tmp_path / "run"), 1.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValidationError, match="holds an earlier run.*--overwrite"):
        rundir.prepare(tmp_path / "run")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert rundir.prepare(tmp_path / "run", resume=True) == tmp_path / "run"
    assert rundir.load_checkpoint(tmp_path / "run") is not None


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_published(tmp_path):
    out = tmp_path / "run"
    _finished_run(rundir.prepare(out), 1.0)
    staging = rundir.prepare(out, overwrite=True)
    assert staging != out and rundir.target(staging) == out
    _finished_run(staging, 2.0)
    # killed here: the earlier run is whole
    assert rundir.load_run(out).summary == {"value": 1.0}
    assert rundir.publish(staging) == out
    assert rundir.load_run(out).summary == {"value": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_directory_with_only_a_config_is_reused_in_place(tmp_path):
    rundir.write_config(rundir.prepare(tmp_path / "run"), {"model": "linear"})
    assert rundir.prepare(tmp_path / "run") == tmp_path / "run"


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
    assert meta["iteration"] == 7 and meta["seed"] == 3 and len(meta["digest"]) == 64
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


def test_checkpoints_keep_two_generations_and_skip_a_damaged_one(tmp_path, caplog):
    rundir.save_checkpoint(tmp_path, {"params": np.zeros(3)}, {"iteration": 1})
    rundir.save_checkpoint(tmp_path, {"params": np.ones(3)}, {"iteration": 2})
    assert rundir.load_checkpoint(tmp_path)[1]["iteration"] == 2
    newest = tmp_path / rundir.CHECKPOINT
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    arrays, meta = rundir.load_checkpoint(tmp_path)
    assert meta["iteration"] == 1 and not arrays["params"].any()
    assert "checkpoint.npz: unreadable" in caplog.text


def test_a_checkpoint_whose_bytes_changed_is_not_trusted(tmp_path):
    rundir.save_checkpoint(tmp_path, {"params": np.arange(4.0)}, {"iteration": 1})
    rundir.save_checkpoint(tmp_path, {"params": np.arange(4.0) + 1}, {"iteration": 2})
    with np.load(tmp_path / rundir.CHECKPOINT) as data:
        payload = {k: data[k] for k in data.files}
    payload["params"] = payload["params"] * 2  # the digest in meta no longer matches
    np.savez(tmp_path / rundir.CHECKPOINT, **payload)
    assert rundir.load_checkpoint(tmp_path)[1]["iteration"] == 1


def test_a_non_finite_checkpoint_is_never_offered_as_last_good(tmp_path):
    rundir.save_checkpoint(tmp_path, {"params": np.array([np.nan, 1.0])}, {"iteration": 1})
    with pytest.raises(ValidationError, match="no valid checkpoint.*non-finite values in params"):
        rundir.load_checkpoint(tmp_path)


def test_a_checkpoint_carries_the_runs_config(tmp_path):
    rundir.write_config(tmp_path, {"model": "logistic", "lr": 0.5})
    rundir.save_checkpoint(tmp_path, {"params": np.zeros(1)}, {"iteration": 1})
    assert tomllib.loads(rundir.load_checkpoint(tmp_path)[1]["config"])["lr"] == 0.5
