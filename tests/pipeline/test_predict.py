"""Using a trained run: load_run(...).predict on every input kind, fedpipe predict, export."""

from __future__ import annotations

import json
import pickle
import shutil

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from fedpipe import load_run
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from fedpipe.data.store import apply_preprocess, read_info
from fedpipe.engine.train import fit
from fedpipe.errors import ValidationError
from fedpipe.model import saved
from fedpipe.tasks import models, optimizers


def _wine_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Numbers, a text column and text labels, a few NaNs: the common shape of a table."""
    rng = np.random.default_rng(seed)
    color = rng.choice(["red", "green", "blue"], n)
    x1, x2 = rng.normal(size=n), rng.normal(3.0, 2.0, size=n)
    score = x1 + 2.0 * (color == "red") - 1.5 * (color == "blue")
    cultivar = np.where(score > 1, "barbera", np.where(score > -0.5, "nebbiolo", "dolcetto"))
    frame = pd.DataFrame({"x1": x1, "color": color, "x2": x2, "cultivar": cultivar})
    frame.loc[[5, 17], "x2"] = np.nan
    return frame


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dask_client):
    """One store from a CSV with text labels/column and NaNs, and a run of each model kind."""
    root = tmp_path_factory.mktemp("predict")
    _wine_table().to_csv(root / "train.csv", index=False)
    url = str(root / "w.zarr")
    info = ingest(str(root / "train.csv"), url, target="cultivar", impute="mean",
                  standardize=True, chunk_rows=64, progress=False)
    d, k = info.n_features, len(info.classes)
    runs = {}
    for name, model in {"softmax": models.softmax(d, k, l2=1e-3),
                        "mlp": models.mlp(d, k, hidden=(8,), task="multiclass")}.items():
        fit(url, model, optimizers.adam(0.05), iterations=40, dask_client=dask_client,
            out=root / name)
        runs[name] = root / name
    return root, url, info, runs


def test_store_info_keeps_text_labels_and_categories(trained):
    _, _, info, _ = trained
    assert info.classes == ["barbera", "dolcetto", "nebbiolo"]
    assert info.categorical == {"color": ["blue", "green", "red"]}
    assert info.feature_names == ["x1", "color=blue", "color=green", "color=red", "x2"]
    assert (info.columns, info.target) == (["x1", "color", "x2"], "cultivar")


def test_predict_needs_no_store_and_applies_its_preprocessing(trained, tmp_path):
    root, url, info, runs = trained
    run_dir = tmp_path / "moved"
    shutil.copytree(runs["softmax"], run_dir)
    frame = _wine_table(200, seed=1)
    X = frame.drop(columns="cultivar")
    # the reference: the store's own preprocessing on the one-hot rows, then the model
    model, params = saved.load(run_dir).model, saved.load(run_dir).params
    onehot = np.column_stack([X.x1, X.color == "blue", X.color == "green", X.color == "red",
                              X.x2]).astype(float)
    want = np.asarray(info.classes)[model.predict(params, apply_preprocess(onehot, info))]
    got = load_run(run_dir).predict(X)
    assert got.dtype.kind == "U" and (got == want).all()
    assert (got == frame.cultivar).mean() > 0.85
    proba = load_run(run_dir).predict_proba(X)
    assert proba.shape == (200, 3) and np.allclose(proba.sum(axis=1), 1.0)
    assert (np.asarray(info.classes)[proba.argmax(axis=1)] == got).all()
    # columns are matched by name, not by position
    assert (load_run(run_dir).predict(X[["x2", "color", "x1"]]) == got).all()


def test_unseen_category_is_a_row_of_zeros(trained):
    _, _, _, runs = trained
    enc = saved.load(runs["softmax"]).encoding
    from fedpipe.model.predict import raw_features

    X = pd.DataFrame({"x1": [0.5, 0.5], "color": ["purple", "red"], "x2": [1.0, 1.0]})
    assert raw_features(enc, X).tolist() == [[0.5, 0, 0, 0, 1.0], [0.5, 0, 0, 1, 1.0]]


def test_columns_missing_or_extra_are_named(trained):
    _, _, _, runs = trained
    run = load_run(runs["softmax"])
    frame = _wine_table(30)
    with pytest.raises(ValidationError, match="lacks column.*'color'"):
        run.predict(frame.drop(columns=["color", "cultivar"]))
    with pytest.raises(ValidationError, match="'cultivar' the model was not trained on"):
        run.predict(frame)
    with pytest.raises(ValidationError, match="X has 2 columns, the model expects 3"):
        run.predict(np.zeros((4, 2)))


def test_dask_inputs_are_lazy_and_ship_the_model_once(trained, dask_client):
    _, url, _, runs = trained
    run = load_run(runs["mlp"])
    frame = _wine_table(300, seed=2).drop(columns="cultivar")
    want = run.predict(frame)
    lazy = run.predict(dd.from_pandas(frame, npartitions=4))
    graph = dict(lazy.__dask_graph__())
    model_keys = [k for k in graph if "SavedModel-" in str(k)]
    # one key holds the model; every partition's task depends on it instead of embedding it
    assert lazy.npartitions == 4 and len(model_keys) == 1
    tasks = [v for k, v in graph.items() if "_frame_block" in str(k)]
    assert len(tasks) == 4 and all(model_keys[0] in t.dependencies for t in tasks)
    assert (lazy.compute().to_numpy() == want).all()
    numeric = frame.assign(color=0.0)  # a Dask array needs numbers: the store's X instead
    with pytest.raises(ValidationError):
        run.predict(numeric.to_numpy()[:, :2])
    from_store = run.predict(url)
    assert isinstance(from_store, da.Array) and from_store.numblocks[0] == read_info(url).n_chunks
    stored = _wine_table()
    assert (from_store.compute() == run.predict(stored.drop(columns="cultivar"))).all()


def test_cli_predict_streams_a_csv_and_prints_metrics(trained, tmp_path, capsys):
    _, _, _, runs = trained
    frame = _wine_table(300, seed=3)
    frame.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "p.parquet"
    assert main(["predict", str(runs["softmax"]), str(tmp_path / "new.csv"), "--out", str(out),
                 "--proba", "--chunk-rows", "64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_parquet(out)
    run = load_run(runs["softmax"])
    assert (table.prediction == run.predict(frame.drop(columns="cultivar"))).all()
    assert list(table.columns) == ["prediction", "proba_barbera", "proba_dolcetto",
                                   "proba_nebbiolo"]
    assert summary["rows"] == 300
    assert summary["test_accuracy"] == pytest.approx((table.prediction == frame.cultivar).mean())
    # a store as SOURCE: its labels are indices, mapped back before the metrics
    assert main(["predict", str(runs["softmax"]), trained[1], "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == 400
    assert main(["predict", str(tmp_path), str(tmp_path / "new.csv"), "--out", str(out)]) == 2
    assert "has no params.npz" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["softmax", "mlp"])
def test_onnx_and_sklearn_exports_predict_the_same(trained, tmp_path, kind):
    ort = pytest.importorskip("onnxruntime")
    _, url, _, runs = trained
    run = load_run(runs[kind])
    X = _wine_table(200, seed=4).drop(columns="cultivar")
    X.loc[3, "x2"] = np.nan  # imputed inside the graph too
    from fedpipe.model.predict import raw_features

    features = raw_features(saved.load(runs[kind]).encoding, X)
    assert main(["export", str(runs[kind]), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx"), "-q"]) == 0
    label, proba = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"X": features})
    assert (label == run.predict(X)).all()
    np.testing.assert_allclose(proba, run.predict_proba(X), rtol=1e-9, atol=1e-12)
    assert main(["export", str(runs[kind]), "--format", "sklearn", "--out",
                 str(tmp_path / "m.pkl"), "-q"]) == 0
    pipe = pickle.loads((tmp_path / "m.pkl").read_bytes())
    assert (pipe.predict(features) == run.predict(X)).all()
    np.testing.assert_allclose(pipe.predict_proba(features), run.predict_proba(X), atol=1e-12)


@pytest.mark.parametrize("source,kind", [("sklearn:diabetes", "linear"),
                                         ("sklearn:breast_cancer", "logistic"),
                                         ("sklearn:diabetes", "mlp")])
def test_every_builtin_kind_exports(tmp_path, dask_client, source, kind):
    ort = pytest.importorskip("onnxruntime")
    url = str(tmp_path / "s.zarr")
    info = ingest(source, url, standardize=True, chunk_rows=128, progress=False)
    model = {"linear": lambda: models.linear(info.n_features),
             "logistic": lambda: models.logistic(info.n_features),
             "mlp": lambda: models.mlp(info.n_features, 1, hidden=(6,), task="regression")}[kind]()
    fit(url, model, optimizers.adam(0.01), iterations=10, dask_client=dask_client,
        out=tmp_path / "run")
    run = load_run(tmp_path / "run")
    import sklearn.datasets

    X = getattr(sklearn.datasets, f"load_{source.split(':')[1]}")().data
    want = run.predict(X)
    saved_model = saved.load(tmp_path / "run")
    from fedpipe.model.onnx_export import export_onnx
    from fedpipe.model.sklearn_export import to_sklearn

    outputs = ort.InferenceSession(str(export_onnx(saved_model, tmp_path / "m.onnx"))).run(
        None, {"X": X})
    np.testing.assert_allclose(outputs[0], want, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(to_sklearn(saved_model).predict(X), want, rtol=1e-12, atol=1e-9)
    if kind == "logistic":
        np.testing.assert_allclose(outputs[1], run.predict_proba(X), atol=1e-12)


FACTORY = '''
from fedpipe.tasks import models

def make(n_features, n_classes, task):
    return models.softmax(n_features, n_classes, l2=0.01)._replace(name="mine")

def broken(n_features, n_classes, task):
    model = models.softmax(n_features, n_classes)
    return model._replace(loss_and_grad=lambda p, X, y: (0.0, p * 0, len(X)))
'''


def test_model_factory_from_a_file_trains_and_predicts_without_it(trained, tmp_path, capsys):
    root, url, _, _ = trained
    (tmp_path / "mymodel.py").write_text(FACTORY)
    run = tmp_path / "run"
    assert main(["train", url, "--model", f"{tmp_path / 'mymodel.py'}:make", "--workers", "1",
                 "--optimizer", "adam", "--lr", "0.05", "--iterations", "20", "--out", str(run),
                 "-q"]) == 0
    spec = json.loads((run / "model.json").read_text())["spec"]
    assert spec["kind"] == "factory" and spec["path"] == "model_factory.py"
    (tmp_path / "mymodel.py").unlink()  # the run carries its own copy
    frame = _wine_table(50, seed=5)
    labels = load_run(run).predict(frame.drop(columns="cultivar"))
    assert set(labels) <= {"barbera", "dolcetto", "nebbiolo"} and len(labels) == 50
    (tmp_path / "mymodel.py").write_text(FACTORY)
    capsys.readouterr()
    assert main(["train", url, "--model", f"{tmp_path / 'mymodel.py'}:broken",
                 "--iterations", "1"]) == 2
    assert "check_model failed" in capsys.readouterr().err
    assert main(["train", url, "--model", "no_such_module:make", "--iterations", "1"]) == 2
    assert "cannot import no_such_module" in capsys.readouterr().err
