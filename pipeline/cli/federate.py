"""``fedpipe federate``: federated training on a store's client partition.

Names given on the command line become objects here (model, strategy, schedule) through
:mod:`fedpipe.cli.registry`; :func:`fedpipe.engine.federate.federate` only sees objects.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedpipe.cli import config, registry, tls_options
from fedpipe.cli import fedbuff as cli_fedbuff
from fedpipe.cli import report as cli_report
from fedpipe.cli import sites as cli_sites
from fedpipe.cli.argtypes import (
    Renamed,
    holdout,
    nonneg_float,
    nonneg_int,
    open_share,
    positive_float,
    positive_int,
    share,
)
from fedpipe.data import store
from fedpipe.deploy import kube
from fedpipe.engine.federate import federate
from fedpipe.errors import ValidationError
from fedpipe.monitor.dashboard import monitoring

FEDERATE_SCHEMES = ("iid", "dirichlet", "quantity")  # "column" needs `fedpipe partition --column`
STRATEGY_HELP = "fedavg (default), fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold"


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``federate`` to the ``fedpipe`` parser."""
    p = subparsers.add_parser("federate", parents=parents,
                              help="federated training: clients pinned to their own workers")
    p.add_argument("store", nargs="?", help="store path or fsspec URL (none with --sites)")
    data = p.add_argument_group("clients (a partition made for this run; default: the store's own)")
    data.add_argument("--clients", type=positive_int, help="partition the store among K clients first")
    # No default here: a --scheme given without --clients must be an error, not ignored.
    data.add_argument("--scheme", help="iid (default), dirichlet, quantity")
    data.add_argument("--alpha", type=positive_float, help="Dirichlet concentration / quantity exponent")
    data.add_argument("--partition", help="name of an existing partition of the store")
    model = p.add_argument_group("model and local training")
    model.add_argument("--model", required=True,
                       help=", ".join(registry.MODELS) + ", or FILE.py:FACTORY / MODULE:FACTORY")
    model.add_argument("--hidden", help="MLP hidden widths, e.g. 256,128")
    model.add_argument("--l2", type=nonneg_float, default=0.0, help="L2 penalty (default 0)")
    model.add_argument("--rounds", type=positive_int, required=True)
    model.add_argument("--local-epochs", type=positive_int, default=1, help="default 1")
    model.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    model.add_argument("--lr", type=positive_float, default=0.1, help="client step size (default 0.1)")
    model.add_argument("--schedule", "--lr-schedule", dest="lr_schedule", action=Renamed,
                       help=registry.LR_SCHEDULE_HELP)
    model.add_argument("--client-optimizer", default="sgd", choices=registry.CLIENT_OPTIMIZERS,
                       help="the clients' local optimizer at --lr (default sgd)")
    server = p.add_argument_group("strategy and rounds")
    server.add_argument("--strategy", default="fedavg", choices=list(registry.STRATEGIES),
                        help=STRATEGY_HELP)
    server.add_argument("--mu", type=nonneg_float,
                        help="FedProx mu (default 0.01; --strategy fedprox only)")
    server.add_argument("--server-lr", type=positive_float,
                        help="server step size (default 1.0; 0.01 for fedadam/yogi/adagrad)")
    sampled = server.add_mutually_exclusive_group()
    sampled.add_argument("--fraction", type=share, help="share of clients sampled per round")
    sampled.add_argument("--clients-per-round", type=positive_int, help="clients sampled per round")
    server.add_argument("--min-clients", type=positive_int, default=1, help="default 1")
    server.add_argument("--deadline", type=positive_float, help="seconds a round waits for its clients")
    server.add_argument("--eval-every", type=positive_int, default=1, help="default 1")
    sec = p.add_argument_group("secure aggregation (the server learns only the sum)")
    sec.add_argument("--secure-aggregation", action="store_true",
                     help="mask updates (SecAgg, Bonawitz et al. 2017); see "
                          "docs/secure-aggregation.md")
    sec.add_argument("--secagg-threshold", type=positive_float, default=0.5,
                     help="Shamir threshold: a count, or below 1 a fraction of each share "
                          "group (default 0.5)")
    sec.add_argument("--secagg-graph", choices=["full", "sparse"], default="full",
                     help="pairwise masks with every client, or SecAgg+'s sparse graph")
    sec.add_argument("--secagg-bits", type=positive_int, default=32, help="k of Z_2^k (default 32)")
    sec.add_argument("--secagg-bound", type=positive_float, default=1e4,
                     help="largest |value| of a row-weighted update entry (default 1e4)")
    sec.add_argument("--dropout", type=holdout, default=0.0,
                     help="simulation: share of each round's clients that drop out mid-protocol")
    chain = p.add_argument_group("privacy, robustness, compression (docs/privacy.md)")
    chain.add_argument("--dp", choices=["central", "local"],
                       help="differential privacy: noise on the server's sum or on each client")
    chain.add_argument("--clip", help="clip each update to this L2 norm, or 'adaptive[:Q]'")
    chain.add_argument("--noise-multiplier", type=positive_float,
                       help="noise std over the clip norm (z); or give --target-epsilon")
    chain.add_argument("--target-epsilon", type=positive_float,
                       help="privacy budget: sets z for the planned rounds, or, with "
                            "--noise-multiplier, stops before the round that would pass it")
    chain.add_argument("--delta", type=open_share, help="δ of the reported ε (default 1e-5)")
    chain.add_argument("--reproducible-noise", action="store_true",
                       help="noise from --seed (a simulation) instead of OS entropy")
    chain.add_argument("--aggregator", default="mean",
                       help="mean (default), median, trimmed-mean[:F], krum[:F], "
                            "multi-krum[:F], centered-clip[:TAU]")
    chain.add_argument("--compress", help="fp16, int8 or topk:FRACTION (e.g. topk:0.01)")
    run = p.add_argument_group("cluster and run directory")
    run.add_argument("--workers", type=positive_int, help="simulation workers (default 2)")
    run.add_argument("--scheduler", help="address of a running Dask scheduler (plain workers are "
                     "lent client-<id> resources for the run)")
    tls_options.add_tls_options(run)
    run.add_argument("--kubernetes", metavar="[NAMESPACE/]NAME",
                     help="dask-kubernetes cluster to run on (see docs/kubernetes.md)")
    run.add_argument("--out", help="run directory")
    run.add_argument("--checkpoint-every", type=nonneg_int, default=0, help="rounds between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue --out from its checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the earlier run in --out once this one has finished")
    run.add_argument("--seed", type=nonneg_int, default=0, help="default 0")
    run.add_argument("--test-fraction", type=holdout, default=0.2, help="default 0.2")
    cli_fedbuff.add_options(p)
    cli_sites.add_options(p)
    cli_report.add_report_option(p)
    config.add_config_option(p)  # last: --config covers every option above
    p.set_defaults(func=run_federate)


def run_federate(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fedpipe federate``; returns the summary (printed with ``--json``)."""
    on_command_line = set(vars(args))  # config.resolve adds the options given elsewhere
    args = config.resolve(args)
    cli_report.check_report_option(args)
    cli_sites.check_options(args)
    mode = cli_fedbuff.make_mode(args)
    if args.sites:  # site-local stores: no store here, each client's worker reads its own
        return cli_sites.run_sites(args)
    _check_partition_options(args, on_command_line)
    partition = args.partition
    if args.clients is not None and not args.resume:
        partition = _make_partition(args)
    elif args.clients is not None:
        partition = _partition_name(args)  # resuming: reuse the partition the run started with
    info = store.read_info(args.store)
    model = registry.make_model(args.model, info, hidden=args.hidden, l2=args.l2)
    strategy = registry.make_strategy(args.strategy, args.server_lr, _mu(args, on_command_line),
                                      args.client_optimizer, args.lr)
    lr = None if strategy.client is not None else args.lr
    if args.lr_schedule and strategy.client is not None:
        raise ValidationError(f"--lr-schedule counts rounds of the default client sgd; "
                              f"--client-optimizer {args.client_optimizer} takes --lr only")
    if args.lr_schedule:
        lr = registry.parse_schedule(args.lr_schedule, args.lr, total_steps=args.rounds,
                                     flag="--lr-schedule")
    stages = _secure_chain(args, info, partition, _make_chain(args, info, partition))
    with tls_options.client_tls(args), monitoring(
            args, None, mode="federate", total=args.rounds,
            unit="round" if mode is None else "version",
            meta={"model": model.name, "strategy": args.strategy,
                  **_chain_meta(args)}) as on_record:
        result = federate(
            args.store, model, rounds=args.rounds, strategy=strategy,
            local_epochs=args.local_epochs, batch_size=args.batch_size, lr=lr, partition=partition,
            fraction=args.fraction, clients_per_round=args.clients_per_round,
            min_clients=args.min_clients, deadline=args.deadline, seed=args.seed,
            test_fraction=args.test_fraction, eval_every=args.eval_every, workers=args.workers,
            scheduler=kube.cluster_address(args.scheduler, args.kubernetes),
            out=args.out, checkpoint_every=args.checkpoint_every,
            resume=args.resume, overwrite=args.overwrite, on_record=on_record,
            stages=stages, delta=args.delta, target_epsilon=args.target_epsilon, mode=mode,
            config=config.to_dict(args))  # RUN_DIR/config.toml repeats the run
    return cli_report.report_at_end(args, result.summary)


def _mu(args: argparse.Namespace, on_command_line: set[str]) -> float | None:
    # Config files written before --mu lost its default hold mu = 0.01 for every strategy.
    from_old_file = "mu" not in on_command_line and args.mu == 0.01 and args.strategy != "fedprox"
    return None if from_old_file else args.mu


_CHAIN_FLAGS = ("dp", "clip", "noise_multiplier", "target_epsilon", "delta", "compress")


def _chain_meta(args: argparse.Namespace) -> dict[str, Any]:
    meta = {k: getattr(args, k) for k in _CHAIN_FLAGS if getattr(args, k) is not None}
    return meta | ({"aggregator": args.aggregator} if args.aggregator != "mean" else {})


def _make_chain(args: argparse.Namespace, info: Any, partition: str | None) -> tuple | None:
    """The aggregation chain of the flags (None: the default chain), refused in one line when
    the settings do not go together; ``--target-epsilon`` alone sets ``--noise-multiplier``."""
    if not _chain_meta(args) and not args.reproducible_noise:
        return None
    from fedpipe import privacy
    from fedpipe.engine import fed_state
    from fedpipe.tasks import sampling

    name = fed_state.resolve_partition(info, partition)
    n_clients = len(info.partitions[name]["clients"])
    try:
        per_round = sampling.sample_size(n_clients, fraction=args.fraction,
                                         count=args.clients_per_round)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if args.dp is not None and args.noise_multiplier is None and args.target_epsilon is not None:
        delta = args.delta if args.delta is not None else 1e-5
        setup = privacy.DpSetup(args.dp, 1.0, n_clients, per_round, delta)
        args.noise_multiplier = privacy.calibrate(setup, args.rounds, args.target_epsilon)
    return registry.make_chain(dp=args.dp, clip=registry.parse_clip(args.clip),
                               noise_multiplier=args.noise_multiplier,
                               aggregator=args.aggregator, compress=args.compress,
                               clients_per_round=per_round, seed=args.seed,
                               reproducible_noise=args.reproducible_noise)


def _check_partition_options(args: argparse.Namespace, on_command_line: set[str]) -> None:
    """``--scheme`` and ``--alpha`` shape the partition ``--clients`` makes; alone, refuse them.

    ``scheme = "iid"`` from a config file is let through: run directories written before
    ``--scheme`` lost its default record it for runs on an existing partition.
    """
    if args.clients is not None and args.partition is not None:
        raise ValidationError(f"--clients {args.clients} makes a partition for this run and "
                              f"--partition {args.partition} names an existing one: give one")
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
    elif args.scheme == "column":  # it needs a feature column, which only `partition` takes
        raise ValidationError("--scheme column: make that partition with `fedpipe partition "
                              "STORE --clients K --scheme column --column NAME --name NAME`, "
                              "then give federate --partition NAME")
    elif args.scheme not in FEDERATE_SCHEMES:
        raise ValidationError(f"--scheme must be one of {', '.join(FEDERATE_SCHEMES)}, "
                              f"got {args.scheme!r}")


def _secure_chain(args: argparse.Namespace, info, partition: str | None,
                  base: tuple | None) -> tuple | None:
    """``base`` (None: the default chain) with a secure_sum stage last when asked for."""
    if not args.secure_aggregation:
        given = [flag for flag, on in (("--dropout", args.dropout != 0.0),
                                       ("--secagg-graph", args.secagg_graph != "full"),
                                       ("--secagg-threshold", args.secagg_threshold != 0.5),
                                       ("--secagg-bits", args.secagg_bits != 32),
                                       ("--secagg-bound", args.secagg_bound != 1e4)) if on]
        if given:
            raise ValidationError(f"{', '.join(given)} only apply with --secure-aggregation")
        return base
    gather = [s.name for s in base or () if getattr(s, "reduction", "sum") == "gather"]
    if gather:
        raise ValidationError(f"--secure-aggregation cannot be combined with --aggregator "
                              f"{args.aggregator}: the server would need every update in the "
                              "clear, and secure aggregation reveals only their sum")
    try:
        from fedpipe.tasks import aggregate, secure
    except ModuleNotFoundError as exc:
        raise ValidationError(f"--secure-aggregation needs the {exc.name} package: "
                              "pip install 'fedpipe[secagg]'") from None
    from fedpipe.engine.fed_state import resolve_partition

    n_clients = len(info.partitions[resolve_partition(info, partition)]["clients"])
    try:
        stage = secure.secure_sum(n_clients, bound=args.secagg_bound, bits=args.secagg_bits,
                                  threshold=args.secagg_threshold, graph=args.secagg_graph,
                                  dropout=args.dropout)
    except ValueError as exc:
        raise ValidationError(f"--secure-aggregation: {exc}") from None
    return (*(base or aggregate.default_chain()), stage)


def _partition_name(args: argparse.Namespace) -> str:
    alpha = "" if args.alpha is None else f"-a{args.alpha:g}"
    return f"federate-{args.scheme}-{args.clients}{alpha}-s{args.seed}"


def _make_partition(args: argparse.Namespace) -> str:
    from fedpipe.data.partition import partition

    name = _partition_name(args)
    partition(args.store, clients=args.clients, scheme=args.scheme, alpha=args.alpha,
              seed=args.seed, name=name)
    return name
