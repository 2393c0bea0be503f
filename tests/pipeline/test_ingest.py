"""Ingest: every source kind, every validation error, atomic writes, statistics."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from fedpipe.data.ingest import ingest
from fedpipe.data.stats import compute_stats
from fedpipe.data.store import open_store, read_info, verify_store
from fedpipe.errors import FedpipeError, ValidationError


def _frame(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=["a", "b", "c", "d"])
    frame["label"] = rng.integers(0, 3, size=n) * 10 + 7  # labels 7, 17, 27
    return frame


def _ingest(source, store, **kw):
    return ingest(str(source), str(store), progress=False, **kw)


@pytest.mark.parametrize(
    ("name", "task", "shape"),
    [("iris", "multiclass", (150, 4)), ("wine", "multiclass", (178, 13)),
     ("breast_cancer", "binary", (569, 30)), ("diabetes", "regression", (442, 10)),
     ("digits", "multiclass", (1797, 64))],
)
def test_sklearn_sources(tmp_path, name, task, shape):
    import sklearn.datasets

    info = _ingest(f"sklearn:{name}", tmp_path / "s.zarr", chunk_rows=100)
    assert (info.n_rows, info.n_features) == shape and info.task == task
    X_ref, y_ref = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    ds = open_store(str(tmp_path / "s.zarr"))
    np.testing.assert_array_equal(ds.X.compute(), X_ref)
    np.testing.assert_allclose(info.stats["sum"], X_ref.sum(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(info.stats["max"], X_ref.max(axis=0))
    if task == "regression":
        np.testing.assert_array_equal(ds.y.compute(), y_ref)
    else:
        np.testing.assert_array_equal(np.asarray(info.classes)[ds.y.compute()], y_ref)


def test_synthetic_sources(tmp_path):
    info = _ingest("synthetic:classification?n_samples=300&n_features=6&n_classes=4&seed=3",
                   tmp_path / "c.zarr", chunk_rows=64, dtype="float32")
    assert (info.n_rows, info.n_features, info.task, info.classes) == (300, 6, "multiclass", [0, 1, 2, 3])
    assert open_store(str(tmp_path / "c.zarr")).X.dtype == np.float32
    info = _ingest("synthetic:regression?n_samples=200&n_features=3&noise=0.5&seed=1",
                   tmp_path / "r.zarr")
    assert (info.n_rows, info.task, info.classes) == (200, "regression", None)
    with pytest.raises(ValidationError, match="unknown parameter 'n_rows'"):
        _ingest("synthetic:regression?n_rows=5", tmp_path / "x.zarr")


@pytest.mark.parametrize("kind", ["csv", "parquet", "npz"])
def test_file_sources_keep_rows_and_map_labels(tmp_path, kind, monkeypatch):
    import fedpipe.data.ingest

    monkeypatch.setattr(fedpipe.data.ingest, "WRITE_BYTES", 1)  # stream: one chunk per batch
    frame = _frame()
    path = tmp_path / f"d.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        frame.to_parquet(path)
    else:
        np.savez(path, X=frame[["a", "b", "c", "d"]].to_numpy(), y=frame["label"].to_numpy())
    info = _ingest(path, tmp_path / "s.zarr", chunk_rows=64)  # 64 does not divide the batches
    assert info.task == "multiclass" and info.classes == [7, 17, 27]
    assert info.n_chunks == 8 and info.n_rows == 500
    ds = open_store(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(ds.X.compute(), frame[["a", "b", "c", "d"]].to_numpy())
    np.testing.assert_array_equal(np.asarray(info.classes)[ds.y.compute()], frame["label"])
    if kind != "npz":
        assert info.feature_names == ["a", "b", "c", "d"]


def test_rechunk_regroups_irregular_batches_into_whole_chunks():
    from fedpipe.data.ingest import _rechunk

    sizes = [3, 10, 1, 7, 0, 9]
    start = np.cumsum([0, *sizes])
    batches = [(np.arange(a, b, dtype=float)[:, None], np.arange(a, b, dtype=float), b - a)
               for a, b in zip(start[:-1], start[1:], strict=True)]
    blocks = list(_rechunk(iter(batches), 4))
    assert [len(y) for _, y, _ in blocks] == [4, 4, 4, 4, 4, 4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in blocks]), np.arange(30.0))
    assert sum(units for *_, units in blocks) == 30


def test_task_override_and_inference(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    info = _ingest(tmp_path / "d.csv", tmp_path / "r.zarr", task="regression")
    assert info.task == "regression" and open_store(str(tmp_path / "r.zarr")).y.dtype == np.float64
    frame["label"] = frame["label"] > 10
    frame.to_csv(tmp_path / "b.csv", index=False)
    assert _ingest(tmp_path / "b.csv", tmp_path / "b.zarr").task == "binary"
    frame["label"] = np.arange(len(frame)) % 60  # many integer values: a count, not classes
    frame.to_csv(tmp_path / "m.csv", index=False)
    assert _ingest(tmp_path / "m.csv", tmp_path / "m.zarr").task == "regression"
    info = _ingest(tmp_path / "m.csv", tmp_path / "m2.zarr", task="multiclass")
    assert info.classes == list(range(60))


def _write(tmp_path, name, frame):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _bad_sources(tmp_path):
    frame = _frame()
    nan = frame.copy()
    nan.loc[123, "c"] = np.nan
    inf = frame.copy()
    inf.loc[321, "b"] = np.inf
    # a column numeric in the rows sampled up front that holds text later: refused, with a hint
    text = _frame(1500)
    text["city"] = np.arange(1500).astype(str)
    text.loc[1400, "city"] = "x"
    many = _frame(1200)
    many["id"] = [f"id{i}" for i in range(1200)]  # text, but too many values to be a category
    floats = frame.copy()
    floats["label"] = frame["label"] + 0.5
    (tmp_path / "empty.csv").write_text("a,b,label\n")
    np.savez(tmp_path / "short.npz", X=np.zeros((5, 2)), y=np.zeros(4))
    return [
        (_write(tmp_path, "nan.csv", nan), {}, "column 'c' has NaN at row 123"),
        (_write(tmp_path, "inf.csv", inf), {}, "column 'b' has inf at row 321"),
        (_write(tmp_path, "text.csv", text), {}, "column 'city' is not numeric .*--categorical"),
        (_write(tmp_path, "many.csv", many), {}, "column 'id' has more than 1000 distinct"),
        (_write(tmp_path, "ok3.csv", frame), {"categorical": ["zip"]},
         "--categorical column 'zip' is not a feature column"),
        (_write(tmp_path, "ok.csv", frame), {"target": "price"}, "target column 'price' not found"),
        (_write(tmp_path, "float.csv", floats), {"task": "multiclass"}, "needs integer labels, found 7.5"),
        (tmp_path / "empty.csv", {}, "has no rows"),
        (tmp_path / "short.npz", {}, "X has 5 rows but y has 4"),
        (_write(tmp_path, "ok2.csv", frame), {"chunk_rows": 0}, "--chunk-rows must be a positive"),
    ]


def test_every_validation_error_names_its_culprit_and_leaves_nothing(tmp_path):
    for source, options, message in _bad_sources(tmp_path):
        store = tmp_path / "out.zarr"
        with pytest.raises(ValidationError, match=message):
            _ingest(source, store, **options)
        assert not store.exists()
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "temporary store left behind"


def test_existing_store_needs_overwrite_and_failure_keeps_old_store(tmp_path):
    store = tmp_path / "s.zarr"
    _ingest("sklearn:iris", store)
    with pytest.raises(ValidationError, match="already exists .*--overwrite"):
        _ingest("sklearn:wine", store)
    bad = _frame()
    bad.loc[3, "a"] = np.nan
    with pytest.raises(ValidationError):
        _ingest(_write(tmp_path, "bad.csv", bad), store, overwrite=True)
    assert read_info(str(store)).n_rows == 150  # the old store survives a failed overwrite
    assert _ingest("sklearn:wine", store, overwrite=True).n_rows == 178
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FedpipeError, match="not a zarr store"):
        _ingest("sklearn:iris", tmp_path / "notes", overwrite=True)


def test_stats_on_a_cluster_equal_numpy_on_the_whole_array(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(3.0, 2.0, size=(1000, 6))
    X[rng.random(X.shape) < 0.05] = np.nan
    X[:, 5] = np.nan  # an all-missing column
    np.savez(tmp_path / "d.npz", X=X, y=rng.normal(size=1000))
    store = str(tmp_path / "s.zarr")
    info = _ingest(tmp_path / "d.npz", store, chunk_rows=37, impute="median")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        stats = compute_stats(store, dask_client=dask_client, median=True, fan_in=3)
    assert info.n_chunks == 28
    np.testing.assert_array_equal(stats["count"], (~np.isnan(X)).sum(axis=0))
    np.testing.assert_allclose(stats["sum"], np.nansum(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["sumsq"], np.nansum(X**2, axis=0), rtol=1e-12)
    np.testing.assert_array_equal(stats["min"][:5], np.nanmin(X[:, :5], axis=0))
    np.testing.assert_array_equal(stats["max"][:5], np.nanmax(X[:, :5], axis=0))
    assert stats["min"][5] == np.inf and stats["max"][5] == -np.inf
    width = (np.nanmax(X[:, :5], axis=0) - np.nanmin(X[:, :5], axis=0)) / 1024
    assert np.all(np.abs(stats["median"][:5] - np.nanmedian(X[:, :5], axis=0)) <= width)
    # The threaded-scheduler stats stored by ingest are the same numbers.
    np.testing.assert_allclose(info.stats["sum"][:5], stats["sum"][:5], rtol=1e-12)
    assert info.stats["min"][5] is None and verify_store(store).ok


def test_progress_bar_does_not_break_ingest(tmp_path, capsys):
    ingest("sklearn:iris", str(tmp_path / "s.zarr"), progress=True)
    assert capsys.readouterr().out == ""  # the bar goes to stderr


def test_ingest_arrays_from_memory(tmp_path):
    from fedpipe.data.ingest import ingest_arrays

    X = np.arange(40.0).reshape(20, 2)
    y = np.array([2.5] * 10 + [-1.0] * 10)
    info = ingest_arrays(X, y, str(tmp_path / "a.zarr"), feature_names=["p", "q"], chunk_rows=8)
    assert info.task == "regression" and info.classes is None  # 2.5 is not a class label
    assert info.feature_names == ["p", "q"] and info.n_chunks == 3
    with pytest.raises(ValidationError, match="needs integer labels, found 2.5"):
        ingest_arrays(X, y, str(tmp_path / "b.zarr"), task="binary")
    with pytest.raises(ValidationError, match="X has 20 rows but y has 19"):
        ingest_arrays(X, y[:-1], str(tmp_path / "c.zarr"))
