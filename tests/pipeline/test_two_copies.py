"""A worker SIGKILLed mid-fit costs no re-read: its loaded blocks have a second copy (issue 17).

A real process cluster from ``fedpipe.cluster.connect`` (nanny workers), whose Active Memory
Manager runs ``fedpipe.resilience.KeepLoadedTwice``: every loaded block sits on both workers,
so after a kill the survivor computes from its own copy (no ``load-…`` task runs again) and
the restarted worker gets its copies back.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from distributed import get_task_stream
from fedpipe import cluster
from fedpipe.data.ingest import ingest
from fedpipe.engine.train import fit
from fedpipe.tasks import models, optimizers

pytestmark = pytest.mark.worker_processes


def _copies(dask_scheduler) -> list[int]:
    return sorted(len(ts.who_has or ()) for ts in dask_scheduler.tasks.values()
                  if isinstance(ts.key, tuple) and str(ts.key[0]).startswith("load-"))


def _wait_for(dc, want, timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    while (copies := dc.run_on_scheduler(_copies)) and not want(copies):
        if time.monotonic() > end:
            break
        time.sleep(0.05)
    return copies


def test_a_killed_worker_costs_no_reread_and_its_copies_come_back(tmp_path):
    store = str(tmp_path / "s.zarr")
    ingest("synthetic:classification?n_samples=4000&n_features=10&n_classes=2&seed=0", store,
           chunk_rows=500, progress=False)
    model, optimizer = models.logistic(10), optimizers.adam(0.05)
    seen: dict = {}
    with cluster.connect(workers=2, threads=1) as dc:
        clean = fit(store, model, optimizer, iterations=40, dask_client=dc)

        def kill_at_10(record: dict) -> None:
            if record["iteration"] == 10:
                seen["before"] = _wait_for(dc, lambda c: min(c) == 2)
                address, pid = sorted(dc.run(os.getpid).items())[0]
                seen["killed"] = time.time()
                os.kill(pid, signal.SIGKILL)
            if record["iteration"] == 39:
                dc.wait_for_workers(2, timeout=60)
                seen["after"] = _wait_for(dc, lambda c: min(c) == 2)

        with get_task_stream(dc) as stream:
            faulty = fit(store, model, optimizer, iterations=40, dask_client=dc,
                         on_record=kill_at_10)
    np.testing.assert_array_equal(faulty.params, clean.params)
    assert seen["before"] and min(seen["before"]) == 2  # every block on both workers
    reloads = [t for t in stream.data if str(t["key"][0] if isinstance(t["key"], tuple)
                                               else t["key"]).startswith("load-")
               and t["startstops"][0]["start"] > seen["killed"]]
    assert reloads == []  # the survivor read nothing again
    assert min(seen["after"]) == 2  # the restarted worker has its copies again
