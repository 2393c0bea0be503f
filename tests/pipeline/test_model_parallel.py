"""Model-parallel training (issue 20) on a real cluster and real 2-D chunked stores.

The weights are sharded by feature block across workers; training must equal data-parallel
``fit`` on the same store, resume from per-shard checkpoints, and rebuild the shards of a
worker process that was killed.
"""

from __future__ import annotations

import json
import os
import signal

import dask
import fedpipe as fp
import numpy as np
import pytest
from distributed import Client, LocalCluster
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest_arrays

N, D = 480, 12


class _Stop(Exception):
    """Raised from on_record: the run stops there, as a killed driver would."""


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(N, D))
    w = rng.normal(size=D)
    out = {}
    base = tmp_path_factory.mktemp("mp")
    targets = {"multiclass": np.argmax(X @ rng.normal(size=(D, 3)), axis=1),
               "binary": (X @ w > 0).astype(int), "regression": X @ w + 0.1 * rng.normal(size=N)}
    for task, y in targets.items():
        out[task] = str(base / f"{task}.zarr")
        ingest_arrays(X, y, out[task], chunk_rows=60, feature_chunks=4, task=task,
                      standardize=True)
    return out


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


MODELS = {"multiclass": lambda: fp.models.softmax(D, 3, l2=0.01),
          "binary": lambda: fp.models.logistic(D, l2=0.01),
          "regression": lambda: fp.models.linear(D, l1=0.001)}


@pytest.mark.parametrize("task", list(MODELS))
def test_sharded_training_equals_data_parallel(stores, dask_client, task, tmp_path):
    model, opt = MODELS[task](), fp.optimizers.adam(0.05)
    dp = fp.fit(stores[task], model, opt, iterations=8, dask_client=dask_client,
                out=tmp_path / "dp")
    mp = fp.fit(stores[task], model, opt, iterations=8, dask_client=dask_client,
                shard_parameters=True, shards=3, out=tmp_path / "run")
    assert _rel(mp.params, dp.params) < 1e-10
    for a, b in zip(mp.metrics, dp.metrics, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
        assert a["n_train"] == b["n_train"]
    assert mp.summary["model_parallel"]["shards"] == 3
    assert mp.summary["model_parallel"]["bounds"] == [[0, 3], [3, 9], [9, 12]]  # chunk edges
    # params.npz, model.json, preprocess.json: a sharded run predicts as any run
    X = np.random.default_rng(0).normal(size=(5, D))
    np.testing.assert_allclose(fp.load_run(tmp_path / "run").predict(X),
                               fp.load_run(tmp_path / "dp").predict(X), rtol=1e-9)
    # each shard's block was written by its worker; the driver's checkpoint holds the rest
    assert sorted(p.name for p in (tmp_path / "run" / "shards" / "8").iterdir()) == [
        "shard-0.npz", "shard-1.npz", "shard-2.npz"]


def test_resume_from_shard_checkpoints_is_bit_identical(stores, dask_client, tmp_path):
    store, model, opt = stores["multiclass"], MODELS["multiclass"](), fp.optimizers.adam(0.05)
    whole = fp.fit(store, model, opt, iterations=7, dask_client=dask_client,
                   shard_parameters=True, shards=2)

    def stop(record):
        if record["iteration"] == 5:
            raise _Stop

    with pytest.raises(_Stop):
        fp.fit(store, model, opt, iterations=7, dask_client=dask_client, shard_parameters=True,
               shards=2, out=tmp_path / "run", checkpoint_every=2, on_record=stop)
    assert rundir.load_checkpoint(tmp_path / "run")[1]["iteration"] == 4
    resumed = fp.fit(store, model, opt, iterations=7, dask_client=dask_client,
                     shard_parameters=True, shards=2, out=tmp_path / "run", resume=True,
                     checkpoint_every=2)
    assert np.array_equal(resumed.params, whole.params)
    assert [r["iteration"] for r in rundir.read_metrics(tmp_path / "run")] == list(range(8))
    with pytest.raises(fp.ValidationError, match="--shards 2"):
        fp.fit(store, model, opt, iterations=9, dask_client=dask_client, shard_parameters=True,
               shards=3, out=tmp_path / "run", resume=True)


def test_cli_model_parallel_and_its_one_line_refusals(stores, dask_client, tmp_path, capsys):
    base = ["train", stores["multiclass"], "--iterations", "3", "--scheduler",
            dask_client.scheduler.address]
    assert main([*base, "--model", "softmax", "--model-parallel", "--shards", "2",
                 "--out", str(tmp_path / "cli"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_parallel"]["shards"] == 2 and summary["iterations"] == 3
    assert "model_parallel = true" in (tmp_path / "cli" / "config.toml").read_text()
    for extra, culprit in ([["--model", "softmax", "--shards", "2"], "--model-parallel"],
                           [["--model", "mlp", "--model-parallel"], "mlp"],
                           [["--model", "softmax", "--model-parallel", "--shards", "13"],
                            "--shards"]):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err, err


def test_parameters_over_a_workers_memory_train_sharded_and_data_parallel_refuses(tmp_path):
    # softmax 1,500 x 50 with Adam: parameters and state 1.8 MB, 1.4x a worker's 1.25 MB limit
    from fedpipe.engine import shard_worker

    wide, limit = str(tmp_path / "wide.zarr"), 1_250_000
    rng = np.random.default_rng(0)
    ingest_arrays(rng.normal(size=(60, 1500)), np.arange(60) % 50, wide, chunk_rows=30,
                  task="multiclass", feature_chunks=2)
    model, opt = fp.models.softmax(1500, 50), fp.optimizers.adam(0.1)
    assert 1.4 * limit < model.n_params * 8 * 3
    # the memory monitor would pause in-process workers whose process exceeds a limit this small
    quiet = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause",
                                                                "terminate")}
    with dask.config.set(quiet), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=False, memory_limit=limit,
                         dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as dc:
        with pytest.raises(fp.ValidationError, match="--model-parallel"):
            fp.fit(wide, model, opt, iterations=1, dask_client=dc)
        held: dict = {}

        def measure(record):
            owners = {r: a for a, w in dc.scheduler_info(n_workers=-1)["workers"].items()
                      for r, q in w["resources"].items() if q and r.startswith("client-mp")}
            sizes = dc.run(lambda: {j: e["W"].nbytes + sum(v.nbytes for v in e["state"].values())
                                    for (_, j), e in shard_worker.SHARDS.items()})
            held.update(owners=owners, sizes=next(iter(sizes.values())))

        fp.fit(wide, model, opt, iterations=2, dask_client=dc, shard_parameters=True, shards=2,
               on_record=measure)
    # each shard on its own worker, holding less than that worker's limit
    assert len(set(held["owners"].values())) == 2
    assert all(size < limit for size in held["sizes"].values())
    assert sum(held["sizes"].values()) > 1.4 * limit


@pytest.mark.slow
@pytest.mark.chaos  # worker processes, one SIGKILLed and restarted (~10 s)
def test_a_killed_workers_shard_is_rebuilt_from_the_checkpoint(stores, tmp_path):
    store, model, opt = stores["multiclass"], MODELS["multiclass"](), fp.optimizers.adam(0.05)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as dc:
        whole = fp.fit(store, model, opt, iterations=8, dask_client=dc, shard_parameters=True,
                       shards=2)
        pids = dc.run(os.getpid)

        def kill(record):
            # after record 4; the last checkpoint is iteration 4's (checkpoint_every=2)
            if record["iteration"] == 4 and not killed:
                workers = dc.scheduler_info(n_workers=-1)["workers"]
                victim = next(a for a, w in workers.items()
                              if w.get("resources", {}).get("client-mp1"))
                os.kill(pids[victim], signal.SIGKILL)  # the worker process holding shard 1
                killed.append(victim)

        killed: list[str] = []
        result = fp.fit(store, model, opt, iterations=8, dask_client=dc, shard_parameters=True,
                        shards=2, out=tmp_path / "run", checkpoint_every=2, on_record=kill)
    assert killed
    assert result.summary["rebuilt"] and result.summary["rebuilt"][0]["from_iteration"] == 4
    assert np.array_equal(result.params, whole.params)
    assert [r["iteration"] for r in rundir.read_metrics(tmp_path / "run")] == list(range(9))


def test_sparse_csr_chunks_train_as_the_dense_store(dask_client, tmp_path):
    import scipy.sparse as sp

    rng = np.random.default_rng(5)
    X = sp.random(300, 40, density=0.1, format="csr", random_state=5)
    y = (X @ rng.normal(size=40) > 0).astype(int)
    dense, sparse = str(tmp_path / "dense.zarr"), str(tmp_path / "sparse.zarr")
    ingest_arrays(X.toarray(), y, dense, chunk_rows=50, task="binary")
    info = fp.ingest_sparse(X, y, sparse, chunk_rows=50, feature_chunks=4)
    assert info.sparse["nnz"] == X.nnz and info.task == "binary"
    model, opt = fp.models.logistic(40, l2=0.01), fp.optimizers.adam(0.1)
    dp = fp.fit(dense, model, opt, iterations=6, dask_client=dask_client)
    mp = fp.fit(sparse, model, opt, iterations=6, dask_client=dask_client,
                shard_parameters=True, shards=2)
    assert _rel(mp.params, dp.params) < 1e-10
    with pytest.raises(fp.ValidationError, match="--model-parallel"):
        fp.fit(sparse, model, opt, iterations=1, dask_client=dask_client)


def test_a_sparse_run_predicts_on_csr_dense_rows_and_its_store_and_exports(dask_client, tmp_path,
                                                                          capsys):
    """The model of a sparse store's run: the same predictions from a CSR matrix, dense rows,
    the store (Python and ``fedpipe predict``, with test metrics) and its ONNX export."""
    import onnxruntime
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(6)
    X = sp.random(240, 64, density=0.1, format="csr", random_state=6)
    y = np.asarray(X @ rng.normal(size=(64, 3))).argmax(axis=1)
    store, out = str(tmp_path / "sparse.zarr"), tmp_path / "run"
    fp.ingest_sparse(X, y, store, chunk_rows=60, feature_chunks=2)
    fp.fit(store, fp.models.softmax(64, 3), fp.optimizers.adam(0.1), iterations=8,
           dask_client=dask_client, shard_parameters=True, out=str(out))
    run = fp.load_run(out)
    expected = run.predict(X)
    assert (expected == y).mean() > 0.6  # trained, not a constant
    np.testing.assert_array_equal(run.predict(X.toarray()), expected)
    np.testing.assert_array_equal(run.predict(store), expected)
    np.testing.assert_allclose(run.predict_proba(X).sum(axis=1), 1.0)
    with pytest.raises(fp.ValidationError, match="expects"):
        run.predict(X[:, :10])
    assert main(["predict", str(out), store, "--out", str(tmp_path / "p.parquet"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 240 and summary["test_accuracy"] == (expected == y).mean()
    np.testing.assert_array_equal(pd.read_parquet(tmp_path / "p.parquet")["prediction"], expected)
    np.save(tmp_path / "rows.npy", X.toarray())  # dense rows from a file
    assert main(["predict", str(out), str(tmp_path / "rows.npy"), "--out",
                 str(tmp_path / "q.parquet"), "-q"]) == 0
    np.testing.assert_array_equal(pd.read_parquet(tmp_path / "q.parquet")["prediction"], expected)
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "rows.csv"), "--out",
                 str(tmp_path / "r.parquet")]) == 2  # a table has no sparse columns
    assert "sparse store" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    labels = session.run(None, {"X": X.toarray()})[0]
    np.testing.assert_array_equal(np.asarray(labels).reshape(-1), expected)


def test_hashed_text_with_2_20_features_holds_memory_of_its_nonzeros(dask_client, tmp_path):
    import scipy.sparse as sp
    from fedpipe.engine import shard_worker

    n, d, per_row = 2000, 2**20, 16  # a hashed bag of words: 16 tokens a row
    rng = np.random.default_rng(6)
    cols = rng.integers(0, d, size=(n, per_row))
    X = sp.csr_matrix((np.ones(n * per_row), cols.ravel(), np.arange(0, n * per_row + 1, per_row)),
                      shape=(n, d))
    X.sum_duplicates()
    y = (cols[:, 0] % 2).astype(int)
    store = str(tmp_path / "hashed.zarr")
    fp.ingest_sparse(X, y, store, chunk_rows=500, feature_chunks=2)
    held: list[int] = []

    def measure(record):
        def rows_bytes():
            return sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                       for entry in shard_worker.SHARDS.values()
                       for side in entry["rows"].values() for m, _ in side)
        held.append(sum(dask_client.run(rows_bytes).values()) // 2)  # in-process: counted twice

    result = fp.fit(store, fp.models.logistic(d), fp.optimizers.adam(0.5), iterations=4,
                    dask_client=dask_client, shard_parameters=True, shards=2, on_record=measure)
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    # the shards hold their rows as CSR: ~ (8 + 8) bytes per non-zero plus row pointers,
    # against 8 * rows * features = 16 GiB dense
    assert 12 * X.nnz <= held[-1] <= 20 * X.nnz + 2 * 8 * (n + 8)
