"""The fused, cache-blocked GLM kernels give each model's own loss_and_grad."""

import numpy as np
import pytest
from fedpipe.tasks import kernels, models, reduce

GLMS = [models.linear(5, l2=0.1), models.linear(5, intercept=False), models.logistic(5),
        models.logistic(5, intercept=False, l1=0.1), models.softmax(5, 3),
        models.softmax(5, 4, intercept=False)]


def _data(model, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)) * 3.0  # margins of several units: both sides of sigmoid
    k = {"binary": 2, "multiclass": model.n_params // 5}.get(model.task)
    y = rng.standard_normal(n) if k is None else rng.integers(0, k, n)
    params = 0.5 * rng.standard_normal(model.n_params)
    return params, X, y


@pytest.mark.parametrize("model", GLMS, ids=lambda m: f"{m.name}-{m.n_params}")
@pytest.mark.parametrize("n_rows,block_bytes", [(0, None), (1, None), (103, 40), (103, 400),
                                                (103, 10**9), (5000, None)])
def test_fused_kernel_equals_loss_and_grad(model, n_rows, block_bytes):
    params, X, y = _data(model, n_rows)
    kind, spec = model.spec["kind"], model.spec
    k = spec.get("n_classes", 1)
    loss, grad, n = kernels.glm_loss_and_grad(kind, 5, k, spec["intercept"], params, X, y,
                                              block_bytes)
    ref_loss, ref_grad, ref_n = model.loss_and_grad(params, X, y)
    assert n == ref_n == n_rows
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-12 * max(1, n_rows))
    again = kernels.fused(model)(params, X.copy(), y.copy())
    assert kernels.fused(model)(params, X, y)[1].tobytes() == again[1].tobytes()


def test_extreme_margins_stay_finite_and_equal():
    model = models.logistic(5)
    params, X, y = _data(model, 200)
    X *= 1e3  # |z| in the thousands: exp(z) would overflow
    loss, grad, _ = kernels.fused(model)(params, X, y)
    ref_loss, ref_grad, _ = model.loss_and_grad(params, X, y)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-9)


def test_only_built_in_glms_have_a_kernel():
    assert all(kernels.fused(m) is not None for m in GLMS)
    assert kernels.fused(models.mlp(5, 3, hidden=(4,))) is None
    mine = models.logistic(5)._replace(name="my-logistic")  # a model of one's own
    assert kernels.fused(mine) is None
    assert kernels.fused(models.logistic(5)._replace(spec=None)) is None


def test_bad_labels_are_refused_as_by_the_model():
    model = models.logistic(5)
    params, X, _ = _data(model, 10)
    with pytest.raises(ValueError, match="0/1"):
        kernels.fused(model)(params, X, np.full(10, 2))
    with pytest.raises(ValueError, match="class indices"):
        kernels.fused(models.softmax(5, 3))(np.zeros(18), X, np.full(10, 3))


@pytest.mark.parametrize("model", [models.linear(5), models.logistic(5), models.softmax(5, 3)],
                         ids=lambda m: m.name)
def test_float32_rows_compute_in_float32_within_its_precision(model):
    params, X, y = _data(model, 20_000)
    X32 = X.astype(np.float32)
    loss, grad, _ = kernels.fused(model)(params, X32, y)
    # the reference: the same float32 values, computed in float64
    ref_loss, ref_grad, _ = model.loss_and_grad(params, X32.astype(np.float64), y)
    assert grad.dtype == np.float64
    scale = np.abs(ref_grad).max()
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert np.abs(grad - ref_grad).max() <= 1e-5 * scale
    assert np.abs(grad - ref_grad).max() > 0  # it did run in float32


def test_chunk_function_uses_the_kernel():
    model = models.softmax(5, 3)
    params, X, y = _data(model, 300)
    assert (reduce.chunk_loss_and_grad(model, params, (X, y))[1].tobytes()
            == kernels.fused(model)(params, X, y)[1].tobytes())
