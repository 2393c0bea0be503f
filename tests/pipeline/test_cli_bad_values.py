"""Every option of every command, given a bad value: exit 2, one stderr line naming it, no traceback.

The table runs ``fedpipe.cli.main.main`` in-process. Placeholders in an argv: ``STORE`` (a small
partitioned store), ``RUN`` (a finished run directory), ``FILE`` (a plain file), ``TMP/...``
(a path in the test's scratch directory). Each row names the culprit the line must contain.
A row per option; an option with several ways to go wrong gets several rows.
"""

from __future__ import annotations

import argparse

import pytest
from distributed import Client, LocalCluster
from fedpipe.cli.main import build_parser, main
from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition
from fedpipe.engine.train import fit
from fedpipe.tasks import models, optimizers

TRAIN = ["train", "STORE", "--model", "softmax", "--iterations", "1"]
FED = ["federate", "STORE", "--model", "softmax", "--rounds", "1"]
RENDER = ["deploy", "render", "--clients", "0,1", "--image", "r.example/fedpipe:1"]
UP = ["deploy", "up", "--clients", "0,1", "--image", "r.example/fedpipe:1"]

CASES: list[tuple[list[str], str]] = [
    # ingest
    (["ingest", "TMP/nope.csv", "TMP/o.zarr"], "nope.csv"),
    (["ingest", "TMP/x.unknown", "TMP/o.zarr"], "x.unknown"),
    (["ingest", "sklearn:iris", "FILE/o.zarr"], "FILE"),
    (["ingest", "sklearn:iris", "STORE"], "--overwrite"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--target", "y"], "--target"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--labels", "FILE"], "--labels"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--chunk-rows", "0"], "--chunk-rows"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--feature-chunks", "0"], "--feature-chunks"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--feature-chunks", "9"], "--feature-chunks"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--dtype", "float16"], "--dtype"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--impute", "zero"], "--impute"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--standardize=yes"], "--standardize"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--task", "ranking"], "--task"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--task", "binary"], "binary"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--overwrite=1"], "--overwrite"),
    (["ingest", "sklearn:iris", "TMP/o.zarr", "--categorical", "x0"], "--categorical"),
    # predict / export (MODEL: a run trained on STORE)
    (["predict", "MODEL", "STORE"], "--out"),
    (["predict", "TMP/none", "STORE", "--out", "TMP/p.parquet"], "none"),
    (["predict", "MODEL", "TMP/none.csv", "--out", "TMP/p.parquet"], "none.csv"),
    (["predict", "MODEL", "STORE", "--out", "FILE/p.parquet"], "FILE"),
    (["predict", "MODEL", "STORE", "--out", "TMP/p.parquet", "--proba=1"], "--proba"),
    (["predict", "MODEL", "STORE", "--out", "TMP/p.parquet", "--chunk-rows", "0"],
     "--chunk-rows"),
    (["predict", "MODEL", "STORE", "--out", "TMP/p.parquet", "--target", "nope"], "nope"),
    (["export", "MODEL", "--out", "TMP/m.onnx"], "--format"),
    (["export", "MODEL", "--format", "pmml", "--out", "TMP/m"], "--format"),
    (["export", "MODEL", "--format", "onnx"], "--out"),
    (["export", "MODEL", "--format", "onnx", "--out", "FILE/m.onnx"], "FILE"),
    # info
    (["info", "TMP/none.zarr"], "none.zarr"),
    (["info", "FILE"], "FILE"),
    (["info", "STORE", "--verify=1"], "--verify"),
    # partition
    (["partition", "TMP/none.zarr", "--clients", "2"], "none.zarr"),
    (["partition", "STORE", "--clients", "0"], "--clients"),
    (["partition", "STORE", "--clients", "100000"], "--clients"),
    (["partition", "STORE", "--clients", "2", "--scheme", "random"], "--scheme"),
    (["partition", "STORE", "--clients", "2", "--scheme", "dirichlet", "--alpha", "-1"], "--alpha"),
    (["partition", "STORE", "--clients", "2", "--scheme", "column", "--column", "zz"], "zz"),
    (["partition", "STORE", "--clients", "2", "--scheme", "column"], "--column"),
    (["partition", "STORE", "--clients", "2", "--column", "x0"], "--column"),
    (["partition", "STORE", "--clients", "2", "--min-size", "-1"], "--min-size"),
    (["partition", "STORE", "--clients", "2", "--min-size", "1000"], "--min-size"),
    (["partition", "STORE", "--clients", "2", "--seed", "-1"], "--seed"),
    (["partition", "STORE", "--clients", "2", "--name", "a/b"], "--name"),
    # train
    (["train", "TMP/none.zarr", "--model", "softmax", "--iterations", "1"], "none.zarr"),
    (["train", "STORE", "--iterations", "1"], "--model"),
    ([*TRAIN[:3], "svm", *TRAIN[4:]], "--model"),
    ([*TRAIN, "--model", "mlp", "--hidden", "a,b"], "--hidden"),
    ([*TRAIN, "--model", "mlp", "--hidden", "0"], "--hidden"),
    ([*TRAIN, "--l2", "-1"], "--l2"),
    ([*TRAIN, "--l1", "nan"], "--l1"),
    ([*TRAIN, "--optimizer", "sgdx"], "--optimizer"),
    ([*TRAIN, "--lr", "0"], "--lr"),
    ([*TRAIN, "--lr-schedule", "zigzag"], "--lr-schedule"),
    ([*TRAIN, "--lr-schedule", "step:every=x"], "--lr-schedule"),
    ([*TRAIN[:4], "--iterations", "0"], "--iterations"),
    ([*TRAIN[:4], "--epochs", "-2"], "--epochs"),
    ([*TRAIN[:4], "--epochs", "1", "--iterations", "1"], "--iterations"),
    ([*TRAIN[:4], "--epochs", "1", "--batch-size", "0"], "--batch-size"),
    ([*TRAIN, "--batch-size", "8"], "--batch-size"),
    ([*TRAIN, "--tol", "-1"], "--tol"),
    ([*TRAIN, "--mode", "later"], "--mode"),
    ([*TRAIN, "--mode", "async"], "--max-staleness"),
    ([*TRAIN, "--mode", "async", "--max-staleness", "-1"], "--max-staleness"),
    ([*TRAIN, "--max-staleness", "2"], "--max-staleness"),  # needs --mode async
    ([*TRAIN, "--mode", "async", "--max-staleness", "1", "--arrival", "random"], "--arrival"),
    ([*TRAIN, "--arrival", "seeded"], "--arrival"),
    ([*TRAIN, "--mode", "async", "--max-staleness", "1", "--optimizer", "lbfgs"], "lbfgs"),
    ([*TRAIN[:4], "--epochs", "1", "--mode", "async", "--max-staleness", "1"], "--epochs"),
    ([*TRAIN, "--workers", "0"], "--workers"),
    ([*TRAIN, "--threads", "-1"], "--threads"),
    ([*TRAIN, "--scheduler", "bogus://nowhere"], "--scheduler"),
    ([*TRAIN, "--tls-ca-file", "FILE"], "--tls-key"),
    ([*TRAIN, "--tls-cert", "FILE", "--tls-key", "FILE"], "--tls-ca-file"),
    ([*TRAIN, "--tls-ca-file", "FILE", "--tls-cert", "FILE", "--tls-key", "FILE"], "--scheduler"),
    ([*TRAIN, "--kubernetes", "a/b/c"], "--kubernetes"),
    ([*TRAIN, "--cache", "disk"], "--cache"),
    ([*TRAIN, "--chunks-per-task", "0"], "--chunks-per-task"),
    ([*TRAIN, "--compute-dtype", "float16"], "--compute-dtype"),
    ([*TRAIN, "--compute-dtype", "float32"], "--compute-dtype"),  # STORE holds float64
    ([*TRAIN, "--test-fraction", "1"], "--test-fraction"),
    ([*TRAIN, "--out", "FILE"], "FILE"),
    ([*TRAIN, "--out", "RUN"], "--overwrite"),  # an earlier run's results are never replaced
    ([*TRAIN, "--overwrite=1"], "--overwrite"),
    ([*TRAIN, "--checkpoint-every", "-1"], "--checkpoint-every"),
    ([*TRAIN, "--resume"], "--resume"),
    ([*TRAIN, "--seed", "-1"], "--seed"),
    ([*TRAIN, "--model-parallel=1"], "--model-parallel"),
    ([*TRAIN, "--shards", "2"], "--model-parallel"),  # shards of what: no --model-parallel
    ([*TRAIN, "--model-parallel", "--shards", "0"], "--shards"),
    ([*TRAIN, "--model-parallel", "--shards", "999"], "--shards"),
    (["train", "STORE", "--model", "mlp", "--iterations", "1", "--model-parallel"], "mlp"),
    ([*TRAIN, "--report"], "--report"),
    ([*TRAIN, "--config", "TMP/none.toml"], "none.toml"),
    # federate
    (["federate", "TMP/none.zarr", *FED[2:]], "none.zarr"),
    ([*FED, "--clients", "0"], "--clients"),
    ([*FED, "--clients", "100000"], "--clients"),
    ([*FED, "--clients", "2", "--scheme", "random"], "--scheme"),
    ([*FED, "--clients", "2", "--scheme", "column"], "--scheme column"),
    ([*FED, "--scheme", "dirichlet"], "--scheme"),
    ([*FED, "--clients", "2", "--scheme", "dirichlet", "--alpha", "0"], "--alpha"),
    ([*FED, "--partition", "nope"], "nope"),
    ([*FED, "--clients", "2", "--partition", "default"], "--partition"),
    (["federate", "STORE", "--model", "svm", "--rounds", "1"], "--model"),
    (["federate", "STORE", "--model", "linear", "--rounds", "1"], "--model linear"),
    (["federate", "--sites", *FED[2:]], "--sites needs --scheduler"),
    ([*FED, "--sites", "--scheduler", "tcp://127.0.0.1:1"], "--sites reads each client's own"),
    ([*FED, "--site-impute", "median"], "--site-impute"),
    ([*FED, "--no-standardize"], "--no-standardize only apply with --sites"),
    ([*FED, "--share-label-counts"], "--share-label-counts only apply with --sites"),
    ([*FED, "--classes", "0,1"], "--classes only apply with --sites"),
    (["federate", "--sites", "--scheduler", "tcp://127.0.0.1:1", *FED[2:], "--classes", "0,0"],
     "--classes must list distinct labels"),
    ([*FED, "--model", "mlp", "--hidden", "-3"], "--hidden"),
    ([*FED, "--l2", "-0.5"], "--l2"),
    ([*FED[:4], "--rounds", "0"], "--rounds"),
    ([*FED, "--local-epochs", "0"], "--local-epochs"),
    ([*FED, "--batch-size", "-1"], "--batch-size"),
    ([*FED, "--lr", "-1"], "--lr"),
    ([*FED, "--lr-schedule", "zigzag"], "--lr-schedule"),
    ([*FED, "--strategy", "fedsgd"], "--strategy"),
    ([*FED, "--mu", "-1"], "--mu"),
    ([*FED, "--mu", "0.1"], "--mu"),  # fedavg has no mu: refused, not dropped
    ([*FED, "--client-optimizer", "lbfgs"], "--client-optimizer"),
    ([*FED, "--client-optimizer", "adam", "--lr-schedule", "cosine"], "--lr-schedule"),
    ([*FED, "--server-lr", "-1"], "--server-lr"),
    ([*FED, "--server-lr", "inf"], "--server-lr"),
    ([*FED, "--fraction", "0"], "--fraction"),
    ([*FED, "--fraction", "1.5"], "--fraction"),
    ([*FED, "--clients-per-round", "0"], "--clients-per-round"),
    ([*FED, "--fraction", "0.5", "--clients-per-round", "1"], "--clients-per-round"),
    ([*FED, "--min-clients", "0"], "--min-clients"),
    ([*FED, "--min-clients", "50"], "--min-clients"),
    ([*FED, "--deadline", "0"], "--deadline"),
    ([*FED, "--eval-every", "0"], "--eval-every"),
    ([*FED, "--workers", "0"], "--workers"),
    ([*FED, "--scheduler", "bogus://nowhere"], "--scheduler"),
    ([*FED, "--tls-ca-file", "FILE"], "--tls-key"),
    ([*FED, "--tls-cert", "FILE", "--tls-key", "FILE"], "--tls-ca-file"),
    ([*FED, "--tls-ca-file", "FILE", "--tls-cert", "FILE", "--tls-key", "FILE"], "--scheduler"),
    ([*FED, "--kubernetes", "a/b/c"], "--kubernetes"),
    ([*FED, "--out", "FILE"], "FILE"),
    ([*FED, "--checkpoint-every", "-1"], "--checkpoint-every"),
    ([*FED, "--resume"], "--resume"),
    ([*FED, "--out", "TMP/fresh", "--resume"], "--resume"),
    ([*FED, "--seed", "-1"], "--seed"),
    ([*FED, "--test-fraction", "-0.1"], "--test-fraction"),
    ([*FED, "--report"], "--report"),
    ([*FED, "--config", "FILE"], "FILE"),
    ([*FED, "--out", "RUN"], "--overwrite"),  # an earlier run's results are never replaced
    ([*FED, "--overwrite=1"], "--overwrite"),
    ([*FED, "--secagg-threshold", "0"], "--secagg-threshold"),
    ([*FED, "--secagg-graph", "ring"], "--secagg-graph"),
    ([*FED, "--secagg-bits", "0"], "--secagg-bits"),
    ([*FED, "--secagg-bound", "-1"], "--secagg-bound"),
    ([*FED, "--dropout", "1"], "--dropout"),
    ([*FED, "--dropout", "0.2"], "--secure-aggregation"),  # only with --secure-aggregation
    ([*FED, "--secure-aggregation=1"], "--secure-aggregation"),
    ([*FED, "--dp", "global"], "--dp"),
    ([*FED, "--dp", "central", "--clip", "-1"], "--clip"),
    ([*FED, "--noise-multiplier", "-1"], "--noise-multiplier"),
    ([*FED, "--target-epsilon", "0"], "--target-epsilon"),
    ([*FED, "--delta", "1"], "--delta"),
    ([*FED, "--reproducible-noise=1"], "--reproducible-noise"),
    ([*FED, "--aggregator", "mode"], "--aggregator"),
    ([*FED, "--compress", "zip"], "--compress"),
    ([*FED, "--mode", "later"], "--mode"),
    ([*FED, "--mode", "async", "--buffer-size", "0"], "--buffer-size"),
    ([*FED, "--mode", "async", "--max-concurrency", "0"], "--max-concurrency"),
    ([*FED, "--mode", "async", "--staleness-exponent", "-1"], "--staleness-exponent"),
    ([*FED, "--mode", "async", "--max-staleness", "-1"], "--max-staleness"),
    ([*FED, "--mode", "async", "--clock", "cpu"], "--clock"),
    ([*FED, "--mode", "async", "--client-speeds", "two-tier:2,10"], "--client-speeds"),
    ([*FED, "--max-staleness", "3"], "--max-staleness"),  # only with --mode async
    # report and compare
    (["report", "TMP/none"], "none"),
    (["report", "FILE"], "FILE"),
    (["compare", "RUN", "TMP/none"], "none"),
    (["compare", "RUN", "--out", "FILE/compare.html"], "FILE"),
    # deploy render / up (up fails before it looks for a Kubernetes cluster)
    (["deploy", "render", "--clients", "0,0"], "client id"),
    ([*RENDER, "--site-store", "/data/site.zarr"], "--site-store"),
    ([*UP, "--site-store", "../site.zarr"], "--site-store"),
    ([*RENDER[:2], "--clients", "a b"], "--clients"),
    ([*RENDER, "--image", "fedpipe"], "--image"),
    ([*RENDER, "--namespace", "Bad_NS"], "--namespace"),
    ([*RENDER, "--name", "Bad"], "--name"),
    ([*RENDER, "--server-workers", "-1"], "--server-workers"),
    ([*RENDER, "--threads", "0"], "--threads"),
    ([*RENDER, "--memory", "lots"], "--memory"),
    ([*RENDER, "--data-path", "data"], "--data-path"),
    ([*RENDER, "--node-label", "bad key!"], "--node-label"),
    ([*RENDER, "--taint", "bad key!"], "--taint"),
    ([*RENDER, "--out", "FILE"], "FILE"),
    ([*RENDER, "--tls"], "--tls"),
    ([*RENDER, "--tls", "--tls-secret", "s", "--out", "TMP/k8s"], "--tls-secret"),
    ([*RENDER, "--tls", "--tls-dir", "FILE"], "FILE"),
    ([*RENDER, "--tls-secret", "Bad_Secret"], "--tls-secret"),
    ([*UP, "--adapt", "x"], "--adapt"),
    ([*UP, "--clients", "a b"], "--clients"),
    ([*UP, "--image", "fedpipe"], "--image"),
    ([*UP, "--server-workers", "-1"], "--server-workers"),
    ([*UP, "--namespace", "Bad_NS"], "--namespace"),
    ([*UP, "--name", "Bad"], "--name"),
    ([*UP, "--threads", "0"], "--threads"),
    ([*UP, "--memory", "4 GB"], "--memory"),
    ([*UP, "--data-path", "data"], "--data-path"),
    ([*UP, "--node-label", "-x"], "--node-label"),
    ([*UP, "--taint", "a//b"], "--taint"),
    # demo (fails before it ingests anything)
    (["demo", "--out", "FILE"], "FILE"),
    (["demo", "--quick=1"], "--quick"),
    (["demo", "--dashboard-address", "not an address"], "--dashboard-address"),
    # an unknown flag, for every command (was "fedpipe fedpipe: error: ...")
    *[([*argv, "--bogus"], "fedpipe " + " ".join(argv[: 2 if argv[0] == "deploy" else 1])
       + ": error: unrecognized arguments: --bogus")
      for argv in (["ingest", "sklearn:iris", "TMP/o.zarr"], ["info", "STORE"],
                   ["partition", "STORE", "--clients", "2"], TRAIN, FED, ["report", "RUN"],
                   ["compare", "RUN"], RENDER, UP, ["demo"])],
    (["--bogus"], "fedpipe: error:"),
    (["nope"], "fedpipe: error: argument command"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    store = str(root / "store.zarr")
    ingest("synthetic:classification?n_samples=200&n_features=4&n_classes=3&seed=0", store,
           chunk_rows=50, progress=False)
    partition(store, clients=3, seed=0)
    (root / "file.txt").write_text("not a directory\n")
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 0, "loss": 1.0}\n')
    model = root / "model"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        fit(store, models.softmax(4, 3), optimizers.sgd(0.1), iterations=1,
            dask_client=dask_client, out=str(model))
    return {"STORE": store, "RUN": str(run), "FILE": str(root / "file.txt"), "MODEL": str(model)}


def _fill(arg: str, places: dict[str, str], tmp: str) -> str:
    for key, value in places.items():
        arg = arg.replace(key, value) if arg.split("/")[0] == key else arg
    return arg.replace("TMP/", tmp + "/", 1) if arg.startswith("TMP/") else arg


@pytest.mark.parametrize(("argv", "culprit"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_value_is_one_line_naming_it(argv, culprit, places, tmp_path, capsys):
    args = [_fill(a, places, str(tmp_path)) for a in argv]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    culprit = _fill(culprit, places, str(tmp_path))
    assert len(lines) == 1 and culprit in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    command = " ".join(["fedpipe", *argv[: 2 if argv[0] == "deploy" else 1]])
    assert lines[0].startswith(f"{command}: error: " if not argv[0].startswith("-") and
                               argv[0] != "nope" else "fedpipe: error: ")


def _options(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, option string) for every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*prefix, name))
        elif prefix:
            for flag in action.option_strings[-1:] or [action.dest]:
                yield prefix, flag


ALWAYS_FINE = {"--help", "--json", "--verbose", "--quiet"}  # no value can be wrong


def test_the_table_covers_every_option():
    covered = {(tuple(argv[: 2 if argv[0] == "deploy" else 1]), word.split("=")[0])
               for argv, culprit in CASES for word in [*argv, *culprit.split()]}
    # Positionals (store, source, run_dir) have rows too; only options are counted here.
    missing = [f"{' '.join(cmd)} {flag}" for cmd, flag in _options(build_parser())
               if flag.startswith("-") and flag not in ALWAYS_FINE and (cmd, flag) not in covered]
    assert not missing, f"options without a bad-value row: {missing}"
