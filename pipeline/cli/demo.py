"""``fedpipe demo``: the whole pipeline on one LocalCluster, in a few minutes, with no network.

Ingests scikit-learn's digits and a synthetic problem large enough that distribution
matters, partitions the synthetic rows among clients with a non-IID Dirichlet label skew, then
trains data-parallel and federated (FedAvg, FedProx) runs on one cluster whose dashboard shows
the live fedpipe page. Then the federated mode whose rows never meet: the digits split among
three sites, each ingested on its own into its own store, a cluster whose workers each know only
their site's store, the schema agreed and the statistics computed federatedly before training.
Ends with one report per run, a comparison page and a table.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from distributed import Client
from fedpipe.cli import registry
from fedpipe.cli.report import print_table
from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition
from fedpipe.data.store import StoreInfo
from fedpipe.engine import placement, sites
from fedpipe.engine.federate import federate
from fedpipe.engine.train import fit
from fedpipe.errors import ValidationError
from fedpipe.monitor import report
from fedpipe.monitor.dashboard import install_page, monitoring

log = logging.getLogger("fedpipe")


class Plan(NamedTuple):
    """Sizes of the demo: the full one for ``make demo``, a quick one for tests."""

    synthetic_rows: int
    chunk_rows: int
    clients: int
    iterations: int
    rounds: int
    hidden: str  # MLP widths for the synthetic problem (its classes are not linearly separable)
    sites: int = 3  # site-local stores of the digits, one per client


FULL = Plan(synthetic_rows=200_000, chunk_rows=10_000, clients=8, iterations=60, rounds=15, hidden="64")
QUICK = Plan(synthetic_rows=6_000, chunk_rows=1_000, clients=4, iterations=12, rounds=4, hidden="16")
DIRICHLET_ALPHA = 0.3  # small alpha: each client sees mostly one or two of the labels
PARTITION = "demo-dirichlet"


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", parents=parents, help="ingest, train and federate on example data",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-output", help="directory for stores and runs (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    p.add_argument("--dashboard-address", default=":8787",
                   help="scheduler dashboard address (default %(default)s; ':0' picks a free port)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo; returns paths, the dashboard link and the comparison rows."""
    plan = QUICK if args.quick else FULL
    _check_dashboard_address(args.dashboard_address)
    out = Path(args.out)
    start = time.perf_counter()
    digits, synthetic = ingest_data(out / "data", plan, progress=not (args.quiet or args.json))
    clients = partition(synthetic.url, clients=plan.clients, scheme="dirichlet",
                        alpha=DIRICHLET_ALPHA, seed=0, name=PARTITION)["clients"]
    log.info("partitioned %s among %d clients (Dirichlet alpha=%g)", synthetic.url, plan.clients, DIRICHLET_ALPHA)
    rows = {cid: c["n_rows"] for cid, c in clients.items()}
    groups = placement.assign_clients(rows, 2)
    with placement.simulation_cluster(groups, dashboard_address=args.dashboard_address) as dask_client:
        page = install_page(dask_client)
        if page and not args.json:
            log.warning("fedpipe dashboard (live): %s", page)
        run_dirs = [job(args, dask_client, out / "runs", digits, synthetic, plan) for job in JOBS]
    run_dirs.append(site_local(args, out, plan))
    reports = [report.write_report(d) for d in run_dirs]
    compare_html, table = report.compare_runs(run_dirs, out / "compare.html")
    if not (args.json or args.quiet):
        print_table(table, title=f"fedpipe demo ({time.perf_counter() - start:.0f} s)")
        print(f"reports: {', '.join(str(r) for r in reports)}\ncomparison: {compare_html}")
    return {"out": str(out), "dashboard": page, "compare": str(compare_html),
            "reports": [str(r) for r in reports], "runs": table,
            "seconds": round(time.perf_counter() - start, 1)}


def _check_dashboard_address(address: str) -> None:
    # Checked before minutes of ingest, not when the cluster starts at the end of them.
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or " " in host:
        raise ValidationError(f"--dashboard-address {address!r}: expected [HOST]:PORT, e.g. :8787")


def ingest_data(data_dir: Path, plan: Plan, progress: bool) -> tuple[StoreInfo, StoreInfo]:
    """Write the digits store and the synthetic store (overwriting an earlier demo's)."""
    digits = ingest("sklearn:digits", str(data_dir / "digits.zarr"), chunk_rows=300,
                    standardize=True, overwrite=True, progress=progress)
    source = (f"synthetic:classification?n_samples={plan.synthetic_rows}&n_features=20"
              "&n_classes=5&seed=0")
    synthetic = ingest(source, str(data_dir / "synthetic.zarr"), chunk_rows=plan.chunk_rows,
                       standardize=True, overwrite=True, progress=progress)
    return digits, synthetic


def _train(args: argparse.Namespace, dask_client: Client, run_dir: Path, info: StoreInfo,
           iterations: int, hidden: str | None = None) -> Path:
    name = "mlp" if hidden else "softmax"
    model = registry.make_model(name, info, hidden=hidden, l2=1e-4)
    lr = 0.02 if hidden else 0.1
    optimizer = registry.make_optimizer("adam", lr)
    config = {"store": info.url, "model": name, "optimizer": "adam", "lr": lr, "l2": 1e-4,
              "iterations": iterations, "seed": 0, "test_fraction": 0.2}
    if hidden:
        config["hidden"] = hidden
    with monitoring(args, dask_client, mode="train", total=iterations, unit="iteration",
                    meta={"model": f"{model.name} on {Path(info.url).name}"}) as on_record:
        fit(info.url, model, optimizer, iterations=iterations, dask_client=dask_client,
            out=run_dir, overwrite=True, on_record=on_record, config=config)
    return run_dir


def _federate(args: argparse.Namespace, dask_client: Client, run_dir: Path, info: StoreInfo,
               rounds: int, strategy: str, hidden: str) -> Path:
    model = registry.make_model("mlp", info, hidden=hidden, l2=1e-4)
    options = {"local_epochs": 1, "batch_size": 64, "lr": 0.05, "seed": 0, "test_fraction": 0.2}
    with monitoring(args, dask_client, mode="federate", total=rounds, unit="round",
                    meta={"model": model.name, "strategy": strategy}) as on_record:
        federate(info.url, model, rounds=rounds, strategy=registry.STRATEGIES[strategy](),
                 partition=PARTITION, dask_client=dask_client, out=str(run_dir), overwrite=True,
                 on_record=on_record, **options,
                 # the report rebuilds the model from config.toml, so name it as the CLI would
                 config={"store": info.url, "model": "mlp", "hidden": hidden, "l2": 1e-4,
                         "rounds": rounds, "strategy": strategy, "partition": PARTITION,
                         **options})
    return run_dir


Job = Callable[[argparse.Namespace, Client, Path, StoreInfo, StoreInfo, Plan], Path]
JOBS: list[Job] = [
    lambda a, dc, runs, digits, syn, plan: _train(a, dc, runs / "digits-dp", digits, plan.iterations),
    lambda a, dc, runs, digits, syn, plan: _train(a, dc, runs / "synthetic-dp", syn, plan.iterations, plan.hidden),
    lambda a, dc, runs, digits, syn, plan: _federate(a, dc, runs / "synthetic-fedavg", syn, plan.rounds, "fedavg", plan.hidden),
    lambda a, dc, runs, digits, syn, plan: _federate(a, dc, runs / "synthetic-fedprox", syn, plan.rounds, "fedprox", plan.hidden),
]


def site_local(args: argparse.Namespace, out: Path, plan: Plan) -> Path:
    """Federated training on site-local stores: each site ingests its own rows, never pooled."""
    import numpy as np
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    stores = []
    for i, rows in enumerate(np.array_split(np.arange(len(y)), plan.sites)):
        site = out / "data" / f"site-{i}"
        site.mkdir(parents=True, exist_ok=True)
        np.savez(site / "rows.npz", X=X[rows], y=y[rows])  # what site i holds, and only it
        ingest(str(site / "rows.npz"), str(site / "store.zarr"), chunk_rows=300,
               overwrite=True, progress=False)
        stores.append(([str(i)], str(site / "store.zarr")))
    run_dir = out / "runs" / "digits-sites"
    # Worker processes, each given only its own store (FEDPIPE_SITE_STORE), as at real sites.
    with sites.site_cluster(stores, processes=True) as dask_client:
        site_plan = sites.prepare_sites(dask_client, impute="mean", standardize=True)
        log.info("sites %s agreed their schema; statistics computed federatedly",
                 ", ".join(site_plan.clients))
        model = registry.make_model("softmax", site_plan.info, l2=1e-4)
        with monitoring(args, dask_client, mode="federate", total=plan.rounds, unit="round",
                        meta={"model": model.name, "strategy": "fedavg (site-local)"}) as on_record:
            sites.federate_sites(site_plan, model, dask_client=dask_client, rounds=plan.rounds,
                                 local_epochs=2, batch_size=32, lr=0.1, out=str(run_dir),
                                 overwrite=True, on_record=on_record)
    return run_dir
