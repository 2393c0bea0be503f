"""Federated learning on site-local stores: every client keeps its own store on its own worker.

The driver never opens a client's store and never learns where it is. It finds the clients
from the workers' ``client-<id>`` resources, then asks each client's pinned task
(:mod:`fedpipe.data.sites`) for its schema and row count (:func:`agree`: mismatches stop the run
before round 0, in one line naming the client), sums the sites' statistics packets through the
aggregation chain (:func:`federated_stats`), and runs the federated round loop of
:mod:`fedpipe.engine.federate` with workers that read and preprocess their own rows
(:func:`federate_sites`).
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import dask
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, Nanny, Scheduler, SpecCluster, Worker
from fedpipe import rundir
from fedpipe.cluster import worker_log_level
from fedpipe.data import sites as site_tasks
from fedpipe.data.stats import HIST_BINS, stats_to_json, tree_reduce
from fedpipe.data.store import StoreInfo
from fedpipe.engine import fed_state, placement
from fedpipe.engine import federate as fed
from fedpipe.engine.fed_client import ClientSpec
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.model import saved as saved_model
from fedpipe.tasks import aggregate
from fedpipe.tasks import sites as sites_math
from fedpipe.tasks import stats as stats_math
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.models import Model

IMPUTE = ("none", "mean", "median")
FAN_IN = 8


class SitePlan(NamedTuple):
    """What the sites agreed before round 0: clients, rows, schema, labels, statistics.

    ``info`` is a :class:`~fedpipe.data.store.StoreInfo` of no store (``url`` ``"sites:"``): the
    agreed features, the union of labels and the global statistics, which is what a model, the
    run's ``preprocess.json`` and ``fedpipe predict`` need.
    """

    clients: list[str]
    rows: dict[str, int]
    info: StoreInfo
    stats: dict[str, np.ndarray]
    label_hist: dict[str, dict[str, int]] | None


@contextlib.contextmanager
def site_cluster(workers: Sequence[tuple[Sequence[str], str]], *,
                 processes: bool = True) -> Iterator[Client]:
    """A loopback cluster of site workers: ``(clients, store location)`` per worker.

    Each worker carries its clients' ``client-<id>`` resources and is told only its own store:
    as ``FEDPIPE_SITE_STORE`` in its process environment (``processes=True``, Nanny workers),
    else as a :class:`~fedpipe.data.sites.SiteStore` plugin. For tests, demos and benchmarks;
    a deployment starts ``dask worker`` at each site the same way (docs/federated.md).
    """
    specs = {}
    for j, (clients, url) in enumerate(workers):
        options: dict[str, Any] = {"nthreads": 1, "resources": placement.resources_of(clients),
                                   "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
        if processes:
            options["env"] = {**placement._BLAS_ENV, site_tasks.SITE_ENV: str(url)}
            options["silence_logs"] = worker_log_level()
        else:
            options["plugins"] = [site_tasks.SiteStore(url)]
        specs[f"site-{j}"] = {"cls": Nanny if processes else Worker, "options": options}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": "127.0.0.1:0",
                                             "host": "127.0.0.1"}}
    # as placement.simulation_cluster: every task is pinned, so nothing to steal or profile
    quiet = {"distributed.scheduler.work-stealing": False,
             "distributed.worker.profile.enabled": False}
    with (dask.config.set(quiet),
          SpecCluster(workers=specs, scheduler=scheduler, name="fedpipe-sites") as cluster,
          Client(cluster) as dask_client):
        yield dask_client


def site_clients(dask_client: Client) -> list[str]:
    """The clients of the cluster: every ``client-<id>`` resource some worker carries."""
    workers = dask_client.scheduler_info(n_workers=-1)["workers"].values()
    found = {name[len(placement.RESOURCE_PREFIX):] for w in workers
             for name, n in (w.get("resources") or {}).items()
             if name.startswith(placement.RESOURCE_PREFIX) and n}
    if not found:
        raise ValidationError(f"--sites: none of the {len(list(workers))} workers carries a "
                              "client-<id> resource (start each site's worker with --resources "
                              "client-<id>=1 and FEDPIPE_SITE_STORE)")
    return placement.sort_clients(sorted(found))


def _pinned(dask_client: Client, clients: Sequence[str], fn: Callable, *args: Any,
            prefix: str) -> list:
    token = uuid.uuid4().hex[:8]
    calls = {f"{prefix}-{token}-{c}": (_thunk(fn, c, *args), placement.resources_of([c]))
             for c in clients}
    return placement.submit_pinned(dask_client, calls)


def _thunk(fn: Callable, *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def agree(dask_client: Client, clients: Sequence[str], *, label_hist: bool = False,
          classes: Sequence[object] | None = None) -> tuple[dict[str, dict], list | None]:
    """Each client's description, once the schemas agree; and the union of their labels.

    Raises :class:`ValidationError` naming the first client (in client order) whose schema
    differs from the one most sites share, or whose label is not in ``classes`` when given.
    """
    reports = dask_client.gather(_pinned(dask_client, clients, site_tasks.describe, label_hist,
                                         prefix="schema"))
    described = {r["client"]: r for r in reports}
    reference = sites_math.reference_schema({c: described[c]["schema"] for c in clients},
                                            list(clients))
    for client in clients:
        why = sites_math.schema_difference(reference, described[client]["schema"])
        if why is not None:
            raise ValidationError(f"site client-{client}: {why}")
    if classes is not None:
        for client in clients:
            unseen = [c for c in described[client]["classes"] or () if c not in classes]
            if unseen:
                raise ValidationError(f"site client-{client}: unseen label(s) "
                                      f"{', '.join(map(str, unseen))}")
    union = sites_math.union_labels([described[c]["classes"] for c in clients])
    if classes is not None:
        union = list(classes)
    return described, union


def federated_stats(dask_client: Client, clients: Sequence[str],
                    stages: Sequence[Stage] | None = None,
                    features: Sequence[str] | None = None,
                    median: bool = False) -> dict[str, np.ndarray]:
    """Global per-feature statistics from the sites' packets, through the aggregation chain.

    Each site's pinned ``stats-…`` task runs the chain's client part on its packet; the packets
    add up in a fixed-order ``sum-stats-…`` tree on the workers (the grouping of
    :func:`fedpipe.engine.graph.tree_sum`); the chain's server part finishes them on the driver.
    Leaves and tree go as one graph: one round trip, as the pooled ``compute_stats``.
    ``features``: the agreed feature names (categories one-hot over their union), default
    each site's own. ``median``: a second pass (``hist-…``) sums the sites' histograms over
    ``HIST_BINS`` bins between the global min and max, and ``"median"`` is the median read off
    them, within one bin width, ``(max - min) / HIST_BINS``, of the pooled median (equal to the
    pooled store's ``--impute median``, which reads the same bins).
    """
    features = list(features) if features is not None else None
    chain = tuple(stages) if stages is not None else (sites_math.stats_stage(),)
    states = aggregate.init_states(chain, 0)
    packet = _through_chain(dask_client, clients, chain, states, "stats",
                            lambda c: _thunk(site_tasks.stats_report, c, chain, states, features))
    stats = sites_math.finish_stats(packet)
    if median:
        lo = np.where(np.isfinite(stats["min"]), stats["min"], 0.0)
        hi = np.where(np.isfinite(stats["max"]), stats["max"], 0.0)
        hist = (sites_math.hist_stage(),)
        hstates = aggregate.init_states(hist, 0)
        total = _through_chain(dask_client, clients, hist, hstates, "hist", lambda c: _thunk(
            site_tasks.hist_report, c, hist, hstates, features, lo, hi, HIST_BINS))
        stats["median"] = stats_math.median_from_histogram(np.rint(total["hist"]), lo, hi)
    return stats


def _through_chain(dask_client: Client, clients: Sequence[str], chain: tuple, states: dict,
                   name: str, task: Callable[[str], Callable]) -> dict:
    """The server part's output on the sum of the sites' ``task`` packets: one graph."""
    token = uuid.uuid4().hex[:8]
    layers, deps = {}, {}
    for c in clients:
        key = (f"{name}-{token}", c)
        layers[key] = MaterializedLayer({key: (task(c),)},
                                        annotations={"resources": placement.resources_of([c])})
        deps[key] = set()
    leaves = {key: None for key in layers}
    tree, root = tree_reduce(leaves, _add_reports, f"sum-{name}-{token}", FAN_IN)
    nodes = {k: v for k, v in tree.items() if k not in leaves}
    layers["tree"], deps["tree"] = MaterializedLayer(nodes), set(leaves)
    total = dask_client.get(HighLevelGraph(layers, deps), root)
    rejected = {c: r["rejected"] for c, r in total["clients"].items() if "rejected" in r}
    if rejected or total["packet"] is None:
        raise TrainingError(f"statistics refused by site(s): {rejected}")
    packet, _, _ = aggregate.server_side(chain, states, total["packet"])
    return packet


def _add_reports(reports: list[dict]) -> dict:
    return aggregate.add_reports(*reports)


def prepare_sites(dask_client: Client, *, impute: str = "mean", standardize: bool = True,
                  label_hist: bool = False,
                  classes: Sequence[object] | None = None) -> SitePlan:
    """Discover the sites, agree their schema and compute the global statistics."""
    if impute not in IMPUTE:
        raise ValidationError(f"--site-impute must be one of {', '.join(IMPUTE)}, "
                              f"got {impute!r}")
    clients = site_clients(dask_client)
    described, union = agree(dask_client, clients, label_hist=label_hist, classes=classes)
    schema = sites_math.reference_schema({c: described[c]["schema"] for c in clients}, clients)
    categories = sites_math.union_categories(
        [described[c]["schema"].get("categorical") or {} for c in clients])
    features = sites_math.agreed_features(schema, categories)
    stats = federated_stats(dask_client, clients, features=features,
                            median=impute == "median")
    rows = {c: int(described[c]["n_rows"]) for c in clients}
    stats_json = stats_to_json({k: stats[k] for k in ("count", "sum", "sumsq", "min", "max",
                                                      "median") if k in stats})
    info = StoreInfo(url="sites:", n_rows=sum(rows.values()),
                     n_features=len(features), chunk_rows=0, n_chunks=0,
                     task=sites_math.agreed_task(schema["task"], union), classes=union,
                     feature_names=features, dtype=schema["dtype"],
                     preprocess={"impute": impute, "standardize": bool(standardize),
                                 "computed": "federated"},
                     # the sites are the run's partition: what the chain's options count
                     partitions={"sites": {"clients": {c: {"n_rows": n} for c, n in rows.items()}}},
                     stats=stats_json, columns=schema.get("columns"),
                     categorical=categories,
                     input_dtypes=dict(schema.get("input_dtypes") or {}),
                     target=schema.get("target"))
    hist = ({c: described[c]["label_hist"] for c in clients if "label_hist" in described[c]}
            if label_hist else None)
    return SitePlan(clients, rows, info, stats, hist)


def _plan_url(plan: SitePlan) -> str:
    pre = plan.info.preprocess
    return site_tasks.plan_url({"impute": pre["impute"], "standardize": pre["standardize"],
                                "classes": plan.info.classes, "stats": plan.info.stats,
                                "features": plan.info.feature_names})


def federate_sites(plan: SitePlan, model: Model, *, dask_client: Client, rounds: int,
                   strategy: Strategy | None = None, local_epochs: int | None = None,
                   batch_size: int = 32, lr: float | Callable[[int], float] | None = None,
                   fraction: float | None = None,
                   clients_per_round: int | None = None, min_clients: int = 1,
                   deadline: float | None = None, retries: int = fed.RETRIES,
                   stages: Sequence[Stage] | None = None, seed: int = 0,
                   test_fraction: float = 0.2, eval_every: int = 1, batch_clients: bool = True,
                   out: str | None = None, checkpoint_every: int = 0, resume: bool = False,
                   overwrite: bool = False, on_record: Callable[[dict], None] | None = None,
                   config: Mapping[str, object] | None = None, delta: float | None = None,
                   target_epsilon: float | None = None,
                   diverge_factor: float | None = fed.DIVERGE_FACTOR) -> fed.Run:
    """Federated training on the site-local stores of :func:`prepare_sites`'s ``plan``.

    The options are :func:`fedpipe.engine.federate.federate`'s; the loop, deadlines, stages
    (DP, clipping, compression, robust aggregators, secure aggregation), privacy accounting,
    checkpoints and summary are the same. Each site's worker reads its own store, applies the
    global statistics and maps its labels to the agreed union as it reads.
    """
    clients = plan.clients
    sampling_ = fed_state.check_sampling(len(clients), fraction, clients_per_round,
                                         min_clients, deadline, retries)
    strategy = strategy or aggregate.fedavg()
    local_epochs, lr, stages = fed._from_strategy(strategy, local_epochs, lr, stages)
    fed_state.check_positive(rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
                             eval_every=eval_every)
    if resume and out is None:
        raise ValidationError("--resume needs --out RUN_DIR (the run to continue)")
    chain = tuple(stages) if stages is not None else aggregate.default_chain()
    try:
        aggregate.check_chain(chain)
    except ValueError as exc:
        raise ValidationError(f"stages: {exc}") from None
    dp = fed._privacy(chain, len(clients), sampling_, delta, target_epsilon)
    url = _plan_url(plan)
    version = hashlib.sha256(url.encode()).hexdigest()[:20]
    spec = ClientSpec(url, "sites", version, float(test_fraction), int(seed), model,
                      int(local_epochs), int(batch_size), lr, strategy.mu, strategy.scaffold,
                      chain, uuid.uuid4().hex[:12], strategy.client)
    round_fn = fed.round_for(chain, len(clients), sampling_)
    run_dir = rundir.prepare(out, resume, overwrite) if out is not None else None
    if run_dir is not None:
        rundir.write_config(run_dir, config if config is not None else {
            "command": "federate", "sites": True, "model": model.name, "rounds": rounds,
            "not_repeatable": ["a Python call: give the same arguments to federate_sites"]})
    groups = placement.discover(dask_client, clients)
    with placement.run_scope(dask_client, spec.token):
        placement.set_no_workers_timeout(dask_client, deadline or fed.DEFAULT_NO_WORKER_TIMEOUT)
        state, history, summary = fed.run_rounds(
            dask_client, spec, groups, clients, strategy, sampling_,
            fed._Guards(dp, target_epsilon, diverge_factor), round_fn, rounds=rounds,
            eval_every=eval_every, batch_clients=batch_clients, run_dir=run_dir,
            checkpoint_every=checkpoint_every, on_record=on_record, resume=resume)
    summary |= {"sites": len(clients), "rows": int(sum(plan.rows.values())),
                "preprocess": dict(plan.info.preprocess)}
    if run_dir is not None:
        rundir.write_params(run_dir, model.unpack(state.params))
        saved_model.write(run_dir, model, plan.info)  # the global statistics: predict applies them
        rundir.write_summary(run_dir, summary)
        rundir.publish(run_dir)
    return fed.finished_run(model, state, history, summary, run_dir)
