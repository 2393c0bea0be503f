"""Partitioning a real store: per-client arrays hold exactly the assigned rows, in whole chunks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from fedpipe.data.partition import partition
from fedpipe.data.store import (
    ChunkRef,
    chunk_key,
    chunk_refs,
    open_store,
    read_chunk,
    read_info,
    verify_store,
)
from fedpipe.errors import StoreError, ValidationError
from fedpipe.tasks import partition as part_math


def _client_rows(store: str, name: str, k: int):
    ds = open_store(store, partition=name, client=k)
    return ds.X.compute(), ds.y.compute()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_row_lands_in_exactly_one_client(small_store, scheme):
    store = small_store(chunk_rows=50)
    meta = partition(store, clients=4, scheme=scheme, seed=3, name=scheme)
    ds = open_store(store)
    X, y = ds.X.compute(), ds.y.compute()
    parts = [_client_rows(store, scheme, k) for k in range(4)]
    sizes = [len(p[1]) for p in parts]
    assert sum(sizes) == len(y) == 600
    assert sizes == [meta["clients"][str(k)]["n_rows"] for k in range(4)]
    # Rows are copied unchanged: the union of the clients' rows is the store's rows.
    stacked = np.concatenate([p[0] for p in parts])
    order = np.lexsort(stacked.T)
    np.testing.assert_array_equal(stacked[order], X[np.lexsort(X.T)])
    for k, (_, yk) in enumerate(parts):
        assert np.bincount(yk, minlength=3).tolist() == meta["clients"][str(k)]["label_hist"]
    info = read_info(store)
    for k in range(4):  # whole chunks of the client's own, readable one by one
        refs = chunk_refs(info, scheme, k)
        assert len(refs) == -(-sizes[k] // 50) == meta["clients"][str(k)]["n_chunks"]
        assert sum(len(read_chunk(store, r, info=info)[1]) for r in refs) == sizes[k]
    assert verify_store(store).ok


def test_assignment_is_stored_and_deterministic(small_store):
    store = small_store()
    partition(store, clients=3, scheme="dirichlet", alpha=0.2, seed=9, name="a")
    partition(store, clients=3, scheme="dirichlet", alpha=0.2, seed=9, name="b")
    import zarr

    group, parts = zarr.open_group(store, mode="r"), read_info(store).partitions
    a = group[parts["a"]["path"] + "/assignment"][:]
    np.testing.assert_array_equal(a, group[parts["b"]["path"] + "/assignment"][:])
    for k in range(3):
        np.testing.assert_array_equal(_client_rows(store, "a", k)[0], open_store(store).X.compute()[a == k])


def test_a_given_assignment_is_the_partition(small_store):
    store = small_store()
    given = np.arange(600) % 4 // 2 + 2 * (np.arange(600) >= 500)  # clients 0..3, uneven
    meta = partition(store, clients=4, assignment=given, name="g")
    assert meta["scheme"] == "given"
    X = open_store(store).X.compute()
    for k in range(4):
        assert meta["clients"][str(k)]["n_rows"] == int((given == k).sum())
        np.testing.assert_array_equal(_client_rows(store, "g", k)[0], X[given == k])
    for bad, message in ((given[:-1], "one per row"), (given + 1, "outside 0..3")):
        with pytest.raises(ValidationError, match=message):
            partition(store, clients=4, assignment=bad, name="bad")
    with pytest.raises(ValidationError, match="no scheme"):
        partition(store, clients=4, assignment=given, scheme="dirichlet", name="bad")


def test_dirichlet_skew_on_a_store_grows_as_alpha_shrinks(small_store):
    store = small_store(source="synthetic:classification?n_samples=3000&n_features=4&n_classes=5&seed=1",
                        chunk_rows=500)
    skews = []
    for alpha in (50.0, 0.1):
        meta = partition(store, clients=5, scheme="dirichlet", alpha=alpha, seed=0, min_size=0)
        hist = np.array([c["label_hist"] for c in meta["clients"].values()])
        skews.append(part_math.label_skew(hist))
    assert skews[0] < 0.1 < skews[1]


def test_column_scheme_and_regression_labels(tmp_path, small_store):
    store = small_store(source="sklearn:diabetes", chunk_rows=100)
    meta = partition(store, clients=2, scheme="column", column="sex")
    sex = open_store(store).X[:, 1].compute()
    assert [c["n_rows"] for c in meta["clients"].values()] == [int((sex < 0).sum()), int((sex > 0).sum())]
    assert len(meta["label_bins"]) == 11 and sum(meta["clients"]["0"]["label_hist"]) == meta["clients"]["0"]["n_rows"]
    assert set(np.unique(_client_rows(store, "default", 1)[0][:, 1])) == {sex.max()}


def test_replacing_a_partition_and_reading_a_client_deleted_chunk(small_store):
    store = small_store(chunk_rows=50)
    old = partition(store, clients=6, scheme="iid")
    meta = partition(store, clients=2, scheme="iid")
    info = read_info(store)
    assert list(info.partitions) == ["default"] and len(meta["clients"]) == 2
    assert not os.path.exists(os.path.join(store, old["path"]))  # the replaced copy is gone
    # Client 1 holds rows 300..599 of the sorted copy: its chunk 2 is stored chunk 8.
    path = info.partitions["default"]["path"]
    os.remove(os.path.join(store, chunk_key(path, "X", 8)))
    with pytest.raises(StoreError, match=f"chunk 8 of {path}/X is missing"):
        read_chunk(store, ChunkRef("partitions/default/1", 2))
    assert verify_store(store).missing == [ChunkRef(path, 8)]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"clients": 601}, "--clients 601 is larger than the 600 rows"),
     ({"clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "--alpha must be > 0"),
     ({"clients": 2, "scheme": "quantity", "alpha": -2.0}, "--alpha must be > 0"),
     ({"clients": 2, "scheme": "column", "column": "nope"}, "--column 'nope' is not a feature"),
     ({"clients": 2, "scheme": "column"}, "--scheme column needs --column"),
     ({"clients": 2, "scheme": "iid", "alpha": 1.0}, "--alpha applies to"),
     ({"clients": 4, "scheme": "iid", "min_size": 200}, "--clients 4 x --min-size 200 is more than the 600 rows"),
     ({"clients": 30, "scheme": "dirichlet", "alpha": 0.01, "min_size": 15},
      r"client \d+ gets \d+ rows \(< min_size 15\)"),
     ({"clients": 2, "scheme": "ring"}, "--scheme must be one of")],
)
def test_bad_partition_arguments(small_store, options, message):
    store = small_store()
    with pytest.raises(ValidationError, match=message):
        partition(store, **options)
    assert read_info(store).partitions == {}
    assert not os.path.exists(os.path.join(store, "partitions", "default"))
