"""Model-parallel math: feature blocks' forward/backward equal the unsharded model's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from fedpipe.tasks import models, optimizers, sharded

CASES = [
    ("regression", lambda d: models.linear(d, l2=0.1)),
    ("binary", lambda d: models.logistic(d, l2=0.1, l1=0.01)),
    ("multiclass", lambda d: models.softmax(d, 4, l2=0.1)),
]


def _data(task: str, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = {"regression": rng.normal(size=n), "binary": rng.integers(0, 2, n),
         "multiclass": rng.integers(0, 4, n)}[task]
    return X, y


@pytest.mark.parametrize("task,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("n_shards", [1, 3])
def test_blocks_give_the_models_loss_and_gradient(task, make, n_shards):
    d = 7
    model = make(d)
    X, y = _data(task, 50, d)
    params = np.random.default_rng(1).normal(size=model.n_params)
    d_, k, intercept = sharded.layout(model)
    bounds = sharded.feature_bounds(d, n_shards)
    blocks, b = sharded.split_params(params, bounds, k, intercept)
    assert np.array_equal(sharded.join_params(blocks, b), params)
    parts = [sharded.block_forward(X[:, a:z], W) for (a, z), W in zip(bounds, blocks, strict=True)]
    loss, R = sharded.head(task, parts, b, y)
    grads = [sharded.block_grad(X[:, a:z], R) for a, z in bounds]
    ref_loss, ref_grad, n = model.loss_and_grad(params, X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    got = sharded.join_params(grads, R.sum(axis=0))
    np.testing.assert_allclose(got, ref_grad, rtol=1e-10, atol=1e-12)
    pen = sum(sharded.block_penalty(W, model.spec["l2"], model.spec["l1"])[0] for W in blocks)
    assert pen == pytest.approx(model.penalty(params)[0], rel=1e-12)


def test_block_steps_equal_one_flat_step():
    model = models.softmax(6, 3, l2=0.05, intercept=False)
    opt = optimizers.adam(0.1)
    rng = np.random.default_rng(2)
    params, grad_sum = rng.normal(size=model.n_params), rng.normal(size=model.n_params)
    bounds = sharded.feature_bounds(6, 2)
    blocks, _ = sharded.split_params(params, bounds, 3, False)
    gblocks, _ = sharded.split_params(grad_sum, bounds, 3, False)
    flat_grad = grad_sum / 10 + model.penalty(params)[1]
    updates, _ = opt.update(flat_grad, opt.init(params), params)
    stepped = [sharded.block_step(opt, W, opt.init(W.reshape(-1)), G, 10, 0.05, 0.0)[0]
               for W, G in zip(blocks, gblocks, strict=True)]
    np.testing.assert_array_equal(sharded.join_params(stepped, np.zeros(0)), params + updates)


def test_feature_bounds_cover_the_columns_on_chunk_edges():
    for d, s, block in [(10, 3, None), (20, 4, 5), (21, 2, 5), (7, 7, None)]:
        bounds = sharded.feature_bounds(d, s, block)
        assert bounds[0][0] == 0 and bounds[-1][1] == d and len(bounds) == s
        assert all(a < z for a, z in bounds)
        assert all(z == a2 for (_, z), (a2, _) in zip(bounds[:-1], bounds[1:], strict=True))
        if block:
            assert all(a % block == 0 for a, _ in bounds)
    with pytest.raises(ValueError, match="shards"):
        sharded.feature_bounds(5, 6)


def test_sparse_blocks_equal_dense():
    X, y = _data("multiclass", 40, 9)
    X[np.abs(X) < 1.0] = 0.0
    W = np.random.default_rng(3).normal(size=(9, 4))
    Xs = sp.csr_matrix(X)
    np.testing.assert_allclose(sharded.block_forward(Xs, W), sharded.block_forward(X, W),
                               rtol=1e-13)
    R = np.random.default_rng(4).normal(size=(40, 4))
    np.testing.assert_allclose(sharded.block_grad(Xs, R), sharded.block_grad(X, R), rtol=1e-12)


def test_global_norm_clip_and_mlp_are_refused():
    clipped = optimizers.chain(optimizers.clip_by_global_norm(1.0), optimizers.sgd(0.1))
    with pytest.raises(ValueError, match="element-wise"):
        sharded.check_blockwise(clipped)
    sharded.check_blockwise(optimizers.adam(0.1))
    with pytest.raises(ValueError, match="linear, logistic and softmax"):
        sharded.layout(models.mlp(4, 3, hidden=(5,)))
