"""The read side: Dask arrays, checked chunks, corruption and missing chunks, the split."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest
from fedpipe.data.ingest import ingest
from fedpipe.data.store import (
    ChunkRef,
    chunk_key,
    chunk_refs,
    client_range,
    open_store,
    read_chunk,
    read_info,
    verify_store,
)
from fedpipe.errors import StoreError
from fedpipe.tasks import split


def _chunk_file(store: str, prefix: str, name: str, index: int) -> str:
    return os.path.join(store, chunk_key(prefix, name, index))


def test_open_store_gives_dask_arrays_with_store_chunking(small_store):
    store = small_store(chunk_rows=128)
    ds = open_store(store)
    assert isinstance(ds.X, da.Array) and isinstance(ds.y, da.Array)
    assert ds.X.shape == (600, 5) and ds.y.shape == (600,)
    assert ds.X.chunks[0] == (128, 128, 128, 128, 88)
    assert ds.info.n_chunks == 5 and ds.info.task == "multiclass"
    assert ds.info.classes == [0, 1, 2]
    assert set(np.unique(ds.y.compute())) == {0, 1, 2}


def test_read_chunk_matches_dask_rows(small_store):
    store = small_store()
    info = read_info(store)
    ds = open_store(store)
    for ref in chunk_refs(info):
        X, y = read_chunk(store, ref)
        rows = slice(ref.index * 100, (ref.index + 1) * 100)
        np.testing.assert_array_equal(X, ds.X[rows].compute())
        np.testing.assert_array_equal(y, ds.y[rows].compute())
        assert X.dtype == np.float64


def test_train_and_test_split_partition_each_chunk_deterministically(small_store):
    store = small_store()
    ref = ChunkRef("", 2)
    X_all, y_all = read_chunk(store, ref)
    X_tr, y_tr = read_chunk(store, ref, split="train", test_fraction=0.3, seed=7)
    X_te, y_te = read_chunk(store, ref, split="test", test_fraction=0.3, seed=7)
    assert len(y_tr) + len(y_te) == len(y_all)
    mask = split.test_mask(len(y_all), 2, 0.3, 7)
    np.testing.assert_array_equal(X_te, X_all[mask])
    np.testing.assert_array_equal(y_tr, y_all[~mask])
    again = read_chunk(store, ref, split="test", test_fraction=0.3, seed=7)
    np.testing.assert_array_equal(again[0], X_te)
    other = read_chunk(store, ref, split="test", test_fraction=0.3, seed=8)
    assert not np.array_equal(other[1], y_te) or len(other[1]) != len(y_te)


def test_flipped_byte_is_reported_and_raises(small_store):
    store = small_store()
    path = _chunk_file(store, "", "X", 3)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(StoreError, match="chunk 3 of X .* corrupt"):
        read_chunk(store, ChunkRef("", 3))
    report = verify_store(store)
    assert report.corrupt == [ChunkRef("", 3)] and report.missing == []
    assert not report.ok
    read_chunk(store, ChunkRef("", 2))  # the others still read


@pytest.mark.parametrize("partitioned", [False, True])
def test_a_chunk_replaced_by_another_valid_chunk_is_caught_on_read(small_store, partitioned):
    store = small_store()
    prefix, ref = "", ChunkRef("", 2)
    if partitioned:  # a partition's sorted copy: read through the client holding its row 200
        from fedpipe.data.partition import partition

        partition(store, clients=3, name="p")
        info = read_info(store)
        prefix = info.partitions["p"]["path"]
        for c in range(3):
            _, lo, hi = client_range(info, f"partitions/p/{c}")
            if lo <= 200 < hi:
                ref = ChunkRef(f"partitions/p/{c}", (200 - lo) // 100)
    # both files are valid (their crc32c passes): only the per-chunk digest can tell
    open(_chunk_file(store, prefix, "X", 2), "wb").write(
        open(_chunk_file(store, prefix, "X", 4), "rb").read())
    with pytest.raises(StoreError, match="chunk 2 of .*X in .* is not the chunk written there"):
        read_chunk(store, ref)
    assert verify_store(store).corrupt == [ChunkRef(prefix, 2)]


def test_deleted_chunk_is_an_error_not_zeros(small_store):
    store = small_store()
    os.remove(_chunk_file(store, "", "y", 4))
    with pytest.raises(StoreError, match="chunk 4 of y is missing"):
        read_chunk(store, ChunkRef("", 4))
    report = verify_store(store)
    assert report.missing == [ChunkRef("", 4)] and report.corrupt == []


def test_verify_clean_store_checks_content_hash(small_store):
    report = verify_store(small_store())
    assert report.ok and report.n_checked == 6 and report.content_hash_ok


def test_memory_store_round_trip():
    url = "memory://fedpipe-tests/iris.zarr"
    info = ingest("sklearn:iris", url, chunk_rows=50, progress=False, overwrite=True)
    assert info.n_rows == 150 and info.n_chunks == 3
    X, y = read_chunk(url, ChunkRef("", 1))
    assert X.shape == (50, 4) and set(y) == {1}
    assert verify_store(url).ok
    assert open_store(url).X.sum().compute() == pytest.approx(sum(info.stats["sum"]))


def test_missing_store_and_unknown_partition_raise_store_error(tmp_path, small_store):
    with pytest.raises(StoreError, match="no zarr v3 store"):
        read_info(str(tmp_path / "nope.zarr"))
    info = read_info(small_store())
    with pytest.raises(StoreError, match="no partition 'p'"):
        chunk_refs(info, partition="p")


def test_standardize_and_impute_are_applied_when_reading(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(5.0, 3.0, size=(300, 4))
    X[[3, 50, 299], [0, 2, 3]] = np.nan
    y = rng.integers(0, 2, size=300)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    store = str(tmp_path / "d.zarr")
    ingest(str(tmp_path / "d.npz"), store, chunk_rows=64, impute="mean", standardize=True,
           progress=False)
    info = read_info(store)
    full = np.concatenate([read_chunk(store, r, info=info)[0] for r in chunk_refs(info)])
    assert not np.isnan(full).any()
    mean = np.nanmean(X, axis=0)
    std = np.nanstd(X, axis=0)
    expected = (np.where(np.isnan(X), mean, X) - mean) / std
    np.testing.assert_allclose(full, expected, rtol=1e-10, atol=1e-12)


def test_a_store_ingested_again_in_other_chunks_reads_right(tmp_path):
    # Same URL, same data, other chunk rows: the same content hash, so the process's opened
    # group is reused; the arrays it opened before must not be (they had the old chunk shape).
    path = str(tmp_path / "wine.zarr")
    for rows in (32, 64):
        info = ingest("sklearn:wine", path, chunk_rows=rows, overwrite=True, progress=False)
        X, y = read_chunk(path, chunk_refs(info)[0], split="all", info=info)
        assert X.shape == (rows, 13) and len(y) == rows
