"""Site-local federated learning: each client's worker knows only its own store.

Stores are ingested one per site; workers are given only their own location (a ``SiteStore``
plugin here, ``FEDPIPE_SITE_STORE`` in the process test of test_no_data_leaves.py). The driver
agrees the schema, computes the statistics through the aggregation chain and trains.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.data.stats import compute_stats
from fedpipe.engine import sites
from fedpipe.errors import StoreError, ValidationError
from fedpipe.tasks import aggregate, models
from fedpipe.tasks import stats as stats_math
from sites_support import ingest_site, site_rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites")
    parts = site_rows()
    urls = [ingest_site(tmp, f"site-{i}", X, y) for i, (X, y) in enumerate(parts)]
    pooled = ingest_site(tmp, "pooled", np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts]))
    X, y = parts[0]
    odd = {"extra": ingest_site(tmp, "extra", np.c_[X, X[:, 0]], y),
           "dtype": ingest_site(tmp, "dtype", X, y, "--dtype", "float32")}
    return {"sites": urls, "pooled": pooled, "parts": parts, "odd": odd, "tmp": tmp}


def test_sites_agree_compute_pooled_statistics_and_train(stores):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    with sites.site_cluster(workers, processes=False) as dc:
        plan = sites.prepare_sites(dc, label_hist=True)
        with pytest.raises(ValidationError, match=r"^site client-1: unseen label\(s\) 2$"):
            sites.agree(dc, plan.clients, classes=[0, 1])  # the user's label set, if given
        out = stores["tmp"] / "run"
        run = sites.federate_sites(plan, models.softmax(5, 3), dask_client=dc, rounds=8,
                                   lr=0.1, out=str(out))
    assert plan.clients == ["0", "1", "2"]
    assert plan.info.classes == [0, 1, 2]  # site 0 has no class 2: the union has it
    assert set(plan.label_hist["0"]) == {"0", "1"}
    assert plan.rows == {str(i): len(p[1]) for i, p in enumerate(stores["parts"])}
    assert not any(url in repr(plan) for url in stores["sites"])  # the driver never knew them
    pooled = compute_stats(stores["pooled"])
    for key in ("sum", "sumsq", "min", "max"):
        np.testing.assert_allclose(plan.stats[key], pooled[key], rtol=1e-12)
    np.testing.assert_array_equal(plan.stats["count"], pooled["count"])
    assert plan.stats["missing"][2] > 0 and plan.stats["missing"].sum() == plan.stats["missing"][2]
    assert run.summary["sites"] == 3 and run.summary["test_accuracy"] > 0.8
    # The run holds the federated statistics: predicting raw rows applies them.
    X = np.concatenate([p[0] for p in stores["parts"]])
    y = np.concatenate([p[1] for p in stores["parts"]])
    loaded = rundir.load_run(out)
    ready = stats_math.preprocess(X, pooled, impute="mean", standardize=True)
    expected = models.softmax(5, 3).predict(run.params, ready)
    np.testing.assert_array_equal(loaded.predict(X), expected)
    assert np.mean(loaded.predict(X) == y) > 0.8


@pytest.mark.parametrize(("odd", "why"), [("extra", "site client-2: extra column(s) x5"),
                                          ("dtype", "site client-2: dtype 'float32' where the "
                                                    "others have 'float64'")])
def test_a_mismatched_site_is_refused_in_one_line(stores, odd, why, capsys):
    urls = [*stores["sites"][:2], stores["odd"][odd]]
    with sites.site_cluster([([str(i)], u) for i, u in enumerate(urls)], processes=False) as dc:
        with pytest.raises(ValidationError) as caught:
            sites.prepare_sites(dc)
        assert str(caught.value) == why
        address = dc.scheduler.address
        assert main(["federate", "--sites", "--scheduler", address, "--model", "softmax",
                     "--rounds", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]


def test_federate_sites_on_the_command_line(stores, capsys):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    out = stores["tmp"] / "cli-run"
    with sites.site_cluster(workers, processes=False) as dc:
        argv = ["federate", "--sites", "--scheduler", dc.scheduler.address, "--model",
                "softmax", "--rounds", "3", "--out", str(out), "--json"]
        assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sites"] == 3 and summary["rounds"] == 3
    assert summary["preprocess"] == {"impute": "mean", "standardize": True,
                                     "computed": "federated"}
    assert {"params.npz", "metrics.jsonl", "summary.json", "config.toml"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.parametrize(("argv", "why"), [
    (["STORE", "--sites"], "--sites reads each client's own store on its worker"),
    (["--sites", "--clients", "3"], "--clients do not apply with --sites"),
    (["--sites"], "--sites needs --scheduler ADDRESS"),
    (["--no-standardize"], "--no-standardize only apply with --sites"),
    (["--sites", "--classes", "0,0", "--scheduler", "tcp://127.0.0.1:1"],
     "--classes must list distinct labels"),
])
def test_sites_options_are_checked_in_one_line(argv, why, capsys):
    assert main(["federate", *argv, "--model", "softmax", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]


def test_a_worker_that_knows_no_store_is_named_in_one_line(stores, monkeypatch):
    monkeypatch.delenv("FEDPIPE_SITE_STORE", raising=False)
    workers = [(["0"], stores["sites"][0]), (["1"], "")]
    with sites.site_cluster(workers, processes=False) as dc:
        with pytest.raises(StoreError, match=r"carries client-1 but knows no site store: set "
                                             r"FEDPIPE_SITE_STORE"):
            sites.prepare_sites(dc)


def test_a_site_local_run_resumes_bit_identical(stores):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    out = stores["tmp"] / "resumed"
    with sites.site_cluster(workers, processes=False) as dc:
        plan = sites.prepare_sites(dc)
        whole = sites.federate_sites(plan, models.softmax(5, 3), dask_client=dc, rounds=4,
                                     strategy=aggregate.fedadam(server_lr=0.05))
        sites.federate_sites(plan, models.softmax(5, 3), dask_client=dc, rounds=2,
                             strategy=aggregate.fedadam(server_lr=0.05), out=str(out))
        resumed = sites.federate_sites(plan, models.softmax(5, 3), dask_client=dc, rounds=4,
                                       strategy=aggregate.fedadam(server_lr=0.05),
                                       out=str(out), resume=True)
    assert resumed.state.round == 4 and len(resumed.metrics) == 2
    np.testing.assert_array_equal(resumed.params, whole.params)


@pytest.mark.parametrize("flags", [
    # the noise from the run seed: without it the OS draws it and the accuracy below varies
    ["--dp", "central", "--clip", "1.0", "--noise-multiplier", "0.5", "--compress", "int8",
     "--reproducible-noise"],
    ["--aggregator", "median"],
    ["--secure-aggregation"],
])
def test_site_local_runs_take_the_simulations_stages(stores, flags, capsys, monkeypatch):
    from fedpipe.engine import fed_round

    def never(*args, **kwargs):  # one site's update columns must not go to another's worker
        raise AssertionError("a robust rule ran by column blocks across sites")

    monkeypatch.setattr(fed_round, "_column_sum", never)
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    with sites.site_cluster(workers, processes=False) as dc:
        argv = ["federate", "--sites", "--scheduler", dc.scheduler.address, "--model",
                "softmax", "--rounds", "3", "--json", *flags]
        assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sites"] == 3 and summary["rounds"] == 3
    if "--dp" in flags:
        assert summary["privacy"]["epsilon"] > 0  # accounted as in a simulation
        assert [s["kind"] for s in summary["stages"]][-1] != "weighted_mean"
    if "--secure-aggregation" in flags:
        assert summary["secagg"]["rounds_aborted"] == 0 and summary["secagg"]["masked"] == 9
    assert summary["test_accuracy"] > 0.6


def test_classes_on_the_command_line_fix_the_label_set(stores, capsys):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    out = stores["tmp"] / "classes-run"
    with sites.site_cluster(workers, processes=False) as dc:
        base = ["federate", "--sites", "--scheduler", dc.scheduler.address, "--model",
                "softmax", "--rounds", "1"]
        assert main([*base, "--classes", "0,1", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "site client-1: unseen label(s) 2" in err[0]
        assert main([*base, "--classes", "0,1,2,3", "--out", str(out), "--json"]) == 0
    assert json.loads((out / "model.json").read_text())["spec"]["n_classes"] == 4
    assert 'classes = "0,1,2,3"' in (out / "config.toml").read_text()  # --config repeats it


def test_sites_with_other_categories_encode_into_their_union(tmp_path):
    import pandas as pd
    from fedpipe.cli.main import main as cli
    from fedpipe.data import store

    rng = np.random.default_rng(0)
    colors = [["red", "blue"], ["blue", "green"], ["green", "amber", "red"]]
    frames = []
    for i, cats in enumerate(colors):
        n = 150
        color = rng.choice(cats, size=n)
        a = rng.normal(size=n)
        frames.append(pd.DataFrame({"a": a * 10 + i, "color": color,
                                    "label": (a + 4 * (color == "green") > 2).astype(int)}))
    urls = []
    for i, frame in enumerate([*frames, pd.concat(frames)]):
        frame.to_csv(tmp_path / f"s{i}.csv", index=False)
        assert cli(["ingest", str(tmp_path / f"s{i}.csv"), str(tmp_path / f"s{i}.zarr"),
                    "--target", "label", "--categorical", "color", "--chunk-rows", "64",
                    "--quiet"]) == 0
        urls.append(str(tmp_path / f"s{i}.zarr"))
    pooled_url = urls.pop()
    pooled = store.read_info(pooled_url)
    with sites.site_cluster([([str(i)], u) for i, u in enumerate(urls)], processes=False) as dc:
        plan = sites.prepare_sites(dc)
        run = sites.federate_sites(plan, models.logistic(5), dask_client=dc, rounds=15,
                                   lr=0.5, out=str(tmp_path / "run"))
    # the union, ordered as one ingest of every row orders it
    assert plan.info.categorical == {"color": ["amber", "blue", "green", "red"]}
    assert plan.info.feature_names == pooled.feature_names == [
        "a", "color=amber", "color=blue", "color=green", "color=red"]
    want = compute_stats(pooled_url)
    for key in ("sum", "sumsq", "min", "max", "count"):
        np.testing.assert_allclose(plan.stats[key], want[key], rtol=1e-12)
    assert run.summary["test_accuracy"] > 0.9  # the label needs color=green: encoded right
    raw = pd.concat(frames).drop(columns="label")
    loaded = rundir.load_run(tmp_path / "run")
    assert np.mean(loaded.predict(raw) == pd.concat(frames)["label"].to_numpy()) > 0.9


def test_median_imputation_zooms_into_the_sites_histograms(stores):
    from fedpipe.data.stats import HIST_BINS

    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    out = stores["tmp"] / "median-run"
    with sites.site_cluster(workers, processes=False) as dc:
        plan = sites.prepare_sites(dc, impute="median")
        run = sites.federate_sites(plan, models.softmax(5, 3), dask_client=dc, rounds=3,
                                   out=str(out))
    X = np.concatenate([p[0] for p in stores["parts"]])
    passes = plan.info.preprocess["median_passes"]
    width = (np.nanmax(X, axis=0) - np.nanmin(X, axis=0)) / HIST_BINS ** (1 + passes)
    assert passes == sites.MEDIAN_PASSES > 0
    assert np.all(np.abs(plan.stats["median"] - np.nanmedian(X, axis=0)) <= width)
    assert run.summary["preprocess"]["impute"] == "median"
    ready = stats_math.preprocess(X, plan.stats, impute="median", standardize=True,
                                  median=plan.stats["median"])
    np.testing.assert_array_equal(rundir.load_run(out).predict(X),
                                  models.softmax(5, 3).predict(run.params, ready))
