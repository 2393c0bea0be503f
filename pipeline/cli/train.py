"""``fedpipe train``: data-parallel training of one model on one store.

Names given on the command line become objects here (model, optimizer, schedule) through
:mod:`fedpipe.cli.registry`; :func:`fedpipe.engine.train.fit` only sees objects.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedpipe.cli import config, registry, tls_options
from fedpipe.cli import report as cli_report
from fedpipe.cli.argtypes import (
    Renamed,
    holdout,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from fedpipe.data import store
from fedpipe.deploy import kube
from fedpipe.engine.stale import ARRIVALS, BoundedStaleness
from fedpipe.engine.train import CACHE_MODES, fit
from fedpipe.errors import ValidationError
from fedpipe.monitor.dashboard import monitoring


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``train`` to the ``fedpipe`` parser."""
    p = subparsers.add_parser("train", parents=parents,
                              help="data-parallel training: one gradient task per chunk")
    p.add_argument("store", help="store path or fsspec URL")
    model = p.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help=", ".join(registry.MODELS) + ", or your own: FILE.py:FACTORY or "
                            "MODULE:FACTORY (called with n_features=, n_classes=, task=)")
    model.add_argument("--hidden", help="MLP hidden widths (default 256,128)")
    model.add_argument("--l2", type=nonneg_float, default=0.0, help="L2 penalty (default 0)")
    model.add_argument("--l1", type=nonneg_float, default=0.0, help="L1 penalty (default 0)")
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--optimizer", default="sgd", help=", ".join(registry.OPTIMIZERS))
    opt.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default 0.1)")
    opt.add_argument("--schedule", "--lr-schedule", dest="lr_schedule", action=Renamed,
                     help=registry.LR_SCHEDULE_HELP)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=positive_int, help="full-batch iterations")
    length.add_argument("--epochs", type=positive_int, help="mini-batch epochs")
    opt.add_argument("--batch-size", type=positive_int, help="rows per mini-batch step (with --epochs)")
    opt.add_argument("--mode", choices=("sync", "async"), default="sync",
                     help="async: bounded-staleness steps that do not wait for a slow worker "
                          "(with --max-staleness; docs/async-train.md)")
    opt.add_argument("--max-staleness", type=nonneg_int,
                     help="--mode async: versions a gradient may lag (0: synchronous)")
    opt.add_argument("--arrival", choices=ARRIVALS, default="real",
                     help="--mode async: take results as they come (real) or in a simulated "
                          "order drawn from --seed (seeded: reproducible)")
    opt.add_argument("--tol", type=nonneg_float, help="stop when the loss changes by at most this "
                                               "(relative)")
    run = p.add_argument_group("cluster and run directory")
    run.add_argument("--workers", type=positive_int, help="LocalCluster workers")
    run.add_argument("--threads", type=positive_int, help="threads per worker")
    run.add_argument("--scheduler", help="address of a running scheduler")
    tls_options.add_tls_options(run)
    run.add_argument("--kubernetes", metavar="[NAMESPACE/]NAME",
                     help="dask-kubernetes cluster to run on (see docs/kubernetes.md)")
    run.add_argument("--cache", default="auto", choices=CACHE_MODES,
                     help="keep chunks in worker memory or stream them (default auto)")
    run.add_argument("--chunks-per-task", type=positive_int,
                     help="consecutive chunks per gradient task (default: 8 or 1, chosen "
                          "from the chunks and the cluster; both give the same result)")
    run.add_argument("--compute-dtype", choices=("float64", "float32"),
                     help="float32: compute on a float32 store's rows in float32 (half the "
                          "bytes per pass; default float64)")
    run.add_argument("--model-parallel", action="store_true",
                     help="shard the weights by feature block across workers (linear, "
                          "logistic, softmax; --iterations): docs/model-parallel.md")
    run.add_argument("--shards", type=positive_int,
                     help="feature blocks of --model-parallel (default: the store's feature "
                          "chunks, or 2)")
    run.add_argument("--test-fraction", type=holdout, default=0.2,
                     help="held-out share of rows (default 0.2; 0 trains on every row)")
    run.add_argument("--out", help="run directory")
    run.add_argument("--checkpoint-every", type=nonneg_int, help="iterations (epochs) between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue --out from its checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the earlier run in --out once this one has finished")
    run.add_argument("--seed", type=nonneg_int, default=0, help="default 0")
    cli_report.add_report_option(p)
    config.add_config_option(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fedpipe train``; returns the summary (printed with ``--json``)."""
    args = config.resolve(args)
    cli_report.check_report_option(args)
    if args.iterations is None and args.epochs is None:
        raise ValidationError("give --iterations N or --epochs E")
    info = store.read_info(args.store)
    model = registry.make_model(args.model, info, hidden=args.hidden, l2=args.l2, l1=args.l1)
    total = args.iterations if args.iterations is not None else args.epochs
    optimizer = registry.make_optimizer(args.optimizer, args.lr, args.lr_schedule,
                                        total_steps=_total_steps(args, info))
    unit = "iteration" if args.iterations is not None else "epoch"
    with tls_options.client_tls(args), monitoring(
            args, None, mode="train", total=total, unit=unit,
            meta={"model": f"{model.name} on {args.store}"}) as on_record:
        result = fit(
            args.store, model, optimizer, iterations=args.iterations, epochs=args.epochs,
            batch_size=args.batch_size, out=args.out, seed=args.seed,
            test_fraction=args.test_fraction, checkpoint_every=args.checkpoint_every,
            resume=args.resume, overwrite=args.overwrite, tol=args.tol, cache=args.cache,
            chunks_per_task=args.chunks_per_task, workers=args.workers,
            threads=args.threads,
            scheduler=kube.cluster_address(args.scheduler, args.kubernetes), on_record=on_record,
            config=config.to_dict(args), compute_dtype=args.compute_dtype,
            mode=_mode(args), shard_parameters=args.model_parallel, shards=args.shards)
    return cli_report.report_at_end(args, result.summary)


def _mode(args: argparse.Namespace) -> BoundedStaleness | None:
    """``--mode async --max-staleness S [--arrival seeded]`` as the object ``fit`` takes."""
    if args.mode == "sync":
        for flag, value, default in (("--max-staleness", args.max_staleness, None),
                                     ("--arrival", args.arrival, "real")):
            if value != default:
                raise ValidationError(f"{flag} needs --mode async")
        return None
    if args.max_staleness is None:
        raise ValidationError("--mode async needs --max-staleness S (0: synchronous)")
    if args.optimizer == "lbfgs":
        raise ValidationError("--optimizer lbfgs does not run with --mode async (its line "
                              "search needs exact gradients)")
    if args.epochs is not None:
        raise ValidationError("--epochs does not run with --mode async: it is full-batch, "
                              "use --iterations")
    return BoundedStaleness(args.max_staleness, arrival=args.arrival)


def _total_steps(args: argparse.Namespace, info: store.StoreInfo) -> int | None:
    """Optimizer updates in the whole run, for schedules that decay to a horizon (cosine)."""
    if args.iterations is not None:
        return args.iterations
    rows = info.n_rows * (1.0 - args.test_fraction)
    batch = args.batch_size or info.chunk_rows
    return args.epochs * max(1, -(-int(rows) // batch)) if args.epochs else None
