"""Secure aggregation on a real cluster: digits FedAvg, dropouts, abort, resume, CLI."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from fedpipe.data import store
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.errors import ValidationError
from fedpipe.tasks import aggregate, local, models, secagg, secure
from test_federate_support import partitioned_store

N = 9
SEED = 4


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("secagg") / "digits.zarr")
    return partitioned_store(path, source="sklearn:digits", clients=N, chunk_rows=200,
                             name="fed", standardize=True)


@pytest.fixture(scope="module")
def dask_client(digits):
    info = store.read_info(digits)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    with placement.simulation_cluster(placement.assign_clients(rows, 2), processes=False,
                                      dashboard_address=":0") as dc:
        yield dc


def _model():
    return models.softmax(64, 10, l2=1e-3)


def _secure(**kw):
    return (*aggregate.default_chain(), secure.secure_sum(N, **kw))


def _run(digits, dask_client, stages=None, rounds=2, **kw):
    return federate(digits, _model(), rounds=rounds, local_epochs=1, batch_size=10_000,
                    lr=0.5, dask_client=dask_client, seed=SEED, eval_every=rounds,
                    stages=stages, **kw)


def test_secure_fedavg_ends_within_encoding_error_of_plaintext(digits, dask_client):
    plain = _run(digits, dask_client, rounds=3)
    safe = _run(digits, dask_client, _secure(), rounds=3)
    enc = secure.find(_secure()).encoding
    # per round: N rounding errors of half a step on delta * n, divided by the rows summed
    assert np.abs(safe.params - plain.params).max() < 3 * N * 0.5 / enc.scale
    assert not np.array_equal(safe.params, plain.params)  # it did go through the encoding
    assert safe.metrics[-1]["test_accuracy"] == pytest.approx(plain.metrics[-1]["test_accuracy"])
    stats = safe.metrics[0]["secagg"]
    assert stats["masked"] == N and stats["dropped"] == 0 and stats["threshold"] == 5
    # masked uint32 update plus keys and shares, against the float64 update it replaces
    assert stats["bytes_per_client"] <= 1.2 * 8 * _model().n_params
    assert safe.summary["secagg"]["masked"] == 3 * N


def test_dropouts_after_upload_leave_the_sum_exact(digits, dask_client):
    whole = _run(digits, dask_client, _secure())
    dropped = _run(digits, dask_client, _secure(dropout=1 / 3, dropout_phase="unmask"))
    np.testing.assert_array_equal(dropped.params, whole.params)  # same sum, bit for bit
    stats = dropped.metrics[0]["secagg"]
    assert stats["dropped_after_upload"] == N // 3 and stats["masked"] == N
    assert len(dropped.metrics[0]["dropped"]) == N // 3


@pytest.mark.parametrize("rate", [1 / N, 1 / 3])
def test_dropouts_at_upload_give_the_exact_sum_of_survivors(digits, dask_client, rate):
    run = _run(digits, dask_client, _secure(dropout=rate, dropout_phase="upload"), rounds=1)
    gone = set(run.metrics[0]["dropped"])
    assert len(gone) == round(rate * N) and run.metrics[0]["secagg"]["recovered"] == len(gone)
    enc, model = secure.find(_secure()).encoding, _model()
    p0, total, rows = model.init(SEED), np.zeros(model.n_params, np.uint32), 0.0
    info = store.read_info(digits)
    for c in sorted(set(info.partitions["fed"]["clients"]) - gone):  # serial reference
        parts = [store.read_chunk(digits, ref, split="train", test_fraction=0.2, seed=SEED,
                                  info=info) for ref in store.chunk_refs(info, "fed", int(c))]
        X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        result = local.local_train(model, p0, X, y, epochs=1, batch_size=10_000, lr=0.5,
                                   rng=local.client_rng(SEED, 0, c))
        total += secagg.encode(result.packet["delta"] * result.packet["n"], enc)
        rows += float(result.packet["n"])
    np.testing.assert_allclose(run.params, p0 + secagg.decode(total, enc) / rows,
                               rtol=1e-12, atol=1e-14)


def test_fewer_than_threshold_survivors_abort_with_the_model_unchanged(digits, dask_client):
    run = _run(digits, dask_client, _secure(threshold=N, dropout=1 / N, dropout_phase="unmask"))
    np.testing.assert_array_equal(run.params, _model().init(SEED))
    assert all("fewer than the threshold 9" in r["secagg"]["aborted"] for r in run.metrics)
    assert run.summary["secagg"]["rounds_aborted"] == 2


def test_a_sum_that_could_wrap_or_a_misplaced_stage_is_refused(digits, dask_client):
    small = (*aggregate.default_chain(), secure.secure_sum(4))
    with pytest.raises(ValidationError, match="at most 4 clients but 9"):
        _run(digits, dask_client, small)
    with pytest.raises(ValidationError, match="last stage"):
        _run(digits, dask_client, (secure.secure_sum(N), aggregate.weighted_mean()))


def test_resume_mid_run_ends_bit_identical(digits, dask_client, tmp_path):
    kw = dict(stages=_secure(dropout=0.2), fraction=0.8)
    whole = _run(digits, dask_client, rounds=4, out=str(tmp_path / "whole"), **kw)
    _run(digits, dask_client, rounds=2, checkpoint_every=1, out=str(tmp_path / "cut"), **kw)
    resumed = _run(digits, dask_client, rounds=4, out=str(tmp_path / "cut"), resume=True, **kw)
    np.testing.assert_array_equal(resumed.params, whole.params)
    assert [r["round"] for r in resumed.metrics] == [2, 3]


def test_cli_secure_aggregation(digits, tmp_path, capsys):
    from fedpipe.cli.main import main

    out = tmp_path / "run"
    code = main(["federate", digits, "--partition", "fed", "--model", "softmax", "--rounds", "2",
                 "--workers", "1", "--secure-aggregation", "--secagg-threshold", "4",
                 "--secagg-graph", "sparse", "--dropout", "0.2", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["secagg"]["rounds_aborted"] == 0  # 2 of 9 drop a round: 1 before upload, 1 after
    assert summary["secagg"]["dropped"] == 2 and summary["secagg"]["dropped_after_upload"] == 2
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["secure_aggregation"] is True and saved["secagg_graph"] == "sparse"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["secagg"]["masked"] for r in records] == [8, 8]
    for flags, culprit in ((["--dropout", "0.2"], "--dropout only apply"),
                           (["--secure-aggregation", "--secagg-bits", "70"], "bits")):
        assert main(["federate", digits, "--partition", "fed", "--model", "softmax",
                     "--rounds", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err
