"""Site-local federated data: schema agreement and preprocessing statistics from per-site sums.

Each site reports its schema (feature names, dtypes, label set) and a *statistics packet* of
plain sums (rows, count, sum, sum of squares, missing counts; min and max as gathered rows).
Packets go through the same aggregation chain as model updates
(:func:`fedpipe.tasks.aggregate.client_side` -> fixed-order :func:`~fedpipe.tasks.aggregate.add_packets`
tree -> :func:`~fedpipe.tasks.aggregate.server_side`), so the global statistics equal the pooled
computation up to floating-point rounding, and no row leaves its site.

References
----------
FATE, "Federated feature engineering": imputer and normaliser from aggregated statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from . import stats as stats_math
from .aggregate import GATHER, Packet, Stage, StageSpec, StageState

SCHEMA_KEYS = ("task", "dtype", "feature_names", "input_dtypes", "categorical", "target")


# --------------------------------------------------------------------------------------------
# schema agreement


def schema_digest(schema: Mapping[str, object]) -> str:
    """A short digest of a site's schema (without its labels, and its categorical columns'
    categories, both agreed as unions): equal schemas, equal digests."""
    schema = _without_categories(schema)
    text = json.dumps({k: _kind(schema.get(k)) if k == "task" else schema.get(k)
                       for k in SCHEMA_KEYS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def schema_difference(reference: Mapping[str, object], site: Mapping[str, object]) -> str | None:
    """How ``site``'s schema differs from ``reference`` in words, or None when they agree.

    A categorical column's categories may differ: the run one-hot encodes into their union.
    """
    reference, site = _without_categories(reference), _without_categories(site)
    ref_cols, cols = list(reference["feature_names"]), list(site["feature_names"])
    missing = [c for c in ref_cols if c not in cols]
    extra = [c for c in cols if c not in ref_cols]
    if missing:
        return f"missing column(s) {', '.join(map(str, missing))}"
    if extra:
        return f"extra column(s) {', '.join(map(str, extra))}"
    if cols != ref_cols:
        return "the same columns in another order"
    if _kind(reference.get("task")) != _kind(site.get("task")):
        return f"task {site.get('task')!r} where the others have {reference.get('task')!r}"
    for key in ("dtype", "target"):
        if reference.get(key) != site.get(key):
            return f"{key} {site.get(key)!r} where the others have {reference.get(key)!r}"
    ref_types, types = dict(reference.get("input_dtypes") or {}), dict(site.get("input_dtypes") or {})
    for col in sorted(set(ref_types) | set(types), key=str):
        if ref_types.get(col) != types.get(col):
            return f"column {col} has dtype {types.get(col)} where the others have {ref_types.get(col)}"
    if (reference.get("categorical") or {}) != (site.get("categorical") or {}):
        return "other categorical columns"
    return None


def _without_categories(schema: Mapping[str, object]) -> dict:
    """``schema`` with each categorical column's one-hot features folded back into the column."""
    categorical = dict(schema.get("categorical") or {})
    return {**schema, "categorical": sorted(categorical),
            "feature_names": _columns_of(list(schema["feature_names"]), categorical)}


def _columns_of(feature_names: list, categorical: Mapping[str, Sequence]) -> list:
    onehot = {f"{col}={v}": col for col, cats in categorical.items() for v in cats}
    out: list = []
    for name in feature_names:
        name = onehot.get(name, name)
        if not (out and out[-1] == name and name in categorical):
            out.append(name)
    return out


def union_categories(per_site: Sequence[Mapping[str, Sequence]]) -> dict[str, list]:
    """Each categorical column's categories: the union over the sites, numbers (in numeric
    order) before text (in text order), as ``fedpipe ingest`` orders one site's."""
    from .encode import category_key

    seen: dict[str, dict[str, object]] = {}
    for cats in per_site:
        for col, values in cats.items():
            for v in values:
                seen.setdefault(col, {}).setdefault(category_key(v), v)
    return {col: sorted(vals.values(), key=_category_order) for col, vals in seen.items()}


def _category_order(value: object) -> tuple:
    if isinstance(value, bool | int | float) and not isinstance(value, str):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def agreed_features(schema: Mapping[str, object], union: Mapping[str, Sequence]) -> list[str]:
    """The run's feature names: ``schema``'s, each categorical column one-hot over ``union``."""
    columns = _columns_of(list(schema["feature_names"]), dict(schema.get("categorical") or {}))
    return [n for c in columns for n in ([f"{c}={v}" for v in union[c]] if c in union else [c])]


def feature_map(site_features: Sequence[str], features: Sequence[str]) -> np.ndarray | None:
    """``column_in_run[site_column]``, or None when the site's features are the run's."""
    if list(site_features) == list(features):
        return None
    position = {name: i for i, name in enumerate(features)}
    return np.array([position[name] for name in site_features], dtype=np.int64)


def widen(X: np.ndarray, index: np.ndarray | None, n_features: int) -> np.ndarray:
    """A site's rows in the run's columns: a category the site never saw is a column of 0."""
    if index is None:
        return X
    out = np.zeros((X.shape[0], n_features), dtype=np.float64)
    out[:, index] = X
    return out


def _kind(task: object) -> object:
    # binary or multiclass follows from the labels a site happens to hold: agreed as a union
    return "classification" if task in ("binary", "multiclass") else task


def agreed_task(task: str, union: Sequence[object] | None) -> str:
    """The run's task: a classification task follows the size of the union of labels."""
    if _kind(task) != "classification" or union is None:
        return task
    return "binary" if len(union) <= 2 else "multiclass"


def reference_schema(schemas: Mapping[str, Mapping[str, object]],
                     order: Sequence[str]) -> Mapping[str, object]:
    """The schema most sites share (ties: the first site's in ``order``): the one others must match."""
    digests = {c: schema_digest(schemas[c]) for c in order}
    counts: dict[str, int] = {}
    for d in digests.values():
        counts[d] = counts.get(d, 0) + 1
    best = max(counts.values())
    first = next(c for c in order if counts[digests[c]] == best)
    return schemas[first]


def union_labels(label_sets: Sequence[Sequence[object] | None]) -> list | None:
    """The union of the sites' label sets in a deterministic order (sorted; numbers before text)."""
    if all(labels is None for labels in label_sets):
        return None
    seen = {label for labels in label_sets for label in (labels or ())}
    return sorted(seen, key=lambda v: (isinstance(v, str), v))


def label_map(site_labels: Sequence[object], union: Sequence[object]) -> np.ndarray:
    """``index_in_union[site_index]``: a site's label indices become the union's."""
    position = {label: i for i, label in enumerate(union)}
    return np.array([position[label] for label in site_labels], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# statistics through the aggregation chain


def stats_packet(X: np.ndarray) -> Packet:
    """One site's statistics packet: sums that add across sites, min/max as gathered rows."""
    return stats_packet_of(stats_math.chunk_stats(X), X.shape[0])


def stats_packet_of(s: stats_math.Stats, n_rows: int) -> Packet:
    """The packet of a site's merged :func:`fedpipe.tasks.stats.chunk_stats` over ``n_rows``."""
    return {"rows": np.array([float(n_rows)]), "count": s["count"].astype(np.float64),
            "sum": s["sum"], "sumsq": s["sumsq"],
            "missing": (n_rows - s["count"]).astype(np.float64),
            f"{GATHER}min": s["min"][None, :], f"{GATHER}max": s["max"][None, :]}


def stats_stage(name: str = "stats") -> Stage:
    """The statistics' aggregation stage: refuses non-finite sums on the site, reduces the
    gathered min/max rows on the server. Its ``"gather"`` reduction keeps one row per site."""

    def init(n_params: int) -> StageState:
        return {}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        from .aggregate import RejectedUpdate

        if not all(np.all(np.isfinite(packet[k])) for k in ("rows", "count", "sum", "sumsq")):
            raise RejectedUpdate("non-finite statistics")
        return packet

    def after_sum(total: Packet, state: StageState):
        out = {k: v for k, v in total.items() if not k.startswith(GATHER)}
        out["min"] = total[f"{GATHER}min"].min(axis=0, initial=np.inf)
        out["max"] = total[f"{GATHER}max"].max(axis=0, initial=-np.inf)
        return out, state, {"sites": float(total[f"{GATHER}min"].shape[0])}

    return Stage(name, init, before_sum, after_sum, reduction="gather",
                 spec=StageSpec(kind="stats"))


def hist_stage(name: str = "hist") -> Stage:
    """The median pass's aggregation stage: a site's per-column histogram over the agreed
    global bins is a sum like any other; non-finite or negative counts are refused on the site."""

    def init(n_params: int) -> StageState:
        return {}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        from .aggregate import RejectedUpdate

        counts = packet["hist"]
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise RejectedUpdate("histogram counts not finite and >= 0")
        return packet

    def after_sum(total: Packet, state: StageState):
        return dict(total), state, {}

    return Stage(name, init, before_sum, after_sum, spec=StageSpec(kind="hist"))


def hist_packet(X: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> Packet:
    """One site's histogram packet: its values counted in ``bins`` bins over ``[lo, hi]``
    (the global min and max, agreed in the first pass)."""
    return {"hist": stats_math.chunk_histogram(X, lo, hi, bins).astype(np.float64)}


def finish_stats(total: Packet) -> dict[str, np.ndarray]:
    """Global statistics from the server part's output: count, sum, sumsq, min, max, missing,
    mean and population variance per feature (the shape :mod:`fedpipe.tasks.stats` uses)."""
    out = {"count": np.rint(total["count"]).astype(np.int64), "sum": total["sum"],
           "sumsq": total["sumsq"], "min": total["min"], "max": total["max"],
           "missing": np.rint(total["missing"]).astype(np.int64)}
    n = np.maximum(out["count"], 1).astype(np.float64)
    out["mean"] = out["sum"] / n
    out["var"] = np.maximum(out["sumsq"] - out["sum"] * out["mean"], 0.0) / n
    return out


def preprocess_rows(X: np.ndarray, stats: Mapping[str, np.ndarray] | None, impute: str,
                    standardize: bool) -> np.ndarray:
    """A site's rows as float64 with the global imputation (mean) and standardisation applied."""
    if stats is None or (impute == "none" and not standardize):
        return np.asarray(X, dtype=np.float64)
    return stats_math.preprocess(X, stats, impute=impute, standardize=standardize,
                                 median=stats.get("median"))


# --------------------------------------------------------------------------------------------
# the median, refined: zoom into the bins of the two middle ranks


def middle_ranks(count: np.ndarray) -> np.ndarray:
    """The 0-based ranks of the two middle values of each column: ``(n-1)//2``, then ``n//2``."""
    count = np.asarray(count, dtype=np.int64)
    return np.concatenate([np.maximum(count - 1, 0) // 2, count // 2])


def zoom(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
         ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's window narrowed to the bin holding its rank: ``bins`` times narrower.

    ``counts`` are histograms over ``[lo, hi]`` with values outside clipped into the edge bins
    (:func:`fedpipe.tasks.stats.chunk_histogram`), so cumulative counts are ranks among all
    values and the rank's value lies in the bin found (up to rounding at its edges).
    """
    bins = counts.shape[1]
    width = (hi - lo) / bins
    at = np.array([min(int(np.searchsorted(np.cumsum(c), r + 1)), bins - 1)
                   for c, r in zip(counts, ranks, strict=True)])
    new_lo = np.where(hi > lo, lo + at * width, lo)
    return new_lo, np.where(hi > lo, np.minimum(new_lo + width, hi), hi)


def median_of_windows(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                      ranks: np.ndarray) -> np.ndarray:
    """Column medians from the last histograms of :func:`zoom`'s two windows per column: each
    middle value read inside its bin, within one bin width of the last windows."""
    n = len(ranks) // 2
    width = (hi - lo) / counts.shape[1]
    values = np.empty(len(ranks))
    for j, (c, r) in enumerate(zip(counts, ranks, strict=True)):
        cum = np.cumsum(c)
        if cum[-1] == 0:
            values[j] = np.nan
        elif hi[j] > lo[j]:
            values[j] = lo[j] + stats_math._rank_in_bins(cum, c, min(int(r), int(cum[-1]) - 1)) * width[j]
        else:
            values[j] = lo[j]
    return 0.5 * (values[:n] + values[n:])
