"""A task that kills its worker process every time stops the run naming its chunk or client.

Real worker processes (nannies) die by ``os._exit`` inside a test-only model whenever a marked
row reaches it; Dask retries the task on the restarted workers until
``distributed.scheduler.allowed-failures``, and fedpipe turns the ``KilledWorker`` into one line.
"""

from __future__ import annotations

import os
import re
import sys

import cloudpickle
import dask
import numpy as np
import pytest
from fedpipe.data.partition import partition
from fedpipe.data.store import ChunkRef, read_chunk
from fedpipe.engine.federate import federate
from fedpipe.engine.train import fit
from fedpipe.poison import PoisonTaskError
from fedpipe.tasks import models, optimizers

# A task here ends its worker's process (os._exit): never the test's own process.
pytestmark = pytest.mark.worker_processes

# Workers unpickle this module's functions by value: they need not import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _killing(model: models.Model, marker: float) -> models.Model:
    """``model`` whose gradient ends the worker process that sees the row marked ``marker``."""
    inner = model.loss_and_grad

    def loss_and_grad(p, X, y):
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:  # on the driver (model checks): never exit the test
            return inner(p, X, y)
        if np.any(X[:, 0] == marker):
            os._exit(1)
        return inner(p, X, y)

    # no spec: a built-in GLM with a spec runs its fused kernel, not loss_and_grad
    return model._replace(loss_and_grad=loss_and_grad, spec=None)


@pytest.fixture
def one_failure():
    # one retry instead of Dask's three: two worker deaths, not four, keep the test short
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        yield


@pytest.mark.chaos  # two worker deaths and a nanny restart: ~9 s; make test keeps the federated case
def test_train_stops_naming_the_chunk_that_kills_its_workers(small_store, one_failure):
    store = small_store()
    marker = read_chunk(store, ChunkRef("", 4))[0][0, 0]
    with pytest.raises(PoisonTaskError) as caught:
        fit(store, _killing(models.softmax(5, 3), marker), optimizers.sgd(0.1), iterations=3,
            test_fraction=0.0, chunks_per_task=1, workers=1, threads=1)
    message = str(caught.value)
    assert "\n" not in message
    # Dask fails every task the dying worker held with the culprit: chunk 4 is named, maybe
    # beside chunks that were queued with it.
    assert re.search(rf"chunks? (\d+, )*4(, \d+)* of arrays X and y of store {re.escape(str(store))}:",
                     message), message
    assert "killed 2 worker process(es)" in message


def test_federate_stops_naming_the_client_that_kills_its_workers(small_store, one_failure):
    store = small_store()
    partition(store, clients=2, name="fed")
    marker = read_chunk(store, ChunkRef("partitions/fed/1", 0))[0][0, 0]
    with pytest.raises(PoisonTaskError) as caught:
        federate(store, _killing(models.softmax(5, 3), marker), rounds=2, partition="fed",
                 workers=2, lr=0.1, test_fraction=0.0)
    message = str(caught.value)
    assert re.fullmatch(r"client 1: its task killed 2 worker process\(es\) .*", message), message
