"""Dataset snapshots and store leases: a run records the data it trains on, refuses to resume on
other data, fails in one line when its store is rewritten under it, and the commands that rewrite
a store refuse while a run reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.data import lease, snapshot
from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition
from fedpipe.engine.federate import federate
from fedpipe.engine.train import fit
from fedpipe.errors import ValidationError
from fedpipe.tasks import models, optimizers

SOURCE = "synthetic:classification?n_samples=600&n_features=5&n_classes=3&seed={seed}"


def _reingest(store: str, seed: int) -> None:
    ingest(SOURCE.format(seed=seed), store, chunk_rows=100, progress=False, overwrite=True)


def _fit(store, dask_client, **kwargs):
    return fit(store, models.softmax(5, 3), optimizers.sgd(0.1), dask_client=dask_client,
               **{"iterations": 3, **kwargs})


def test_a_run_records_its_data_in_config_checkpoint_and_summary(dask_client, small_store,
                                                                   tmp_path):
    store = small_store()
    result = _fit(store, dask_client, out=tmp_path / "run", checkpoint_every=1)
    expected = snapshot.digest(store)
    config = tomllib.loads((tmp_path / "run" / rundir.CONFIG).read_text())
    checkpoint_config = tomllib.loads(rundir.load_checkpoint(tmp_path / "run")[1]["config"])
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    assert config[snapshot.KEY] == checkpoint_config[snapshot.KEY] == expected
    assert summary[snapshot.KEY] == result.summary[snapshot.KEY] == expected
    assert not lease.holders(store)  # released at the end
    _reingest(store, seed=1)
    assert snapshot.digest(store) != expected


def test_resume_on_a_reingested_store_is_refused_before_writing(dask_client, small_store,
                                                                 tmp_path):
    store = small_store()
    run = tmp_path / "run"
    _fit(store, dask_client, out=run, checkpoint_every=1)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _reingest(store, seed=1)
    with pytest.raises(ValidationError, match="is not the data run .* trained on"):
        _fit(store, dask_client, iterations=6, out=run, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_store_rewritten_during_the_run_fails_it_and_ingest_respects_the_lease(
        dask_client, small_store, tmp_path):
    store = small_store()
    seen = []

    def rewrite(record):
        if record["iteration"] != 1:
            return
        with pytest.raises(ValidationError, match="in use by process"):
            _reingest(store, seed=1)  # refused while the run holds its lease
        seen.append(lease.holders(store))
        for path, _ in seen[-1]:
            os.remove(path)  # a writer that ignores leases (another host, a script)
        _reingest(store, seed=1)

    with pytest.raises(ValidationError, match="changed during the run .* not written"):
        _fit(store, dask_client, out=tmp_path / "run", on_record=rewrite)
    assert len(seen[0]) == 1 and seen[0][0][1]["pid"] == os.getpid()
    assert not (tmp_path / "run" / rundir.PARAMS).exists()


def test_partition_respects_leases_on_its_own_name_only(small_store):
    store = small_store()
    partition(store, clients=3, name="fed")
    with lease.held(store, partition="fed", run="r"):
        with pytest.raises(ValidationError, match="partition 'fed' of store .* in use"):
            partition(store, clients=4, name="fed")
        partition(store, clients=4, name="other")  # nothing a run reads changes
    partition(store, clients=4, name="fed")


def test_a_killed_runs_lease_is_stale(small_store):
    store = small_store()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = Path(store) / lease.LEASES
    folder.mkdir()
    record = {"pid": dead.pid, "host": os.uname().nodename, "partition": None}
    (folder / "x.json").write_text(json.dumps(record))
    assert lease.holders(store) == [] and not (folder / "x.json").exists()
    _reingest(store, seed=1)


def test_cli_ingest_overwrite_while_a_run_reads_is_one_line_exit_2(small_store, capsys):
    store = small_store()
    with lease.held(store, run="somewhere"):
        assert main(["ingest", SOURCE.format(seed=1), store, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use by process" in err and "Traceback" not in err


def test_federate_records_its_partition_and_refuses_another_on_resume(dask_client, small_store,
                                                                      tmp_path):
    store = small_store()
    partition(store, clients=3, name="fed")
    kwargs = {"model": models.softmax(5, 3), "partition": "fed", "local_epochs": 1,
              "dask_client": dask_client, "out": tmp_path / "run", "lr": 0.1}
    run = federate(store, rounds=1, **kwargs)
    assert run.summary[snapshot.KEY] == snapshot.digest(store, "fed") != snapshot.digest(store)
    partition(store, clients=3, name="fed", seed=1)
    with pytest.raises(ValidationError, match="is not the data run"):
        federate(store, rounds=2, resume=True, **kwargs)


def test_info_verify_flags_a_store_without_checksums(small_store, monkeypatch, capsys):
    from fedpipe.data import store as store_mod
    from zarr.codecs import BloscCodec

    monkeypatch.setattr(store_mod, "codecs", lambda: [BloscCodec(cname="lz4")])  # an old writer
    store = small_store()
    partition(store, clients=2, name="fed")
    monkeypatch.undo()
    assert main(["info", store, "--verify", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no crc32c checksum on X, y, partitions/fed/" in err
    healthy = small_store()
    assert main(["info", healthy, "--verify", "-q"]) == 0
