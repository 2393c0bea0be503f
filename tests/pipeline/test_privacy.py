"""DP, robust aggregation and compression in real federated runs, and the accountant."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from fedpipe import privacy
from fedpipe.data import store
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.tasks import aggregators, models, stages
from test_federate_support import partitioned_store

SOURCE = "synthetic:classification?n_samples=800&n_features=5&n_classes=3&seed=1"
N_CLIENTS = 8


# ---------------------------------------------------------------------------------- accountant


@pytest.mark.parametrize("q, rounds, rdp_eps, pld_eps", [(0.01, 1000, 2.1014, 1.8282),
                                                          (0.1, 100, 7.9039, 7.0466)])
def test_accountant_reference_values_poisson(q, rounds, rdp_eps, pld_eps):
    import dp_accounting as dpa

    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(1.0))
    rdp = privacy.epsilon(event, rounds, 1e-5, "rdp", relation="add_or_remove_one")
    assert rdp == pytest.approx(rdp_eps, abs=1e-4)
    assert privacy.epsilon(event, rounds, 1e-5, "pld") == pytest.approx(pld_eps, abs=1e-4)


def test_accountant_reference_value_k_of_n_without_replacement():
    # The run's own event: k = 100 of N = 10,000, z = 2 on a clip S is a noise multiplier of
    # 1 over the replace-one sensitivity 2 S: the reference ε 3.5761 at T = 1000.
    acc = privacy.Accountant(privacy.DpSetup("central", 2.0, 10_000, 100, 1e-5))
    assert "SampledWithoutReplacementDpEvent" in acc.describe()["event"]
    assert acc.describe()["accountant"] == "rdp"
    assert acc.epsilon(1000) == pytest.approx(3.5761, abs=1e-4)
    assert acc.epsilon(1000) == pytest.approx(privacy.epsilon(acc.event, 1000, 1e-5), rel=1e-12)


def test_pld_agrees_with_prv_accountant():
    import dp_accounting as dpa
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    event = dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0))
    ours = privacy.epsilon(event, 1000, 1e-5, "pld")
    prv = PRVAccountant(PoissonSubsampledGaussianMechanism(noise_multiplier=1.0,
                                                           sampling_probability=0.01),
                        max_self_compositions=1000, eps_error=0.01, delta_error=1e-10)
    low, _, high = prv.compute_epsilon(delta=1e-5, num_self_compositions=[1000])
    assert low - 0.01 <= ours <= high + 0.01


@pytest.mark.parametrize("mode, z, per_round, rounds", [
    ("central", 1.0, 100, 1), ("central", 1.0, 100, 100), ("central", 0.7, 100, 50),
    ("local", 2.0, 10, 1000), ("local", 5.0, 10, 3)])
def test_gaussian_epsilon_is_the_composed_pld_in_closed_form(mode, z, per_round, rounds):
    # Every client every round (central) and local DP compose Gaussian mechanisms: the
    # accountant's closed form must give what composing dp-accounting's PLD gives.
    setup = privacy.DpSetup(mode, z, 100, per_round, 1e-5)
    acc = privacy.Accountant(setup)
    assert acc.name == "pld"
    composed = privacy.epsilon(acc.event, rounds, 1e-5, "pld")
    assert acc.epsilon(rounds) == pytest.approx(composed, rel=1e-7)


def test_calibrate_spends_at_most_the_target():
    setup = privacy.DpSetup("central", 1.0, 100, 10, 1e-5)
    z = privacy.calibrate(setup, 20, 4.0)
    acc = privacy.Accountant(setup._replace(noise_multiplier=z))
    assert 3.9 <= acc.epsilon(20) <= 4.0 + 1e-6


# ---------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def fed_store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("priv") / "store.zarr")
    return partitioned_store(path, source=SOURCE, clients=N_CLIENTS, chunk_rows=50, name="fed")


@pytest.fixture(scope="module")
def dask_client(fed_store):
    info = store.read_info(fed_store)
    rows = {c: m["n_rows"] for c, m in info.partitions["fed"]["clients"].items()}
    with placement.simulation_cluster(placement.assign_clients(rows, 2), processes=False,
                                      dashboard_address=":0") as dc:
        yield dc


def _model():
    return models.softmax(5, 3, l2=0.01)


def _dp_chain(k=4, z=0.8, s=0.5, seed=7, extra=()):
    return (stages.validate(), stages.clip(s), *extra, stages.dp_mean(k),
            stages.gaussian_noise(z, s, seed=seed))


def test_central_dp_reports_epsilon_every_round(fed_store, dask_client):
    run = federate(fed_store, _model(), rounds=3, lr=0.1, clients_per_round=4,
                   stages=_dp_chain(), dask_client=dask_client, seed=1)
    eps = [r["epsilon"] for r in run.metrics]
    assert eps == sorted(eps) and eps[0] > 0
    acc = privacy.Accountant(privacy.DpSetup("central", 0.8, N_CLIENTS, 4, 1e-5))
    assert eps == [acc.epsilon(t) for t in (1, 2, 3)]
    dp = run.summary["privacy"]
    assert dp["epsilon"] == eps[-1] and "SampledWithoutReplacement" in dp["event"]
    assert dp["noise_source"].startswith("run seed") and dp["weights"] == "uniform"
    assert all(r["aggregation"]["noise/std"] == pytest.approx(0.4) for r in run.metrics)


def test_resume_with_the_dp_ledger_and_topk_residual_is_bit_identical(fed_store, dask_client,
                                                                      tmp_path):
    def chain():  # OS entropy: the key exists only in the run's state and its checkpoint
        return (stages.validate(), stages.clip(0.5), stages.topk(0.2, bound=0.5),
                stages.dp_mean(4), stages.gaussian_noise(0.8, 0.5))

    kwargs = dict(lr=0.1, clients_per_round=4, dask_client=dask_client, seed=2)
    federate(fed_store, _model(), rounds=2, checkpoint_every=1, out=str(tmp_path / "cut"),
             stages=chain(), **kwargs)
    ckpt = np.load(tmp_path / "cut" / "checkpoint.npz")
    assert any(k.endswith("local/compress/residual") for k in ckpt.files)
    assert "stage/noise/key" in ckpt.files
    resumed = federate(fed_store, _model(), rounds=4, resume=True, out=str(tmp_path / "cut"),
                       stages=chain(), **kwargs)
    # the uninterrupted reference runs with the checkpoint's key (same ledger, same noise)
    key = ckpt["stage/noise/key"]
    seeded = (stages.validate(), stages.clip(0.5), stages.topk(0.2, bound=0.5),
              stages.dp_mean(4), stages.gaussian_noise(0.8, 0.5)._replace(
                  init=lambda n: {"key": key, "round": np.asarray(0, dtype=np.int64)}))
    whole = federate(fed_store, _model(), rounds=4, stages=seeded, **kwargs)
    np.testing.assert_array_equal(resumed.params, whole.params)
    assert resumed.summary["privacy"]["epsilon"] == whole.summary["privacy"]["epsilon"]
    assert resumed.summary["privacy"]["noise_source"] == "OS entropy (secrets)"


def test_budget_stops_before_the_round_that_would_pass_it(fed_store, dask_client):
    acc = privacy.Accountant(privacy.DpSetup("central", 0.8, N_CLIENTS, 4, 1e-5))
    target = (acc.epsilon(2) + acc.epsilon(3)) / 2
    run = federate(fed_store, _model(), rounds=5, lr=0.1, clients_per_round=4,
                   stages=_dp_chain(), target_epsilon=target, dask_client=dask_client)
    assert len(run.metrics) == 2 and run.metrics[-1]["epsilon"] <= target
    assert "round 2 would bring ε" in run.summary["stopped"]
    with pytest.raises(ValidationError, match="budget already spent"):
        federate(fed_store, _model(), rounds=5, clients_per_round=4, stages=_dp_chain(),
                 target_epsilon=acc.epsilon(1) / 2, dask_client=dask_client)


@pytest.mark.parametrize("chain, match", [
    ((stages.validate(), stages.clip(0.5), stages.dp_mean(4), stages.gaussian_noise(1, 0.5),
      aggregators.median()), "breaks the sensitivity"),
    ((stages.validate(), stages.clip(0.5), stages.weighted_mean(),
      stages.gaussian_noise(1, 0.5)), "fixed-denominator"),
    ((stages.validate(), stages.clip(2.0), stages.dp_mean(4), stages.gaussian_noise(1, 0.5)),
     "no clip stage bounds"),
])
def test_inconsistent_dp_chains_are_refused_before_round_0(fed_store, dask_client, chain, match):
    with pytest.raises(ValidationError, match=match):
        federate(fed_store, _model(), rounds=1, stages=chain, dask_client=dask_client)


def _attacker_model(scale):
    """Client updates multiplied by ``scale`` on one client's batches (a scaled-update attack)."""
    inner = _model()
    marker: dict = {}

    def loss_and_grad(p, X, y):
        loss, g, n = inner.loss_and_grad(p, X, y)
        if "x" in marker and np.any(np.all(X == marker["x"], axis=1)):
            g = g * scale
        return loss, g, n

    return inner._replace(loss_and_grad=loss_and_grad), marker


def test_scaled_attacker_is_bounded_by_the_clip_in_a_real_run(fed_store, dask_client):
    info = store.read_info(fed_store)
    ref = store.chunk_refs(info, partition="fed", client="3")[0]
    row = store.read_chunk(fed_store, ref, split="train", test_fraction=0.2, seed=0, info=info)[0][0]
    model, marker = _attacker_model(1e6)
    marker["x"] = row
    bound = 0.05
    chain = (stages.validate(), stages.clip(bound), stages.dp_mean(N_CLIENTS))
    before = model.init(0)
    run = federate(fed_store, model, rounds=1, lr=0.1, stages=chain, dask_client=dask_client)
    # every client's contribution has norm <= S, the mean moves at most S
    assert np.linalg.norm(run.params - before) <= bound * (1 + 1e-9)
    assert run.metrics[0]["aggregation"]["clip/clipped"] >= 1
    plain = federate(fed_store, model, rounds=1, lr=0.1, dask_client=dask_client)
    assert np.linalg.norm(plain.params - before) > 100 * bound


def test_diverging_loss_stops_naming_the_round_and_clients(fed_store, dask_client):
    with pytest.raises(TrainingError, match=r"round \d+: the global training loss .*\(diverged\)"
                                            r"; clients aggregated: 0, 1, 2"):
        federate(fed_store, _model(), rounds=6, lr=200.0, strategy=None,
                 dask_client=dask_client, diverge_factor=1.5)


@pytest.mark.parametrize("rule", [aggregators.median(), aggregators.trimmed_mean(0.25)],
                         ids=["median", "trimmed-mean"])
@pytest.mark.parametrize("eval_every", [1, 3], ids=["fused-eval", "train-only"])
def test_coordinate_rules_run_by_column_blocks_on_the_workers_bit_identical(
        fed_store, dask_client, monkeypatch, rule, eval_every):
    # The driver gets one result per column block, not every client's row; the bits are those
    # of the rule on the stacked rows (the path taken when the blocks are turned off).
    from fedpipe.engine import fed_round

    calls = []
    real = fed_round._column_sum
    monkeypatch.setattr(fed_round, "_column_sum",
                        lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    kwargs = dict(rounds=3, lr=0.1, stages=(stages.validate(), rule), eval_every=eval_every,
                  dask_client=dask_client)
    blocks = federate(fed_store, _model(), **kwargs)
    assert calls and set(calls) <= {"round", "train"}
    monkeypatch.setattr(fed_round, "_columns", lambda spec, leaves: None)
    whole = federate(fed_store, _model(), **kwargs)
    np.testing.assert_array_equal(blocks.params, whole.params)
    assert [r["aggregation"] for r in blocks.metrics] == [r["aggregation"] for r in whole.metrics]
    assert [r.get("test_loss") for r in blocks.metrics] == [r.get("test_loss")
                                                            for r in whole.metrics]


def test_robust_aggregator_and_compression_in_a_real_run(fed_store, dask_client):
    chain = (stages.validate(), stages.int8(seed=1), aggregators.trimmed_mean(0.25))
    records: list[dict] = []
    run = federate(fed_store, _model(), rounds=2, lr=0.1, stages=chain, dask_client=dask_client,
                   on_record=records.append)
    record = records[-1]
    assert record["aggregation"]["trimmed_mean/gathered"] == N_CLIENTS
    d = _model().n_params
    # int8 codes plus an 8-byte scale per client (>= 7x fewer than float64 once d >= 56)
    assert record["aggregation"]["compress/bytes"] == N_CLIENTS * (d + 8)
    # + three float64 counters: the row count, validate's and compress's
    assert all(c["update_bytes"] == d + 8 + 24 for c in record["clients"].values()
               if "update_bytes" in c)
    assert run.summary["update_bytes"] == d + 32
    assert [s["kind"] for s in run.summary["stages"]] == ["validate", "int8", "trimmed_mean"]


def test_cli_privacy_flags_saved_and_refused_in_one_line(tmp_path, capsys):
    from fedpipe.cli.main import main

    path = partitioned_store(str(tmp_path / "s.zarr"), source=SOURCE, clients=4, chunk_rows=100,
                             name="p")
    out = tmp_path / "run"
    code = main(["federate", path, "--model", "softmax", "--rounds", "2", "--workers", "1",
                 "--partition", "p", "--clients-per-round", "2", "--dp", "central", "--clip",
                 "0.5", "--target-epsilon", "30", "--delta", "1e-3", "--compress", "topk:0.25",
                 "--reproducible-noise", "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["privacy"]["epsilon"] <= 30 and summary["privacy"]["delta"] == 1e-3
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["dp"] == "central" and saved["clip"] == "0.5" and saved["compress"] == "topk:0.25"
    assert saved["noise_multiplier"] > 0 and saved["target_epsilon"] == 30
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["epsilon"] > 0 and r["update_bytes"] > 0 for r in records)
    for flags, culprit in ((["--dp", "central", "--clip", "1", "--noise-multiplier", "1",
                             "--aggregator", "krum"], "--aggregator krum"),
                           (["--dp", "local", "--noise-multiplier", "1"], "needs --clip"),
                           (["--clip", "1", "--noise-multiplier", "1"], "needs --dp"),
                           (["--compress", "zip"], "unknown --compress 'zip'"),
                           (["--dp", "central", "--clip", "adaptive", "--noise-multiplier", "3"],
                            "whole budget")):
        assert main(["federate", path, "--model", "softmax", "--rounds", "1", "--partition",
                     "p", "--workers", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err, err
