"""Data-parallel training is federated training with chunk blocks as participants (issue 12)."""

from __future__ import annotations

import fedpipe as fp
import numpy as np
import pytest
from fedpipe import rundir

CHUNK_ROWS, N_CHUNKS = 50, 6


class _Stop(Exception):
    """Raised from on_record: the run stops there, as a killed driver would."""


@pytest.fixture(scope="module")
def chunk_store(tmp_path_factory) -> str:
    # A "block" feature numbers each row's chunk, so a column partition makes one client per
    # stored chunk: the participants of data-parallel training.
    rng = np.random.default_rng(7)
    X = rng.normal(size=(CHUNK_ROWS * N_CHUNKS, 4))
    y = np.argmax(X @ rng.normal(size=(4, 3)) + rng.normal(scale=0.5, size=(len(X), 3)), axis=1)
    block = np.repeat(np.arange(N_CHUNKS), CHUNK_ROWS)[:, None].astype(float)
    path = str(tmp_path_factory.mktemp("one") / "chunks.zarr")
    from fedpipe.data.ingest import ingest_arrays

    ingest_arrays(np.hstack([X, block]), y, path, chunk_rows=CHUNK_ROWS,
                  feature_names=["a", "b", "c", "d", "block"])
    fp.partition(path, clients=N_CHUNKS, scheme="column", column="block", name="chunks")
    return path


@pytest.mark.parametrize("optimizer", [fp.optimizers.sgd(0.5), fp.optimizers.adam(0.05)],
                         ids=["sgd", "adam"])
def test_fit_equals_federate_with_chunks_as_participants(chunk_store, dask_client, optimizer):
    info = fp.read_info(chunk_store)
    clients = info.partitions["chunks"]["clients"]
    assert sorted(m["n_rows"] for m in clients.values()) == [CHUNK_ROWS] * N_CHUNKS
    model, rounds = fp.models.softmax(5, 3, l2=0.01), 4
    fitted = fp.fit(chunk_store, model, optimizer, iterations=rounds, test_fraction=0.0,
                    dask_client=dask_client)
    # Every participant every round, one full-batch sgd(1) step, weighted mean, server=optimizer.
    data_parallel = fp.strategies.Strategy("data-parallel", server=optimizer,
                                           client=fp.optimizers.sgd(1.0), local_epochs=1,
                                           stages=fp.strategies.default_chain())
    run = fp.federate(chunk_store, model, rounds=rounds, strategy=data_parallel,
                      partition="chunks", batch_size=CHUNK_ROWS, test_fraction=0.0,
                      dask_client=dask_client)
    assert [r["aggregated"] for r in run.metrics] == [N_CHUNKS] * rounds
    np.testing.assert_allclose(run.params, fitted.params, rtol=1e-10, atol=1e-13)
    assert not np.allclose(fitted.params, model.init(0))  # it did train


def test_fit_and_federate_keep_one_checkpoint_and_record_format(chunk_store, dask_client,
                                                               tmp_path):
    # One checkpoint writer and one emitter for both loops: same arrays, same meta, and the
    # checkpoint due after a record is on disk before on_record sees that record.
    model, optimizer = fp.models.softmax(5, 3, l2=0.01), fp.optimizers.adam(0.05)
    fp.fit(chunk_store, model, optimizer, iterations=4, test_fraction=0.0,
           dask_client=dask_client, out=str(tmp_path / "fit"), checkpoint_every=2)
    data_parallel = fp.strategies.Strategy("data-parallel", server=optimizer,
                                           client=fp.optimizers.sgd(1.0), local_epochs=1,
                                           stages=fp.strategies.default_chain())
    seen = []

    def stop_after_round_1(record):
        ckpt = rundir.load_checkpoint(tmp_path / "fed")
        seen.append(None if ckpt is None else ckpt[1]["round"])
        if record["round"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        fp.federate(chunk_store, model, rounds=4, strategy=data_parallel, partition="chunks",
                    batch_size=CHUNK_ROWS, test_fraction=0.0, dask_client=dask_client,
                    out=str(tmp_path / "fed"), checkpoint_every=2, on_record=stop_after_round_1)
    assert seen == [None, 2]  # round 1's record came after the checkpoint of the state it made
    fed_arrays, fed_meta = rundir.load_checkpoint(tmp_path / "fed")
    fit_arrays, fit_meta = rundir.load_checkpoint(tmp_path / "fit")
    server_side = {k for k in fed_arrays if not k.startswith("stage/")}  # + the chain's state
    assert server_side == set(fit_arrays) == {"params", "opt/step", "opt/mu", "opt/nu"}
    assert fed_meta["n_params"] == fit_meta["n_params"] == model.n_params
    assert fit_meta["iteration"] == 4 and fed_meta["round"] == 2


def test_fit_federate_and_load_run_return_one_run_type(chunk_store, dask_client, tmp_path):
    model, optimizer = fp.models.softmax(5, 3, l2=0.01), fp.optimizers.sgd(0.5)
    fitted = fp.fit(chunk_store, model, optimizer, iterations=2, dask_client=dask_client,
                    out=str(tmp_path / "fit"))
    fed = fp.federate(chunk_store, model, rounds=2, partition="chunks", dask_client=dask_client,
                      out=str(tmp_path / "fed"))
    for run, path in ((fitted, tmp_path / "fit"), (fed, tmp_path / "fed")):
        loaded = fp.load_run(path)
        assert type(run) is type(loaded) is rundir.Run
        assert run.path == loaded.path == path and run.config == loaded.config != {}
        assert run.params.tobytes() == loaded.params.tobytes()  # flat, as unpack ravels it
        assert run.named.keys() == loaded.named.keys() == model.unpack(run.params).keys()
        assert all(np.array_equal(run.named[k], loaded.named[k]) for k in run.named)
        assert run.summary == loaded.summary
        assert [r.get("round", r.get("iteration")) for r in run.metrics] == \
            [r.get("round", r.get("iteration")) for r in loaded.metrics]
    assert fed.state.round == 2 and fitted.state is None and loaded.state is None
