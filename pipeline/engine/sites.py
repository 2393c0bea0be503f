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
import functools
import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

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
from fedpipe.engine.fed_client import SITES, ClientSpec
from fedpipe.errors import TrainingError, ValidationError
from fedpipe.model import saved as saved_model
from fedpipe.tasks import aggregate
from fedpipe.tasks import sites as sites_math
from fedpipe.tasks import stats as stats_math
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.models import Model

if TYPE_CHECKING:
    from fedpipe.tasks.secure import SecAgg

IMPUTE = ("none", "mean", "median")
MEDIAN_PASSES = 2  # zoom passes: the median within (max - min) / 1024^3 of the pooled one
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
    disclosed: tuple[str, ...] = ()


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
                    median: bool = False, secagg: SecAgg | None = None,
                    median_passes: int = MEDIAN_PASSES) -> dict[str, np.ndarray]:
    """Global per-feature statistics from the sites' packets, through the aggregation chain.

    Each site's pinned ``stats-…`` task runs the chain's client part on its packet; the packets
    add up in a fixed-order ``sum-stats-…`` tree on the workers (the grouping of
    :func:`fedpipe.engine.graph.tree_sum`); the chain's server part finishes them on the driver.
    Leaves and tree go as one graph: one round trip, as the pooled ``compute_stats``.
    ``features``: the agreed feature names (categories one-hot over their union), default
    each site's own. ``secagg``: the run's secure aggregation settings; then every pass is a
    secure sum and the driver learns only totals (:mod:`fedpipe.engine.sites_secure`).
    ``median``: a second pass (``hist-…``) sums the sites' histograms over ``HIST_BINS`` bins
    between the global min and max; ``median_passes`` more (``zoom-…``) each narrow the two
    middle ranks' windows ``HIST_BINS``-fold, so ``"median"`` is within
    ``(max - min) / HIST_BINS ** (1 + median_passes)`` of the pooled median (0 passes: the
    pooled store's ``--impute median``, which reads the same first bins).
    """
    features = list(features) if features is not None else None
    if secagg is not None:
        from fedpipe.engine import sites_secure  # needs the cryptography package: only then

        secure_run = sites_secure.SecureRunner(dask_client, clients, secagg)
        # the sites' statistics, cached on their workers for the passes, are freed at the end
        with placement.run_scope(dask_client, secure_run.token):
            stats = sites_secure.site_stats(secure_run, features)
            if median:
                stats["median"] = _median(secure_run, stats, features, median_passes)
        return stats
    run = functools.partial(_plain_pass, dask_client, clients)
    chain = tuple(stages) if stages is not None else (sites_math.stats_stage(),)
    stats = sites_math.finish_stats(run("stats", chain, site_tasks.stats_report, features))
    if median:
        stats["median"] = _median(run, stats, features, median_passes)
    return stats


def _plain_pass(dask_client: Client, clients: Sequence[str], name: str, chain: tuple,
                fn: Callable, *args: Any) -> dict:
    states = aggregate.init_states(chain, 0)
    return _through_chain(dask_client, clients, chain, states, name,
                          lambda c: _thunk(fn, c, chain, states, *args))


def _median(run: Callable[..., dict], stats: dict, features: list[str] | None,
            passes: int) -> np.ndarray:
    lo = np.where(np.isfinite(stats["min"]), stats["min"], 0.0)
    hi = np.where(np.isfinite(stats["max"]), stats["max"], 0.0)
    hist = (sites_math.hist_stage(),)
    counts = np.rint(run("hist", hist, site_tasks.hist_report, features, lo, hi,
                         HIST_BINS)["hist"])
    if passes == 0:
        return stats_math.median_from_histogram(counts, lo, hi)
    ranks = sites_math.middle_ranks(stats["count"])
    lo, hi, counts = np.tile(lo, 2), np.tile(hi, 2), np.vstack([counts, counts])
    for _ in range(passes):
        lo, hi = sites_math.zoom(counts, lo, hi, ranks)
        counts = np.rint(run("zoom", hist, site_tasks.zoom_report, features, lo, hi,
                             HIST_BINS)["hist"])
    return sites_math.median_of_windows(counts, lo, hi, ranks)


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
                  label_hist: bool = False, classes: Sequence[object] | None = None,
                  secagg: SecAgg | None = None,
                  median_passes: int = MEDIAN_PASSES) -> SitePlan:
    """Discover the sites, agree their schema and compute the global statistics.

    ``secagg``: compute the statistics by secure aggregation with these settings (threshold,
    mask graph), as the run's updates are: the driver learns sums over all sites only.
    ``plan.disclosed`` lists what the driver learned of the sites' data.
    """
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
                            median=impute == "median", secagg=secagg,
                            median_passes=median_passes)
    rows = {c: int(described[c]["n_rows"]) for c in clients}
    stats_json = stats_to_json({k: stats[k] for k in ("count", "sum", "sumsq", "min", "max",
                                                      "median") if k in stats})
    info = StoreInfo(url="sites:", n_rows=sum(rows.values()),
                     n_features=len(features), chunk_rows=0, n_chunks=0,
                     task=sites_math.agreed_task(schema["task"], union), classes=union,
                     feature_names=features, dtype=schema["dtype"],
                     preprocess={"impute": impute, "standardize": bool(standardize),
                                 "computed": "federated" if secagg is None
                                 else "federated, secure aggregation",
                                 **({"median_passes": int(median_passes)}
                                    if impute == "median" else {})},
                     # the sites are the run's partition: what the chain's options count
                     partitions={SITES: {"clients": {c: {"n_rows": n} for c, n in rows.items()}}},
                     stats=stats_json, columns=schema.get("columns"),
                     categorical=categories,
                     input_dtypes=dict(schema.get("input_dtypes") or {}),
                     target=schema.get("target"))
    hist = ({c: described[c]["label_hist"] for c in clients if "label_hist" in described[c]}
            if label_hist else None)
    return SitePlan(clients, rows, info, stats, hist,
                    tuple(disclosed(secure=secagg is not None, median=impute == "median",
                              label_hist=label_hist)))


def disclosed(*, secure: bool, median: bool, label_hist: bool) -> list[str]:
    """What the driver learns of the sites' data before round 0, in words (summary.json)."""
    out = ["each site's row count, schema (columns, dtypes, categories) and label set"]
    if label_hist:
        out.append("each site's label counts (--share-label-counts)")
    if secure:
        from fedpipe.engine.sites_secure import DISCLOSED

        return out + [DISCLOSED["stats"], DISCLOSED["extremes"]] + (
            [DISCLOSED["median"]] if median else [])
    out += ["sums over all sites of per-column count, sum, sum of squares and missing count",
            "each site's per-column min and max"]
    return out + (["sums over all sites of per-column histograms (the median's passes)"]
                  if median else [])


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
    spec = ClientSpec(url, SITES, version, float(test_fraction), int(seed), model,
                      int(local_epochs), int(batch_size), lr, strategy.client_transforms,
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
                "preprocess": dict(plan.info.preprocess), "disclosed": list(plan.disclosed)}
    if run_dir is not None:
        rundir.write_params(run_dir, model.unpack(state.params))
        saved_model.write(run_dir, model, plan.info)  # the global statistics: predict applies them
        rundir.write_summary(run_dir, summary)
        rundir.publish(run_dir)
    return fed.finished_run(model, state, history, summary, run_dir)
