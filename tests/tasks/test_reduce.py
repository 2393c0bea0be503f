"""Per-chunk sums: cache-sized row slices change no total beyond rounding, in a fixed order."""

import numpy as np
import pytest
from fedpipe.tasks import models, reduce


@pytest.mark.parametrize("n_rows,slice_bytes", [(0, 80), (1, 80), (37, 80), (37, 10**9), (5, 1)])
def test_row_slices_cover_every_row_once(n_rows, slice_bytes):
    X = np.zeros((n_rows, 5))
    slices = reduce.row_slices(X, slice_bytes)
    rows = np.concatenate([np.arange(n_rows)[s] for s in slices])
    assert rows.tolist() == list(range(n_rows))
    assert all(s.stop - s.start <= max(slice_bytes // 40, 1) for s in slices)


@pytest.mark.parametrize("model", [models.logistic(4, l2=0.1), models.softmax(4, 3),
                                   models.mlp(4, 3, hidden=(6,))])
def test_sliced_sums_equal_whole_chunk(monkeypatch, model):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((103, 4)), rng.integers(0, 2, 103)
    params = model.init(0) + 0.1 * rng.standard_normal(model.n_params)
    whole_loss, whole_grad, n = model.loss_and_grad(params, X, y)
    whole_eval = reduce.eval_sums(model, params, (X, y))
    monkeypatch.setattr(reduce, "SLICE_BYTES", 10 * 4 * 8)  # 10-row slices
    loss, grad, m = reduce.chunk_loss_and_grad(model, params, (X, y))
    assert m == n == 103
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reduce.eval_sums(model, params, (X, y)), whole_eval, rtol=1e-12)
    again = reduce.chunk_loss_and_grad(model, params, (X.copy(), y.copy()))
    assert again[1].tobytes() == grad.tobytes()  # a fixed order: same bits every time


@pytest.mark.parametrize("model, labels", [
    (models.linear(4, l2=0.1), None), (models.logistic(4), 2), (models.softmax(4, 3), 3),
    (models.mlp(4, 3, hidden=(6,)), 3), (models.mlp(4, 1, hidden=(6,), task="regression"), None),
])
def test_fused_evaluation_equals_loss_and_grad_plus_predict(model, labels):
    # The one-forward-pass path (loss_and_predict) gives the metrics' sums of the general one.
    rng = np.random.default_rng(1)
    X = rng.standard_normal((57, 4))
    y = rng.standard_normal(57) if labels is None else rng.integers(0, labels, 57)
    params = model.init(0) + 0.3 * rng.standard_normal(model.n_params)
    fused = reduce.eval_sums(model, params, (X, y))
    general = reduce.eval_sums(model._replace(loss_and_predict=None), params, (X, y))
    np.testing.assert_allclose(fused, general, rtol=1e-12)
    assert fused[1] == 57 and (labels is None or 0 < fused[2] <= 57)
    assert labels is not None or fused[3] > 0  # regression fills the squared-error sum
