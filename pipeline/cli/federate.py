"""``fedpipe federate``: federated training on a store's client partition.

Names given on the command line become objects here (model, strategy, schedule) through
:mod:`fedpipe.cli.registry`; :func:`fedpipe.engine.federate.federate` only sees objects.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedpipe.cli import config, registry
from fedpipe.cli import report as cli_report
from fedpipe.data import store
from fedpipe.deploy import kube
from fedpipe.engine.federate import federate
from fedpipe.errors import ValidationError
from fedpipe.monitor.dashboard import monitoring

STRATEGY_HELP = "fedavg (default), fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold"


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``federate`` to the ``fedpipe`` parser."""
    p = subparsers.add_parser("federate", parents=parents,
                              help="federated training: clients pinned to their own workers")
    p.add_argument("store", help="store path or fsspec URL")
    data = p.add_argument_group("clients (a partition made for this run; default: the store's own)")
    data.add_argument("--clients", type=int, help="partition the store among K clients first")
    # No default here: a --scheme given without --clients must be an error, not ignored.
    data.add_argument("--scheme", help="iid (default), dirichlet, quantity")
    data.add_argument("--alpha", type=float, help="Dirichlet concentration / quantity exponent")
    data.add_argument("--partition", help="name of an existing partition of the store")
    model = p.add_argument_group("model and local training")
    model.add_argument("--model", required=True,
                       help=", ".join(registry.MODELS) + ", or FILE.py:FACTORY / MODULE:FACTORY")
    model.add_argument("--hidden", help="MLP hidden widths, e.g. 256,128")
    model.add_argument("--l2", type=float, default=0.0, help="L2 penalty (default 0)")
    model.add_argument("--rounds", type=int, required=True)
    model.add_argument("--local-epochs", type=int, default=1, help="default 1")
    model.add_argument("--batch-size", type=int, default=32, help="default 32")
    model.add_argument("--lr", type=float, default=0.1, help="client step size (default 0.1)")
    model.add_argument("--lr-schedule", help="client lr schedule over rounds, e.g. cosine")
    server = p.add_argument_group("strategy and rounds")
    server.add_argument("--strategy", default="fedavg", choices=list(registry.STRATEGIES),
                        help=STRATEGY_HELP)
    server.add_argument("--mu", type=float, default=0.01, help="FedProx mu (default 0.01)")
    server.add_argument("--server-lr", type=float,
                        help="server step size (default 1.0; 0.01 for fedadam/yogi/adagrad)")
    share = server.add_mutually_exclusive_group()
    share.add_argument("--fraction", type=float, help="share of clients sampled per round")
    share.add_argument("--clients-per-round", type=int, help="clients sampled per round")
    server.add_argument("--min-clients", type=int, default=1, help="default 1")
    server.add_argument("--deadline", type=float, help="seconds a round waits for its clients")
    server.add_argument("--eval-every", type=int, default=1, help="default 1")
    run = p.add_argument_group("cluster and run directory")
    run.add_argument("--workers", type=int, help="simulation workers (default 2)")
    run.add_argument("--scheduler", help="scheduler address of workers with client-<id> resources")
    run.add_argument("--kubernetes", metavar="[NAMESPACE/]NAME",
                     help="dask-kubernetes cluster to run on (see docs/kubernetes.md)")
    run.add_argument("--out", help="run directory")
    run.add_argument("--checkpoint-every", type=int, default=0, help="rounds between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue --out from its checkpoint")
    run.add_argument("--seed", type=int, default=0, help="default 0")
    run.add_argument("--test-fraction", type=float, default=0.2, help="default 0.2")
    cli_report.add_report_option(p)
    config.add_config_option(p)  # last: --config covers every option above
    p.set_defaults(func=run_federate)


def run_federate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fedpipe federate``; returns the summary (printed with ``--json``)."""
    on_command_line = set(vars(args))  # config.resolve adds the options given elsewhere
    args = config.resolve(args)
    cli_report.check_report_option(args)
    _check_partition_options(args, on_command_line)
    partition = args.partition
    if args.clients is not None and not args.resume:
        partition = _make_partition(args)
    elif args.clients is not None:
        partition = _partition_name(args)  # resuming: reuse the partition the run started with
    info = store.read_info(args.store)
    model = registry.make_model(args.model, info, hidden=args.hidden, l2=args.l2)
    strategy = registry.STRATEGIES[args.strategy](server_lr=args.server_lr, mu=args.mu)
    lr = args.lr
    if args.lr_schedule:
        lr = registry.parse_schedule(args.lr_schedule, args.lr, total_steps=args.rounds)
    with monitoring(args, None, mode="federate", total=args.rounds, unit="round",
                    meta={"model": model.name, "strategy": args.strategy}) as on_record:
        result = federate(
            args.store, model, rounds=args.rounds, strategy=strategy,
            local_epochs=args.local_epochs, batch_size=args.batch_size, lr=lr, partition=partition,
            fraction=args.fraction, clients_per_round=args.clients_per_round,
            min_clients=args.min_clients, deadline=args.deadline, seed=args.seed,
            test_fraction=args.test_fraction, eval_every=args.eval_every, workers=args.workers,
            scheduler=kube.cluster_address(args.scheduler, args.kubernetes),
            out=args.out, checkpoint_every=args.checkpoint_every,
            resume=args.resume, on_record=on_record,
            config=config.to_dict(args))  # RUN_DIR/config.toml repeats the run
    return cli_report.report_at_end(args, result.summary)


def _check_partition_options(args: argparse.Namespace, on_command_line: set[str]) -> None:
    """``--scheme`` and ``--alpha`` shape the partition ``--clients`` makes; alone, refuse them.

    ``scheme = "iid"`` from a config file is let through: run directories written before
    ``--scheme`` lost its default record it for runs on an existing partition.
    """
    if args.clients is None:
        scheme_set = args.scheme is not None and (
            "scheme" in on_command_line or args.scheme != "iid")
        given = [flag for flag, on in (("--scheme", scheme_set), ("--alpha", args.alpha is not None))
                 if on]
        if given:
            raise ValidationError(f"{' and '.join(given)} only apply with --clients K (the "
                                  "partition made for this run); without it use --partition")
    elif args.scheme is None:
        args.scheme = "iid"


def _partition_name(args: argparse.Namespace) -> str:
    alpha = "" if args.alpha is None else f"-a{args.alpha:g}"
    return f"federate-{args.scheme}-{args.clients}{alpha}-s{args.seed}"


def _make_partition(args: argparse.Namespace) -> str:
    from fedpipe.data.partition import partition

    name = _partition_name(args)
    partition(args.store, clients=args.clients, scheme=args.scheme, alpha=args.alpha,
              seed=args.seed, name=name)
    return name
