"""The driver (``fedpipe train``) SIGKILLed at five points in a row, each time resumed with
``--resume``: the run ends bit-identical to an uninterrupted one.

The kills land right after a record is appended to ``metrics.jsonl``, so some fall between a
record and its checkpoint, others during the next pass. The cluster is a separate set of
processes (a killed driver's own LocalCluster would outlive it).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from procs import cluster
from test_scheduler_loss import SOURCE, _fedpipe, _params

KILL_AT_RECORDS = (3, 6, 8, 11, 14)


@pytest.mark.slow
@pytest.mark.chaos  # six driver processes: about a minute on a shared 2-core machine
def test_driver_killed_at_five_points_resumes_bit_identical(tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    ingest(SOURCE, store, chunk_rows=100, progress=False)
    args = ["train", store, "--model", "softmax", "--optimizer", "adam", "--lr", "0.05",
            "--iterations", "40", "--checkpoint-every", "2"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    metrics = killed / "metrics.jsonl"
    with cluster(tmp_path / "c") as running:
        where = ["--scheduler", running.address, "-q"]
        for n, records in enumerate(KILL_AT_RECORDS):
            run = _fedpipe(*args, *where, "--out", str(killed), *(["--resume"] if n else []))
            deadline = time.monotonic() + 120
            while run.poll() is None and time.monotonic() < deadline:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
                    os.kill(run.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            run.wait(timeout=60)
            assert run.returncode == -signal.SIGKILL, f"run {n} ended before its kill"
        assert main([*args, *where, "--out", str(killed), "--resume"]) == 0, capsys.readouterr()
        assert main([*args, *where, "--out", str(whole)]) == 0, capsys.readouterr()
    assert _params(killed) == _params(whole)
    with np.load(killed / "checkpoint.npz") as ckpt:
        assert "params" in ckpt.files


@pytest.mark.slow
@pytest.mark.chaos  # three driver processes on a cluster of processes
def test_async_federated_driver_killed_resumes_bit_identical(tmp_path, capsys):
    """FedBuff on the virtual clock: a SIGKILLed driver resumes from its checkpoint (buffer,
    versions and in-flight work recorded) and ends bit-identical to an uninterrupted run."""
    store = str(tmp_path / "s.zarr")
    ingest(SOURCE, store, chunk_rows=100, progress=False)
    args = ["federate", store, "--model", "softmax", "--clients", "4", "--rounds", "12",
            "--mode", "async", "--buffer-size", "2", "--max-concurrency", "3",
            "--client-speeds", "two-tier:0.5,5", "--checkpoint-every", "2"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    metrics = killed / "metrics.jsonl"
    with cluster(tmp_path / "c") as running:
        where = ["--scheduler", running.address, "-q"]
        run = _fedpipe(*args, *where, "--out", str(killed))
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                os.kill(run.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        run.wait(timeout=60)
        assert run.returncode == -signal.SIGKILL, "the run ended before its kill"
        before = metrics.read_text().splitlines()[:4]  # versions 1-4: the last checkpoint's
        assert main([*args, *where, "--out", str(killed), "--resume"]) == 0, capsys.readouterr()
        assert main([*args, *where, "--out", str(whole)]) == 0, capsys.readouterr()
    after = metrics.read_text().splitlines()
    # Kept, not written again (their wall-clock seconds would differ): the run went on from
    # its checkpoint rather than starting over.
    assert after[:4] == before
    assert [json.loads(line)["version"] for line in after] == list(range(1, 13))
    assert _params(killed) == _params(whole)
