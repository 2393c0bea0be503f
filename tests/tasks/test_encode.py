"""tasks.encode: the saved preprocessing equals the store's, one-hot rows, category lookup."""

import numpy as np
import pytest
from fedpipe.tasks import encode, models
from fedpipe.tasks import stats as stats_math


@pytest.mark.parametrize("impute", ["none", "mean", "median"])
@pytest.mark.parametrize("standardize", [False, True])
def test_preprocess_gives_the_bits_of_stats_preprocess(impute, standardize):
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(50, 4))
    X[rng.random(X.shape) < 0.1] = np.nan
    stats = stats_math.chunk_stats(X)
    median = np.array([0.5, np.nan, 2.0, 3.0])  # a column without values: NaN -> 0
    pre = encode.from_stats(stats, impute=impute, standardize=standardize, median=median)
    want = stats_math.preprocess(X, stats, impute=impute, standardize=standardize, median=median)
    got = encode.apply(pre, X)
    assert got.tobytes() == want.tobytes()
    assert not np.shares_memory(got, X)


def test_codes_and_one_hot_handle_unseen_and_missing_values():
    cats = ["blue", "green", "red"]
    index = encode.codes(np.array(["red", "purple", None, "blue", np.nan], dtype=object), cats)
    assert index.tolist() == [2, -1, -1, 0, -1]
    assert encode.one_hot(index, 3).tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0],
                                                 [0, 0, 0]]
    assert encode.codes(np.array([3.0, 4.0]), [3, 4]).tolist() == [0, 1]  # 3.0 is category 3
    assert encode.codes(np.array([True, False]), [False, True]).tolist() == [1, 0]


@pytest.mark.parametrize("model", [
    models.linear(3, l2=0.1), models.logistic(3, l1=0.2), models.softmax(3, 4, intercept=False),
    models.mlp(3, 2, hidden=(5,), task="binary"), models.mlp(3, 1, hidden=(), task="regression")])
def test_spec_rebuilds_the_same_model(model):
    rng = np.random.default_rng(1)
    params, X = rng.normal(size=model.n_params), rng.normal(size=(7, 3))
    again = models.from_spec(model.spec)
    assert again.name == model.name and again.n_params == model.n_params
    assert np.array_equal(again.predict(params, X), model.predict(params, X))
    assert np.array_equal(again.penalty(params)[1], model.penalty(params)[1])
    if model.predict_proba is not None:
        proba = model.predict_proba(params, X)
        assert np.allclose(proba.sum(axis=1), 1.0)
        assert (proba.argmax(axis=1) == model.predict(params, X)).all()
    with pytest.raises(ValueError, match="unknown model kind"):
        models.from_spec({"kind": "forest"})
