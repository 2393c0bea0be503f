"""Mini-batch planning counts each chunk's training rows from metadata, without reading X."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from distributed import get_task_stream
from fedpipe.data.partition import partition
from fedpipe.data.store import chunk_refs, read_chunk, read_info, split_row_counts
from fedpipe.engine.minibatch import epoch_batches, train_row_counts
from fedpipe.engine.train import fit
from fedpipe.engine.train_data import load_data
from fedpipe.tasks import models, optimizers

# 650 rows in chunks of 100: the last chunk is short, as are the clients' last chunks.
SOURCE = "synthetic:classification?n_samples=650&n_features=5&n_classes=3&seed=0"


@pytest.fixture
def store(small_store) -> str:
    url = small_store(source=SOURCE, chunk_rows=100)
    partition(url, clients=3, scheme="quantity", alpha=1.0, seed=2, name="q")
    return url


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 7])
def test_split_counts_equal_the_rows_read(store, fraction, seed):
    info = read_info(store)
    refs = chunk_refs(info) + chunk_refs(info, "q")
    assert any(r.prefix for r in refs)
    for ref in refs:
        sides = [len(read_chunk(store, ref, split=s, test_fraction=fraction, seed=seed)[1])
                 for s in ("train", "test")]
        assert split_row_counts(info, ref, test_fraction=fraction, seed=seed) == tuple(sides)


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_train_row_counts_equal_the_rows_read(dask_client, store, fraction):
    info = read_info(store)
    data = load_data(dask_client, store, info, "stream", fraction, seed=4)
    counts = train_row_counts(SimpleNamespace(dask_client=dask_client, data=data))
    assert counts == [len(read_chunk(store, r, split="train", test_fraction=fraction,
                                     seed=4)[1]) for r in chunk_refs(info)]


def test_streaming_minibatch_reads_only_for_passes_and_batches(dask_client, store):
    info, blocks = read_info(store), 2
    counts = [len(read_chunk(store, r, split="train", test_fraction=0.2, seed=1)[1])
              for r in chunk_refs(info)]
    pieces = sum(len(b) for b in epoch_batches(counts, 80, seed=1, epoch=1))
    with get_task_stream(dask_client) as stream:
        fit(store, models.softmax(5, 3), optimizers.sgd(0.1), epochs=1, batch_size=80,
            cache="stream", chunks_per_task=-(-info.n_chunks // blocks), seed=1,
            dask_client=dask_client)
    groups = [(k[0] if isinstance(k, tuple) else k).split("-")[0]
              for k in (t["key"] for t in stream.data)]
    # "model": the model reaches workers as a task that can be recomputed (reads no data)
    assert set(groups) <= {"grad", "sum", "eval", "model"}
    # Every task that reads: two full passes (epoch 0 and 1: train and test blocks), then one
    # grad task per batch piece; nothing reads the data just to count its rows.
    assert groups.count("grad") + groups.count("eval") == 2 * 2 * blocks + pieces
