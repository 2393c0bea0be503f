"""``fedpipe federate --sites``: federated training on site-local stores.

Each client's worker was started at its site with ``--resources client-<id>=1`` and
``FEDPIPE_SITE_STORE`` naming its own store; this command connects to their scheduler, agrees
the schema, computes the statistics federatedly and runs the rounds
(:mod:`fedpipe.engine.sites`). It opens no store: there is none on the driver.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedpipe.cli import config, registry
from fedpipe.cli import report as cli_report
from fedpipe.errors import ValidationError

# federate options that shape a simulation: refused here
_NOT_WITH_SITES = ("clients", "scheme", "alpha", "partition", "workers")


def add_options(p: argparse.ArgumentParser) -> None:
    """Add the ``--sites`` group to ``fedpipe federate``."""
    g = p.add_argument_group("site-local stores (docs/federated.md): no STORE, --scheduler needed")
    g.add_argument("--sites", action="store_true",
                   help="each client's worker reads its own store (FEDPIPE_SITE_STORE)")
    g.add_argument("--site-impute", choices=["mean", "median", "none"], default="mean",
                   help="fill missing values with the federated column mean (default), or "
                        "median (from the sites' histograms: within one bin width)")
    g.add_argument("--no-standardize", action="store_true",
                   help="do not standardise with the federated mean and variance")
    g.add_argument("--share-label-counts", action="store_true",
                   help="sites report their label histograms (summary.json)")
    g.add_argument("--classes",
                   help="the label set, comma-separated (default: the union of the sites'); "
                        "a site with another label is refused")


def _labels(text: str | None) -> list | None:
    """The label set of ``--classes A,B,...``: whole numbers as int (as ingest stores labels),
    anything else as text; refused in one line when empty or repeated."""
    if text is None:
        return None
    found = [t.strip() for t in str(text).split(",") if t.strip()]
    out = [int(t) if t.lstrip("-").isdigit() else t for t in found]
    if not out or len(set(out)) != len(out):
        raise ValidationError(f"--classes must list distinct labels, e.g. 0,1,2; got {text!r}")
    return out


def check_options(args: argparse.Namespace) -> None:
    """One line for an option that does not go with (or without) ``--sites``."""
    if not args.sites:
        given = [f for f, on in (("--site-impute", args.site_impute != "mean"),
                                 ("--no-standardize", args.no_standardize),
                                 ("--share-label-counts", args.share_label_counts),
                                 ("--classes", args.classes is not None)) if on]
        if given:
            raise ValidationError(f"{', '.join(given)} only apply with --sites")
        if args.store is None:
            raise ValidationError("give STORE (a simulation from one store) or --sites")
        return
    if args.store is not None:
        raise ValidationError(f"--sites reads each client's own store on its worker: drop "
                              f"STORE {args.store}")
    bad = [k for k in _NOT_WITH_SITES if getattr(args, k, None) not in (None, False)]
    if bad:
        flags = ", ".join(b if b.startswith("--") else "--" + b.replace("_", "-") for b in bad)
        raise ValidationError(f"{flags} do not apply with --sites")
    _labels(args.classes)
    if args.scheduler is None and args.kubernetes is None:
        raise ValidationError("--sites needs --scheduler ADDRESS or --kubernetes NAME: the "
                              "site workers run elsewhere, each with its own store")


def _secagg(args: argparse.Namespace):
    """The statistics' secure aggregation settings: the run's threshold and mask graph."""
    if not args.secure_aggregation:
        return None
    from fedpipe.tasks import secure

    try:
        return secure.find([secure.secure_sum(1, threshold=args.secagg_threshold,
                                              graph=args.secagg_graph)])
    except ValueError as exc:
        raise ValidationError(f"--secure-aggregation: {exc}") from None


def run_sites(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fedpipe federate --sites``; returns the summary."""
    from fedpipe.cli import federate as cli_federate
    from fedpipe.cluster import connect
    from fedpipe.deploy import kube
    from fedpipe.engine import sites
    from fedpipe.monitor.dashboard import monitoring

    address = kube.cluster_address(args.scheduler, args.kubernetes)
    with connect(scheduler=address) as dc:
        plan = sites.prepare_sites(dc, impute=args.site_impute,
                                   standardize=not args.no_standardize,
                                   label_hist=args.share_label_counts,
                                   classes=_labels(args.classes), secagg=_secagg(args))
        model = registry.make_model(args.model, plan.info, hidden=args.hidden, l2=args.l2)
        strategy = registry.make_strategy(args.strategy, args.server_lr, args.mu,
                                          args.client_optimizer, args.lr)
        lr = None if strategy.client is not None else args.lr
        # the chain of a simulation's flags; the sites are its partition ("sites")
        stages = cli_federate._secure_chain(
            args, plan.info, "sites", cli_federate._make_chain(args, plan.info, "sites"))
        if args.lr_schedule:
            lr = registry.parse_schedule(args.lr_schedule, args.lr, total_steps=args.rounds,
                                         flag="--lr-schedule")
        with monitoring(args, dc, mode="federate", total=args.rounds, unit="round",
                        meta={"model": model.name, "strategy": args.strategy,
                              "sites": len(plan.clients),
                              **cli_federate._chain_meta(args)}) as on_record:
            result = sites.federate_sites(
                plan, model, dask_client=dc, rounds=args.rounds, strategy=strategy,
                local_epochs=args.local_epochs, batch_size=args.batch_size, lr=lr,
                fraction=args.fraction, clients_per_round=args.clients_per_round,
                min_clients=args.min_clients, deadline=args.deadline, seed=args.seed,
                test_fraction=args.test_fraction, eval_every=args.eval_every, out=args.out,
                checkpoint_every=args.checkpoint_every, resume=args.resume,
                overwrite=args.overwrite, on_record=on_record, config=config.to_dict(args),
                stages=stages, delta=args.delta, target_epsilon=args.target_epsilon)
    summary = result.summary
    if plan.label_hist is not None:
        summary["label_hist"] = plan.label_hist
    return cli_report.report_at_end(args, summary)
