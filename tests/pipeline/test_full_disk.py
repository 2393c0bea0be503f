"""A disk that refuses writes mid-run: one line, exit 3, and the earlier results stay whole.

The refusal is the operating system's own: the run's process (and the workers it starts) get
``RLIMIT_FSIZE``, so a write past the limit fails with ``EFBIG`` exactly where a full disk fails
with ``ENOSPC``, without needing a small filesystem (mounting one needs root).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest

SOURCE = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed=4"
LIMIT = 6000  # bytes: metrics.jsonl outgrows it after a few iterations


def _refuse_writes_past_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.slow
@pytest.mark.chaos  # a CLI process per run: 20-30 s each on a shared 2-core machine
@pytest.mark.parametrize("command", ["train", "federate"])
def test_a_write_refused_mid_run_is_one_line_and_keeps_the_earlier_run(command, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    ingest(SOURCE, store, chunk_rows=100, progress=False)
    length = (["--iterations", "60"] if command == "train"
              else ["--clients", "3", "--rounds", "60"])
    argv = [command, store, "--model", "softmax", *length, "--out", str(tmp_path / "run"),
            "--workers", "1", "--checkpoint-every", "2", "-q"]
    assert main(argv) == 0
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {"params.npz", "metrics.jsonl", "summary.json"} <= set(earlier)

    refused = subprocess.run([sys.executable, "-B", "-m", "fedpipe.cli.main", *argv,
                              "--overwrite"], capture_output=True, text=True, timeout=300,
                             preexec_fn=_refuse_writes_past_limit,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 3, refused.stderr
    assert len(lines) == 1 and "File too large" in lines[0], refused.stderr  # no traceback
    # The replacement failed before it was published: every earlier file is as it was.
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()
            if p.is_file()} == earlier
    assert json.loads(earlier["summary.json"])  # and still a whole run
