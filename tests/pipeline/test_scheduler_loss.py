"""The scheduler process is SIGKILLed mid-run: one line, exit 3, the checkpoint kept, and
``--resume`` against a new scheduler ends bit-identical to an uninterrupted run.

Real processes: ``dask scheduler`` and ``dask worker`` subprocesses, the interrupted driver a
``fedpipe`` subprocess; the scheduler is killed by its PID once the run has checkpointed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from procs import ENV, cluster

SOURCE = "synthetic:classification?n_samples=1200&n_features=6&n_classes=3&seed=5"


def _fedpipe(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedpipe.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})


def _kill_scheduler_after(run: subprocess.Popen, scheduler: subprocess.Popen, metrics: Path,
                          records: int) -> tuple[int, str, str]:
    """SIGKILL ``scheduler`` once ``metrics`` holds ``records`` lines; the driver's outcome."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
            os.kill(scheduler.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    out, err = run.communicate(timeout=120)
    return run.returncode, out, err


def _params(run_dir: Path) -> dict[str, bytes]:
    with np.load(run_dir / "params.npz") as data:
        return {k: data[k].tobytes() for k in data.files}


@pytest.mark.slow
@pytest.mark.chaos  # four clusters of processes: 75-100 s each on a shared 2-core machine
@pytest.mark.parametrize("command", ["train", "federate"])
def test_scheduler_killed_mid_run_exits_3_and_resumes_bit_identical(command, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    ingest(SOURCE, store, chunk_rows=100, progress=False)
    if command == "train":
        length = ["--model", "softmax", "--iterations", "60", "--checkpoint-every", "2"]
        unit = "iteration"
    else:
        length = ["--model", "softmax", "--clients", "4", "--rounds", "30",
                  "--checkpoint-every", "2"]
        unit = "round"
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with cluster(tmp_path / "first") as first:
        run = _fedpipe(command, store, *length, "--scheduler", first.address,
                       "--out", str(killed), "-q")
        code, _, err = _kill_scheduler_after(run, first.scheduler, killed / "metrics.jsonl", 5)
    lines = err.strip().splitlines()
    assert code == 3, err
    assert len(lines) == 1, err  # no traceback, no Dask logs
    assert f"fedpipe {command}: error: lost the Dask scheduler" in lines[0]
    assert "--resume" in lines[0] and f"checkpoint at {unit}" in lines[0]
    assert (killed / "checkpoint.npz").exists() and not (killed / "params.npz").exists()

    with cluster(tmp_path / "second") as second:
        assert main([command, store, *length, "--scheduler", second.address,
                     "--out", str(killed), "--resume", "-q"]) == 0, capsys.readouterr().err
        assert main([command, store, *length, "--scheduler", second.address,
                     "--out", str(whole), "-q"]) == 0, capsys.readouterr().err
    assert _params(killed) == _params(whole)


def test_lost_scheduler_line_names_the_checkpoint_to_resume_from(dask_client, tmp_path,
                                                                 small_store):
    """The message path without the minutes of real processes: a real checkpointed run, then
    the error the driver raises when its scheduler is gone."""
    from fedpipe.cli import main as cli_main
    from fedpipe.cluster import SchedulerLostError
    from fedpipe.engine.train import fit
    from fedpipe.tasks import models, optimizers

    store = small_store()
    out = tmp_path / "run"
    fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=4, checkpoint_every=2,
        dask_client=dask_client, out=out)
    args = cli_main.build_parser().parse_known_args(
        ["train", store, "--model", "softmax", "--out", str(out)])[0]
    exc = SchedulerLostError("tcp://127.0.0.1:1")
    status, message = cli_main._classify(exc)
    line = message + cli_main._resume_hint(args, exc)
    assert status == 3
    assert line == ("lost the Dask scheduler tcp://127.0.0.1:1 mid-run; "
                    f"{out} keeps its checkpoint at iteration 4: start a scheduler and workers "
                    "and rerun the command with --resume (and --scheduler ADDRESS)")
