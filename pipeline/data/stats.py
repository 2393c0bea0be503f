"""Column statistics of a store: one task per chunk, then a fan-in tree of merges.

The math is :mod:`fedpipe.tasks.stats`; this module only builds the Dask graph. Keys read like the
algorithm on the dashboard: ``("stats-chunk-<token>", i)`` then ``("stats-merge-<token>",
level, j)``. Without a ``dask_client`` the graph runs on the threaded scheduler, which is what
ingest uses (no cluster needed); X is never loaded whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.threaded
import numpy as np
from fedpipe.data.store import (
    ChunkRef,
    StoreInfo,
    chunk_refs,
    open_group,
    read_info,
    read_raw_chunk,
)
from fedpipe.engine.graph import fold_tree
from fedpipe.tasks import stats as stats_math

HIST_BINS = 1024


def _chunk_stats(url: str, ref: ChunkRef) -> stats_math.Stats:
    info = read_info(url)
    X, _ = read_raw_chunk(open_group(url), info, ref)
    return stats_math.chunk_stats(X)


def _chunk_hist(url: str, ref: ChunkRef, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    info = read_info(url)
    X, _ = read_raw_chunk(open_group(url), info, ref)
    return stats_math.chunk_histogram(X, lo, hi, HIST_BINS)


def _sum_all(parts: list[np.ndarray]) -> np.ndarray:
    return np.sum(parts, axis=0)


def tree_reduce(
    leaves: dict[Any, tuple], combine: Callable[[list], Any], name: str, fan_in: int = 8
) -> tuple[dict, Any]:
    """Add a fan-in tree over ``leaves`` to a graph; returns ``(graph, root_key)``.

    The tree is :func:`fedpipe.engine.graph.fold_tree`'s (the grouping :func:`~fedpipe.engine.graph.tree_sum`
    submits), written as graph keys ``(name, level, j)``. ``combine`` receives a list of at most
    ``fan_in`` partial results; a lone leaf still goes through it once.
    """
    graph = dict(leaves)

    def node(level: int, index: int, group: list) -> tuple:
        graph[(name, level, index)] = (combine, group)
        return (name, level, index)

    return graph, fold_tree(list(leaves), fan_in, node, min_levels=1)


def _run(graph: dict, key: Any, dask_client: Any | None) -> Any:
    if dask_client is None:
        return dask.threaded.get(graph, key)
    return dask_client.get(graph, key)


def compute_stats(
    url: str, *, dask_client: Any | None = None, median: bool = False, fan_in: int = 8
) -> dict[str, np.ndarray]:
    """Per-column count, sum, sum of squares, min and max (NaN-aware) of a store's X.

    Parameters
    ----------
    url : str
        Store location (workers open it themselves).
    dask_client : distributed.Client, optional
        Cluster to run on; the threaded scheduler when omitted.
    median : bool
        Also estimate column medians from a second pass of per-chunk histograms
        (``HIST_BINS`` equal-width bins between min and max; error at most one bin width).
    fan_in : int
        Partial results merged per tree node.
    """
    info = read_info(url)
    token = dask.base.tokenize(str(url), info.content_hash, info.n_rows)
    refs = chunk_refs(info)
    leaves = {(f"stats-chunk-{token}", r.index): (_chunk_stats, str(url), r) for r in refs}
    graph, root = tree_reduce(leaves, stats_math.merge_many, f"stats-merge-{token}", fan_in)
    result = dict(_run(graph, root, dask_client))
    if median:
        result["median"] = _medians(url, info, refs, result, token, dask_client, fan_in)
    return result


def merge_partials(partials: list[stats_math.Stats], fan_in: int = 8) -> dict[str, np.ndarray]:
    """Merge per-chunk statistics already computed (ingest takes them while writing) in the
    same fan-in tree, on the threaded scheduler."""
    token = dask.base.tokenize(len(partials), id(partials))
    leaves = {(f"stats-chunk-{token}", i): (_identity, p) for i, p in enumerate(partials)}
    graph, root = tree_reduce(leaves, stats_math.merge_many, f"stats-merge-{token}", fan_in)
    return dict(_run(graph, root, None))


def _identity(value):
    return value


def _medians(url, info: StoreInfo, refs, stats, token, dask_client, fan_in) -> np.ndarray:
    lo, hi = stats["min"], stats["max"]
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    leaves = {(f"hist-chunk-{token}", r.index): (_chunk_hist, str(url), r, lo, hi) for r in refs}
    graph, root = tree_reduce(leaves, _sum_all, f"hist-merge-{token}", fan_in)
    return stats_math.median_from_histogram(_run(graph, root, dask_client), lo, hi)


def stats_to_json(stats: dict[str, np.ndarray]) -> dict[str, list]:
    """JSON-safe lists (infinite min/max of an all-missing column become ``None``)."""
    out = {}
    for name, values in stats.items():
        out[name] = [None if not np.isfinite(v) else (int(v) if name == "count" else float(v))
                     for v in np.asarray(values)]
    return out
