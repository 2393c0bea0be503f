"""``--resume`` continues the run in ``--out``: changed options that change the result are refused.

Refused in one line naming the option, exit 2, before anything is written (``config.toml`` and
the checkpoint stay as they were). Options that do not change the result (cluster, checkpoint
cadence) and a longer run (more iterations/epochs/rounds) are allowed; options not given are
the run's own.
"""

from __future__ import annotations

import json
import tomllib

import pytest
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.errors import ValidationError
from fedpipe.tasks import aggregate, models
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=400&n_features=5&n_classes=3&seed=1"


@pytest.fixture
def train_run(small_store, tmp_path, dask_client):
    """A finished 2-iteration adam run with a checkpoint, and the argv that made it."""
    argv = ["train", small_store(), "--model", "softmax", "--optimizer", "adam", "--lr", "0.05",
            "--iterations", "2", "--checkpoint-every", "1", "--out", str(tmp_path / "run"),
            "--scheduler", dask_client.scheduler.address, "-q"]
    assert main(argv) == 0
    return tmp_path / "run", argv


def _files(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2:]]


@pytest.mark.parametrize(("flag", "value"), [
    ("--lr", "0.5"), ("--optimizer", "sgd"), ("--seed", "3"), ("--l2", "0.1"),
    ("--test-fraction", "0.5"), ("--iterations", "1"), ("--epochs", "2"), ("--lr-schedule", "step"),
])
def test_train_resume_with_a_changed_option_is_refused_before_writing(train_run, capsys, flag,
                                                                      value):
    run_dir, argv = train_run
    before = _files(run_dir)
    argv = _replace(argv, flag, value) if flag in argv else [*argv, flag, value]
    if flag == "--epochs":
        argv = [a for i, a in enumerate(argv) if "--iterations" not in argv[max(i - 1, 0):i + 1]]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedpipe train: error: --resume: {flag} "), err
    assert _files(run_dir) == before  # config.toml, checkpoint, metrics untouched


def test_train_resume_may_extend_and_move_and_takes_the_rest_from_the_run(train_run, capsys,
                                                                         dask_client):
    run_dir, _ = train_run
    # Only --out, --resume, a longer run, another checkpoint cadence and the cluster are given.
    assert main(["train", "--out", str(run_dir), "--resume", "--iterations", "4",
                 "--checkpoint-every", "2", "--scheduler", dask_client.scheduler.address,
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 4
    saved = tomllib.loads((run_dir / rundir.CONFIG).read_text())
    assert (saved["optimizer"], saved["lr"], saved["iterations"]) == ("adam", 0.05, 4)


def test_a_cosine_run_cannot_be_extended_without_total(small_store, tmp_path, capsys,
                                                       dask_client):
    argv = ["train", small_store(), "--model", "softmax", "--lr-schedule", "cosine",
            "--iterations", "2", "--out", str(tmp_path / "run"), "--scheduler",
            dask_client.scheduler.address, "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*_replace(argv, "--iterations", "3"), "--resume"]) == 2
    assert "cosine:total=N" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    """A 1-round FedAdam CLI run with a checkpoint."""
    root = tmp_path_factory.mktemp("fed-resume")
    path = partitioned_store(str(root / "s.zarr"), source=SOURCE, clients=3, chunk_rows=100,
                             name="p")
    argv = ["federate", path, "--model", "softmax", "--rounds", "1", "--workers", "1",
            "--partition", "p", "--strategy", "fedadam", "--batch-size", "16",
            "--out", str(root / "run"), "-q"]
    assert main(argv) == 0
    return root / "run", argv, path


@pytest.mark.parametrize(("flag", "value"), [
    ("--strategy", "fedavgm"), ("--lr", "0.3"), ("--batch-size", "8"), ("--fraction", "0.5"),
    ("--server-lr", "0.5"), ("--partition", "other"), ("--local-epochs", "2"),
])
def test_federate_resume_with_a_changed_option_is_refused_before_writing(fed_run, capsys, flag,
                                                                         value):
    run_dir, argv, _ = fed_run
    before = _files(run_dir)
    argv = _replace(argv, flag, value) if flag in argv else [*argv, flag, value]
    capsys.readouterr()
    assert main([*_replace(argv, "--rounds", "2"), "--resume"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedpipe federate: error: --resume: {flag} "), err
    assert "Traceback" not in captured.err
    assert _files(run_dir) == before


def test_federate_engine_refuses_another_strategys_checkpoint(fed_run):
    """From Python (no config.toml check): one error, not ``KeyError: 'velocity'``."""
    run_dir, _, path = fed_run
    with placement.simulation_cluster([["0", "1", "2"]], processes=False,
                                      dashboard_address=":0") as dc:
        with pytest.raises(ValidationError, match="resume with the run's --strategy"):
            federate(path, models.softmax(5, 3), rounds=2, strategy=aggregate.fedavgm(),
                     partition="p", batch_size=16, dask_client=dc, out=str(run_dir), resume=True)
