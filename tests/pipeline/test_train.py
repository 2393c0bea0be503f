"""Data-parallel training on a real cluster: exactness, determinism, resume, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from distributed import get_task_stream
from fedpipe import rundir
from fedpipe.cluster import connect
from fedpipe.data.store import chunk_refs, read_chunk, read_info
from fedpipe.engine.minibatch import epoch_batches
from fedpipe.engine.train import fit
from fedpipe.errors import StoreError, TrainingError, ValidationError
from fedpipe.tasks import models, optimizers, reduce
from fedpipe.tasks.lbfgs import lbfgs


@pytest.fixture
def store(small_store) -> str:
    return small_store(standardize=True)  # 600 rows x 5 features, 3 classes, 6 chunks


def serial_full_batch(url, model, optimizer, iterations, seed=0, test_fraction=0.2):
    """The reference: a plain NumPy loop over the same chunks, no Dask at all."""
    info = read_info(url)
    chunks = [read_chunk(url, r, split="train", test_fraction=test_fraction, seed=seed)
              for r in chunk_refs(info)]
    params = model.init(seed)
    state = optimizer.init(params)
    for _ in range(iterations):
        loss_sum, grad_sum, n = 0.0, np.zeros_like(params), 0
        for X, y in chunks:
            ls, gs, k = model.loss_and_grad(params, X, y)
            loss_sum, grad_sum, n = loss_sum + ls, grad_sum + gs, n + k
        _, grad = reduce.objective(loss_sum, grad_sum, n, model, params)
        updates, state = optimizer.update(grad, state, params)
        params = params + updates
    return params


def test_full_batch_equals_serial_numpy_loop(dask_client, store):
    model = models.softmax(5, 3, l2=1e-3)
    result = fit(store, model, optimizers.momentum(0.3), iterations=12, dask_client=dask_client)
    expected = serial_full_batch(store, model, optimizers.momentum(0.3), 12)
    np.testing.assert_allclose(result.params, expected, rtol=1e-10, atol=1e-14)
    assert [r["iteration"] for r in result.metrics] == list(range(13))
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert {"test_loss", "test_accuracy", "seconds"} <= set(result.metrics[-1])


def test_bit_identical_whatever_the_workers_and_cache(store):
    model, runs = models.mlp(5, 3, hidden=(8,), l2=1e-4), []
    # One task per chunk, or two chunks per task (the tree's first level done in the task).
    for workers, processes, cache, per_task in ((1, False, "memory", 1), (3, False, "stream", 2),
                                                (2, True, "memory", 2), (2, False, "stream", 1)):
        with connect(workers=workers, threads=1, processes=processes,
                     dashboard_address=":0") as dc:
            result = fit(store, model, optimizers.adam(0.05), iterations=6, dask_client=dc,
                         cache=cache, fan_in=2, chunks_per_task=per_task)
        runs.append(result.params.tobytes())
    assert runs[0] == runs[1] == runs[2] == runs[3]


def test_default_chunks_per_task_follows_the_cluster_and_changes_no_bit(store):
    # 6 chunks, fan_in 2: blocks of 2 unless a worker would get 4 of the 6 chunks (2 workers)
    model, runs = models.softmax(5, 3, l2=1e-3), {}
    for workers, processes, per_task in ((1, False, None), (2, True, None), (3, False, None),
                                         (2, False, 1)):
        with connect(workers=workers, threads=1, processes=processes,
                     dashboard_address=":0") as dc:
            result = fit(store, model, optimizers.adam(0.05), iterations=4, dask_client=dc,
                         fan_in=2, chunks_per_task=per_task)
        runs[workers, per_task] = result.params.tobytes(), result.summary["chunks_per_task"]
    assert {key: per_task for key, (_, per_task) in runs.items()} == {
        (1, None): 2, (2, None): 1, (3, None): 2, (2, 1): 1}
    assert len({params for params, _ in runs.values()}) == 1


def test_float32_compute_on_a_float32_store(dask_client, small_store):
    url, model = small_store(dtype="float32", standardize=True), models.softmax(5, 3)
    with connect(workers=1, threads=1, processes=True, dashboard_address=":0") as dc:
        one = fit(url, model, optimizers.sgd(0.5), iterations=5, dask_client=dc,
                  compute_dtype="float32")
    two = fit(url, model, optimizers.sgd(0.5), iterations=5, dask_client=dask_client,
              compute_dtype="float32", cache="stream")
    wide = fit(url, model, optimizers.sgd(0.5), iterations=5, dask_client=dask_client)
    assert one.params.tobytes() == two.params.tobytes()  # any workers, either cache
    gap = np.abs(one.params - wide.params).max() / np.abs(wide.params).max()
    assert 0 < gap < 1e-5  # float32 products: a few units of float32's 6e-8 per step
    with pytest.raises(ValidationError, match="float32 store"):
        fit(small_store(), model, optimizers.sgd(0.5), iterations=1, dask_client=dask_client,
            compute_dtype="float32")


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_blocks_spread_over_the_workers(dask_client, store, cache):
    # Two blocks of three chunks on two workers: each worker gets one, every pass. (Left to
    # itself the scheduler sometimes put both on one worker: that worker did the pass alone.)
    with get_task_stream(dask_client) as stream:
        fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=15, cache=cache,
            chunks_per_task=3, dask_client=dask_client)
    by_task: dict = {}
    for t in stream.data:
        key = t["key"] if isinstance(t["key"], tuple) else (t["key"], None)
        if key[0].split("-")[0] in ("grad", "load"):
            by_task.setdefault(key[0], set()).add(t["worker"])
    assert len(by_task) >= 6  # every pass (and the loads) seen
    assert all(len(workers) == 2 for workers in by_task.values())


def test_task_groups_read_like_the_algorithm(dask_client, store):
    with get_task_stream(dask_client) as stream:
        fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=2,
            dask_client=dask_client)
    groups = {(k[0] if isinstance(k, tuple) else k).split("-")[0] for k in
              (t["key"] for t in stream.data)}
    assert {"load", "grad", "sum", "eval"} <= groups


@pytest.mark.parametrize("kind", ["full-batch", "lbfgs", "mini-batch"])
def test_resume_ends_with_the_uninterrupted_params(dask_client, store, tmp_path, kind):
    model = models.softmax(5, 3, l2=1e-3)
    optimizer = lbfgs() if kind == "lbfgs" else optimizers.adam(0.05)
    length = {"epochs": 4, "batch_size": 64} if kind == "mini-batch" else {"iterations": 8}
    half = {"epochs": 2, "batch_size": 64} if kind == "mini-batch" else {"iterations": 4}
    whole = fit(store, model, optimizer, dask_client=dask_client, out=tmp_path / "whole",
                checkpoint_every=2, **length)
    fit(store, model, optimizer, dask_client=dask_client, out=tmp_path / "split",
        checkpoint_every=2, **half)
    resumed = fit(store, model, optimizer, dask_client=dask_client, out=tmp_path / "split",
                  checkpoint_every=2, resume=True, **length)
    assert resumed.params.tobytes() == whole.params.tobytes()
    key = "epoch" if kind == "mini-batch" else "iteration"
    steps = [r[key] for r in rundir.load_run(tmp_path / "split").metrics]
    assert steps == [r[key] for r in whole.metrics]  # no step missing, none twice
    np.testing.assert_array_equal(rundir.load_run(tmp_path / "split").named["coef"],
                                  whole.named["coef"])


def test_interrupted_run_resumes_from_its_checkpoint(dask_client, store, tmp_path):
    model, optimizer = models.softmax(5, 3), optimizers.momentum(0.2)
    whole = fit(store, model, optimizer, iterations=9, dask_client=dask_client)

    def crash_at_7(record):
        if record["iteration"] == 7:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between writes) leaves behind

    with pytest.raises(KeyboardInterrupt):
        fit(store, model, optimizer, iterations=9, dask_client=dask_client, out=tmp_path,
            checkpoint_every=3, on_record=crash_at_7)
    assert rundir.load_checkpoint(tmp_path)[1]["iteration"] == 6
    resumed = fit(store, model, optimizer, iterations=9, dask_client=dask_client, out=tmp_path,
                  checkpoint_every=3, resume=True)
    assert resumed.params.tobytes() == whole.params.tobytes()
    assert [r["iteration"] for r in rundir.read_metrics(tmp_path)] == list(range(10))


def test_checkpoint_holds_optimizer_state_and_seed(dask_client, store, tmp_path):
    fit(store, models.softmax(5, 3), optimizers.adam(0.1), iterations=3, seed=5,
        dask_client=dask_client, out=tmp_path)
    arrays, meta = rundir.load_checkpoint(tmp_path)
    assert meta["iteration"] == 3 and meta["seed"] == 5 and meta["kind"] == "full-batch"
    assert {"params", "opt/step", "opt/mu", "opt/nu"} <= set(arrays)
    assert int(arrays["opt/step"]) == 3


def test_resume_refuses_another_runs_checkpoint(dask_client, store, tmp_path):
    fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=2, dask_client=dask_client,
        out=tmp_path)
    with pytest.raises(ValidationError, match="different run"):
        fit(store, models.softmax(5, 3), lbfgs(), iterations=4, dask_client=dask_client,
            out=tmp_path, resume=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_stops_and_keeps_last_good_checkpoint(dask_client, small_store, tmp_path):
    url = small_store("synthetic:regression?n_samples=300&n_features=4&seed=0", chunk_rows=100)
    with pytest.raises(TrainingError, match=r"became (nan|inf) at iteration \d+.*checkpoint"):
        fit(url, models.linear(4), optimizers.sgd(1e4), iterations=200, dask_client=dask_client,
            out=tmp_path, checkpoint_every=1)
    arrays, meta = rundir.load_checkpoint(tmp_path)
    assert np.all(np.isfinite(arrays["params"])) and meta["iteration"] >= 1


def test_missing_chunk_is_a_store_error(dask_client, store):
    os.remove(Path(store) / "X" / "c" / "3" / "0")
    with pytest.raises(StoreError, match="chunk 3"):
        fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=2, dask_client=dask_client)


@pytest.mark.parametrize("kwargs,match", [
    ({"iterations": 3, "epochs": 2}, "exactly one"),
    ({"iterations": 0}, "positive integer"),
    ({"iterations": 3, "test_fraction": 1.0}, "test-fraction"),
    ({"iterations": 3, "cache": "disk"}, "--cache"),
    ({"iterations": 3, "batch_size": 10}, "needs --epochs"),
])
def test_bad_arguments(dask_client, store, kwargs, match):
    with pytest.raises(ValidationError, match=match):
        fit(store, models.softmax(5, 3), optimizers.sgd(0.1), dask_client=dask_client, **kwargs)


def test_model_must_fit_the_task(dask_client, store):
    with pytest.raises(ValidationError, match="does not fit"):
        fit(store, models.linear(5), optimizers.sgd(0.1), iterations=1, dask_client=dask_client)
    with pytest.raises(ValidationError, match="does not fit"):
        fit(store, models.logistic(5), optimizers.sgd(0.1), iterations=1, dask_client=dask_client)


def test_lbfgs_converges_and_stops_on_tol(dask_client, store):
    result = fit(store, models.softmax(5, 3, l2=1e-2), lbfgs(), iterations=100, tol=1e-10,
                 dask_client=dask_client)
    assert result.summary["stopped"] in ("tol", "line-search")
    assert result.summary["iterations"] < 100
    losses = [r["train_loss"] for r in result.metrics]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:], strict=False))  # monotone


def test_regression_metrics_and_no_test_set(dask_client, small_store):
    url = small_store("synthetic:regression?n_samples=400&n_features=3&seed=1", chunk_rows=100)
    result = fit(url, models.linear(3), lbfgs(), iterations=30, dask_client=dask_client)
    assert result.metrics[-1]["test_r2"] > 0.99 and "test_rmse" in result.metrics[-1]
    all_rows = fit(url, models.linear(3), lbfgs(), iterations=3, dask_client=dask_client,
                   test_fraction=0.0)
    assert all_rows.summary["n_train"] == 400
    assert not any(k.startswith("test_") for k in all_rows.metrics[-1])


def test_streaming_holds_no_chunk_between_passes(dask_client, small_store):
    url = small_store("synthetic:classification?n_samples=4000&n_features=20&n_classes=2&seed=0",
                      chunk_rows=500)
    chunk_bytes = 500 * 21 * 8

    def held_bytes(dask_scheduler):
        return sum(ts.nbytes for ts in dask_scheduler.tasks.values() if ts.state == "memory")

    seen = []
    result = fit(url, models.logistic(20), optimizers.sgd(0.5), iterations=3, cache="stream",
                 dask_client=dask_client,
                 on_record=lambda r: seen.append(dask_client.run_on_scheduler(held_bytes)))
    assert result.summary["cache"] == "stream"
    assert max(seen) < chunk_bytes  # only the broadcast model and small sums stay in memory


def test_epoch_batches_visit_every_row_once():
    counts = [5, 0, 7, 3]
    batches = epoch_batches(counts, 4, seed=3, epoch=2)
    seen = sorted((c, int(r)) for batch in batches for c, rows in batch for r in rows)
    assert seen == sorted((c, r) for c, n in enumerate(counts) for r in range(n))
    assert all(sum(len(rows) for _, rows in b) == 4 for b in batches[:-1])
    assert epoch_batches(counts, 4, seed=3, epoch=2)[0][0][1].tolist() == batches[0][0][1].tolist()
    assert epoch_batches(counts, 4, seed=3, epoch=3) != batches


def test_minibatch_is_deterministic_and_learns(dask_client, store):
    runs = [fit(store, models.softmax(5, 3), optimizers.sgd(0.2), epochs=3, batch_size=50,
                dask_client=dask_client, seed=1, chunks_per_task=k) for k in (1, 4)]
    assert runs[0].params.tobytes() == runs[1].params.tobytes()
    assert runs[0].metrics[-1]["train_loss"] < runs[0].metrics[0]["train_loss"]
    assert runs[0].metrics[-1]["steps"] == 3 * -(-runs[0].summary["n_train"] // 50)


def test_joins_a_running_scheduler(dask_client, store):
    address = dask_client.scheduler.address
    result = fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=1,
                 scheduler=address)
    assert result.summary["n_workers"] == 2
    assert dask_client.status == "running"  # the shared cluster is left running


def test_each_iteration_is_a_span(dask_client, store):
    fit(store, models.softmax(5, 3), optimizers.sgd(0.1), iterations=2, dask_client=dask_client)

    def span_names(dask_scheduler):
        return {name for span in dask_scheduler.extensions["spans"].spans.values()
                for name in span.name}

    assert {"iteration-0", "iteration-1", "iteration-2"} <= dask_client.run_on_scheduler(span_names)


def test_split_modules_keep_the_public_names():
    import fedpipe.engine.train as train
    from fedpipe.engine import train_data, train_pass, train_records

    assert train.fit.__module__ == "fedpipe.engine.train" and train.Run._fields[0] == "params"
    for name in train.__all__:
        assert hasattr(train, name), name
    assert train.choose_cache is train_data.choose_cache
    assert train.full_pass is train_pass.full_pass and train.emit is train_records.emit
