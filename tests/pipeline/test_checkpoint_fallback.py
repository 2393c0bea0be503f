"""A damaged newest checkpoint (truncated on disk, as a full disk or a kill mid-copy leaves it)
is skipped with one warning line: the run resumes from the generation before it and still ends
bit-identical to an uninterrupted run."""

from __future__ import annotations

import logging

from fedpipe import rundir
from fedpipe.engine.train import fit
from fedpipe.tasks import models, optimizers


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(
        dask_client, small_store, tmp_path, caplog):
    store, run = small_store(), tmp_path / "run"
    model, optimizer = models.softmax(5, 3), optimizers.adam(0.05)
    whole = fit(store, model, optimizer, iterations=6, dask_client=dask_client)
    fit(store, model, optimizer, iterations=4, dask_client=dask_client, out=run,
        checkpoint_every=2)
    newest = run / rundir.CHECKPOINT
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="fedpipe"):
        resumed = fit(store, model, optimizer, iterations=6, dask_client=dask_client, out=run,
                      checkpoint_every=2, resume=True)
    assert resumed.params.tobytes() == whole.params.tobytes()
    [warning] = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
    assert "\n" not in warning and "checkpoint.npz: unreadable" in warning
    assert [r["iteration"] for r in rundir.read_metrics(run)] == list(range(7))
