"""Site-local stores, worker side: each client's worker reads its OWN store, found on the worker.

A site's worker carries the resource ``client-<id>`` and knows where its store is from its own
configuration: the :class:`SiteStore` worker plugin (``dask worker --preload`` or
``Worker(plugins=...)``), else the environment variable ``FEDPIPE_SITE_STORE`` set where the
worker starts. A value containing ``{client}`` serves several sites from one worker (a gateway,
or a benchmark). The driver never sees these locations: it submits the pinned tasks below and
gets back only a schema, row counts, statistics packets and (with the user's leave) a label
histogram. Training rows are read by :func:`site_rows` inside the pinned training tasks and
kept in the worker's :class:`~fedpipe.engine.placement.ClientCache`, with the federated
preprocessing (global statistics) applied as they are read.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from fedpipe.data import store
from fedpipe.errors import StoreError
from fedpipe.tasks import aggregate
from fedpipe.tasks import sites as sites_math
from fedpipe.tasks import stats as stats_math

SITE_ENV = "FEDPIPE_SITE_STORE"
PLUGIN = "fedpipe-site-store"
SCHEME = "fedpipe-site:"  # ClientSpec.url of a site-local run: the scheme, then the plan as JSON


class SiteStore(WorkerPlugin):
    """Where this worker's site store is (``url`` may hold ``{client}``)."""

    name = PLUGIN

    def __init__(self, url: str) -> None:
        self.url = str(url)


def site_url(client: str) -> str:
    """This worker's store of ``client``, from its plugin or ``FEDPIPE_SITE_STORE``."""
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN)
    url = plugin.url if plugin is not None else os.environ.get(SITE_ENV, "")
    if not url:
        raise StoreError(f"worker {worker.name} carries client-{client} but knows no site store: "
                         f"set {SITE_ENV} where the worker starts")
    return url.replace("{client}", str(client))


def schema_of(info: store.StoreInfo) -> dict[str, Any]:
    """The schema a site reports: what must agree across sites (labels are agreed apart)."""
    return {"task": info.task, "dtype": info.dtype, "feature_names": list(info.feature_names),
            "input_dtypes": dict(info.input_dtypes or {}),
            "categorical": dict(info.categorical or {}), "target": info.target,
            "columns": list(info.columns or info.feature_names)}


def describe(client: str, label_hist: bool = False) -> dict[str, Any]:
    """Pinned task: the site's row count, schema, digest, labels (and histogram if allowed)."""
    info = store.read_info(site_url(client), partitions=False)
    schema = schema_of(info)
    out = {"client": str(client), "n_rows": int(info.n_rows), "schema": schema,
           "digest": sites_math.schema_digest(schema), "classes": info.classes}
    if label_hist and info.classes is not None:
        counts = np.zeros(len(info.classes), dtype=np.int64)
        for _, y in _raw_chunks(info):
            counts += np.bincount(np.asarray(y, dtype=np.int64), minlength=len(info.classes))
        out["label_hist"] = {str(c): int(n) for c, n in zip(info.classes, counts, strict=True)}
    return out


def _raw_chunks(info: store.StoreInfo):
    group = store.open_group(info.url)
    for ref in store.chunk_refs(info):
        yield store.read_raw_chunk(group, info, ref)


def stats_report(client: str, stages: tuple, states: dict,
                 features: list[str] | None = None) -> dict:
    """Pinned task: the site's statistics packet after the chain's client part (a round report).

    ``features``: the run's agreed feature names (categories one-hot over their union), into
    which the site's columns are widened first; None: the site's own.
    """
    info = store.read_info(site_url(client), partitions=False)
    features = list(info.feature_names) if features is None else features
    index = sites_math.feature_map(info.feature_names, features)
    parts = [stats_math.chunk_stats(sites_math.widen(X, index, len(features)))
             for X, _ in _raw_chunks(info)]
    merged = stats_math.merge_many(parts) if parts else stats_math.chunk_stats(
        np.zeros((0, len(features))))
    packet = sites_math.stats_packet_of(merged, info.n_rows)
    packet, rejected = aggregate.client_side(stages, states, packet)
    return aggregate.client_report(client, packet, {"n_rows": info.n_rows}, rejected)


def hist_report(client: str, stages: tuple, states: dict, features: list[str] | None,
                lo: np.ndarray, hi: np.ndarray, bins: int) -> dict:
    """Pinned task: the site's histogram packet over the global bins (the median's 2nd pass)."""
    info = store.read_info(site_url(client), partitions=False)
    features = list(info.feature_names) if features is None else features
    index = sites_math.feature_map(info.feature_names, features)
    total = np.zeros((len(features), bins))
    for X, _ in _raw_chunks(info):
        total += sites_math.hist_packet(sites_math.widen(X, index, len(features)), lo, hi,
                                        bins)["hist"]
    packet, rejected = aggregate.client_side(stages, states, {"hist": total})
    return aggregate.client_report(client, packet, {"n_rows": info.n_rows}, rejected)


def _site_stats(client: str, features: list[str] | None, token: str) -> tuple[dict, int]:
    """The site's merged statistics in the run's columns, read once per statistics pass
    ``token`` (the min/max search asks for them eight times) and freed with it."""
    from fedpipe.engine import placement  # placement dispatches here: import when used

    cache = placement.worker_cache().state
    key = (token, "site-stats", str(client))
    if key not in cache:
        info = store.read_info(site_url(client), partitions=False)
        names = list(info.feature_names) if features is None else features
        index = sites_math.feature_map(info.feature_names, names)
        parts = [stats_math.chunk_stats(sites_math.widen(X, index, len(names)))
                 for X, _ in _raw_chunks(info)]
        cache[key] = (stats_math.merge_many(parts) if parts else stats_math.chunk_stats(
            np.zeros((0, len(names)))), int(info.n_rows))
    return cache[key]


def secure_stats_report(client: str, stages: tuple, states: dict, features: list[str] | None,
                        token: str) -> dict:
    """Pinned task: the site's sums (no min/max: they cannot be summed) after the chain's
    client part, for a statistics pass under secure aggregation."""
    merged, n_rows = _site_stats(client, features, token)
    packet = {k: v for k, v in sites_math.stats_packet_of(merged, n_rows).items()
              if not k.startswith(aggregate.GATHER)}
    packet, rejected = aggregate.client_side(stages, states, packet)
    return aggregate.client_report(client, packet, {"n_rows": n_rows}, rejected)


def extremes_report(client: str, stages: tuple, states: dict, features: list[str] | None,
                    token: str, lo: np.ndarray, bits: int) -> dict:
    """Pinned task: one pass of the min/max search, which thresholds the site's max (and
    complemented min) lie at or above, as 0/1 (:mod:`fedpipe.tasks.secure_stats`)."""
    from fedpipe.tasks import secure_stats  # needs the cryptography package: only then

    merged, n_rows = _site_stats(client, features, token)
    keys = secure_stats.extreme_keys(merged["min"], merged["max"])
    packet = {"above": secure_stats.above(keys, secure_stats.search_thresholds(lo, bits))}
    packet, rejected = aggregate.client_side(stages, states, packet)
    return aggregate.client_report(client, packet, {"n_rows": n_rows}, rejected)


def zoom_report(client: str, stages: tuple, states: dict, features: list[str] | None,
                lo: np.ndarray, hi: np.ndarray, bins: int) -> dict:
    """Pinned task: the site's histograms over two windows per column (``lo``/``hi`` of
    length ``2 * n_features``), the median's refinement pass."""
    info = store.read_info(site_url(client), partitions=False)
    features = list(info.feature_names) if features is None else features
    index = sites_math.feature_map(info.feature_names, features)
    total = np.zeros((len(lo), bins))
    for X, _ in _raw_chunks(info):
        X = sites_math.widen(X, index, len(features))
        total += stats_math.chunk_histogram(np.hstack([X, X]), lo, hi, bins)
    packet, rejected = aggregate.client_side(stages, states, {"hist": total})
    return aggregate.client_report(client, packet, {"n_rows": info.n_rows}, rejected)


# --------------------------------------------------------------------------------------------
# training rows: what placement.client_rows serves for a site-local run


def plan_url(plan: dict[str, Any]) -> str:
    """The ``ClientSpec.url`` of a site-local run: the plan every site applies, as text."""
    return SCHEME + json.dumps(plan, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _plan(url: str) -> tuple[dict, dict[str, np.ndarray] | None]:
    plan = json.loads(url[len(SCHEME):])
    stats = plan.get("stats")
    arrays = None if stats is None else {
        k: np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        for k, vals in stats.items()}
    return plan, arrays


def site_rows(url: str, client: str, *, test_fraction: float, seed: int, run: str = "",
              version: str | None = None) -> tuple[tuple[np.ndarray, ...], bool]:
    """``((X_train, y_train, X_test, y_test), was_read)`` of this worker's site ``client``.

    Rows are preprocessed with the run's global statistics and labels mapped to the agreed
    union as they are read; cached on the worker like a simulated client's rows.
    """
    from fedpipe.engine import placement  # placement dispatches here: import when used

    cache = placement.worker_cache()
    key = (version or url, "site", str(client), float(test_fraction), int(seed))
    cache.runs.setdefault(key, set()).add(run)
    if key in cache.rows:
        return cache.rows[key], False
    plan, stats = _plan(url)
    info = store.read_info(site_url(client), partitions=False)
    remap = (sites_math.label_map(info.classes, plan["classes"])
             if plan.get("classes") is not None and info.classes is not None else None)
    features = plan.get("features") or list(info.feature_names)
    index = sites_math.feature_map(info.feature_names, features)
    sides: tuple[list, list] = ([], [])
    group = store.open_group(info.url)
    for ref in store.chunk_refs(info):
        X, y = store.read_raw_chunk(group, info, ref)
        X = sites_math.widen(X, index, len(features))  # one-hot into the union's categories
        X = sites_math.preprocess_rows(X, stats, plan["impute"], plan["standardize"])
        y = remap[np.asarray(y, dtype=np.int64)] if remap is not None else y
        for side, rows in zip(sides, store.split_rows(X, y, ref, test_fraction=test_fraction,
                                                      seed=seed), strict=True):
            side.append(rows)
    cache.rows[key] = tuple(part for side in sides
                            for part in placement._stack(side, len(features)))
    cache.reads += 1
    return cache.rows[key], True
