"""Accuracy on real data: fedpipe's training matches scikit-learn on the same train/test rows."""

from __future__ import annotations

import numpy as np
import pytest
from fedpipe.cli import registry
from fedpipe.data.ingest import ingest
from fedpipe.data.store import chunk_refs, read_chunk, read_info
from fedpipe.engine.train import fit
from fedpipe.tasks.lbfgs import lbfgs
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score


def _store(tmp_path, name: str, chunk_rows: int = 50) -> str:
    url = str(tmp_path / f"{name}.zarr")
    ingest(f"sklearn:{name}", url, chunk_rows=chunk_rows, standardize=True, progress=False)
    return url


def _split(url: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows fedpipe trains (or tests) on, read the same way the engine reads them."""
    parts = [read_chunk(url, ref, split=split) for ref in chunk_refs(read_info(url))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_digits_mlp_reaches_95_percent(dask_client, tmp_path):
    url = _store(tmp_path, "digits", chunk_rows=300)
    model = registry.make_model("mlp", read_info(url), hidden="64", l2=1e-4)
    result = fit(url, model, lbfgs(), iterations=60, dask_client=dask_client)
    assert result.metrics[-1]["test_accuracy"] >= 0.95


@pytest.mark.parametrize("name,model_name", [("wine", "softmax"), ("breast_cancer", "logistic")])
def test_linear_classifiers_match_sklearn(dask_client, tmp_path, name, model_name):
    url = _store(tmp_path, name)
    X_train, y_train = _split(url, "train")
    X_test, y_test = _split(url, "test")
    reference = LogisticRegression(max_iter=5000).fit(X_train, y_train).score(X_test, y_test)
    # sklearn minimises 0.5 ||w||^2 + C * sum(loss) with C = 1: as a mean loss, l2 = 1 / n.
    model = registry.make_model(model_name, read_info(url), l2=1.0 / len(y_train))
    result = fit(url, model, lbfgs(), iterations=200, tol=1e-12, dask_client=dask_client)
    assert abs(result.metrics[-1]["test_accuracy"] - reference) <= 0.01


def test_diabetes_linear_matches_sklearn_r2(dask_client, tmp_path):
    url = _store(tmp_path, "diabetes")
    X_train, y_train = _split(url, "train")
    X_test, y_test = _split(url, "test")
    reference = r2_score(y_test, LinearRegression().fit(X_train, y_train).predict(X_test))
    model = registry.make_model("linear", read_info(url))
    result = fit(url, model, lbfgs(), iterations=100, tol=1e-12, dask_client=dask_client)
    assert abs(result.metrics[-1]["test_r2"] - reference) <= 0.01
