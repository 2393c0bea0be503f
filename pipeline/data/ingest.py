"""Ingest a source into a checked zarr v3 store, streaming, atomically, with progress.

Rows arrive in batches from :mod:`fedpipe.data.sources`, are validated, regrouped into whole row
chunks and written one chunk at a time, so memory is bounded by a few chunks whatever the
source size. Everything is written under a temporary name beside STORE and moved into place
only after the last attribute is written; on any error the temporary store is deleted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import zarr
from fedpipe.data import sources as sources_mod
from fedpipe.data import stats as stats_mod
from fedpipe.data.store import (
    FORMAT_VERSION,
    StoreInfo,
    chunk_digest,
    chunk_key,
    content_hash,
    open_group,
    read_info,
    row_array,
    staged,
)
from fedpipe.errors import ValidationError
from fedpipe.tasks import stats as stats_math
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

log = logging.getLogger("fedpipe")

DTYPES = ("float32", "float64")
IMPUTE = ("none", "mean", "median")
TASKS = ("regression", "binary", "multiclass")
MAX_CLASSES = 50  # inferring the task: integer targets with at most this many values are classes
MAX_LABELS = 100_000  # distinct labels tracked while streaming (an explicit task may use many)
CHUNK_BYTES = 8 << 20
# In-memory sources are written several whole chunks per zarr call, so zarr compresses them
# concurrently. Streamed sources go one chunk at a time: a parsed CSV batch costs several
# times its size in memory, and the point of streaming is a small, bounded footprint.
WRITE_BYTES = 64 << 20


def ingest(
    source: str,
    store: str,
    *,
    target: str | None = None,
    chunk_rows: int | None = None,
    dtype: str = "float64",
    impute: str = "none",
    standardize: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    task: str | None = None,
    labels: str | None = None,
    categorical: list[str] | None = None,
    feature_chunks: int | None = None,
) -> StoreInfo:
    """Validate ``source`` and write it as a fedpipe store at ``store``.

    Parameters
    ----------
    source : str
        ``sklearn:NAME``, ``synthetic:classification?...``, ``synthetic:regression?...``,
        or a path to an ``.npz`` (arrays ``X``, ``y``), ``.npy`` (``X`` only: give
        ``labels``), ``.csv`` or ``.parquet`` file.
    store : str
        Local path or fsspec URL (``memory://...``) of the zarr store to create.
    target : str, optional
        Label column of a CSV/Parquet source (default: a column named target, y or label).
    chunk_rows : int, optional
        Rows per chunk; by default about 8 MiB of float64 features per chunk.
    dtype : {"float32", "float64"}
        Storage type of ``X``.
    impute : {"none", "mean", "median"}
        With ``"none"`` a NaN or inf is an error; otherwise it is stored as NaN and replaced
        when read (median: approximate, from a 1024-bin histogram).
    standardize : bool
        Standardise features when read, with the stored statistics.
    overwrite : bool
        Replace an existing store.
    progress : bool
        Show a progress bar on stderr.
    task : {"regression", "binary", "multiclass"}, optional
        Override the task known to the source or inferred from ``y``.
    labels : str, optional
        The ``.npy`` file of ``y`` for a ``.npy`` source (``--labels``).
    categorical : list of str, optional
        Feature columns of a CSV/Parquet table to one-hot encode (columns holding text are
        encoded without being named). The categories are stored (``info.categorical``); the
        features are named ``column=value``. At predict time a category not seen here gives
        a row of zeros in its columns, as does a missing value.
    feature_chunks : int, optional
        Also cut ``X`` into this many column blocks (chunks of ``chunk_rows`` x
        ``ceil(features / feature_chunks)``): a model-parallel shard then reads only its own
        columns (``info.feature_chunk`` is the width). Default: rows only.

    String and boolean labels are kept in their original form as ``info.classes`` (``y``
    holds their indices); they make the task classification.

    Returns
    -------
    StoreInfo
        Metadata of the new store.
    """
    _check_options(chunk_rows, dtype, impute, task)
    src = sources_mod.open_source(source, target=target, labels=labels,
                                  categorical=categorical)
    return _ingest_source(src, store, chunk_rows=chunk_rows, dtype=dtype, impute=impute,
                          standardize=standardize, overwrite=overwrite, progress=progress, task=task,
                          feature_chunks=feature_chunks)


def ingest_arrays(
    X: np.ndarray,
    y: np.ndarray,
    store: str,
    *,
    feature_names: list[str] | None = None,
    task: str | None = None,
    chunk_rows: int | None = None,
    dtype: str = "float64",
    impute: str = "none",
    standardize: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    feature_chunks: int | None = None,
) -> StoreInfo:
    """Write in-memory arrays ``X`` (rows x features) and ``y`` as a fedpipe store.

    Same checks and options as :func:`ingest`; ``feature_names`` default to ``x0, x1, ...``
    and the task is inferred from ``y`` unless given.
    """
    _check_options(chunk_rows, dtype, impute, task)
    src = sources_mod.from_arrays("arrays", X, y, feature_names, None)
    return _ingest_source(src, store, chunk_rows=chunk_rows, dtype=dtype, impute=impute,
                          standardize=standardize, overwrite=overwrite, progress=progress, task=task,
                          feature_chunks=feature_chunks)


def ingest_blocks(X, y, store: str, *, chunk_rows: int | None = None, task: str | None = None,
                  overwrite: bool = False) -> StoreInfo:
    """Write Dask arrays ``X`` (rows x features) and ``y`` as a store, one row block at a time.

    Only one block of rows is in the driver's memory at once (a zarr-backed Dask array is
    read block by block), so the arrays may be larger than memory.
    """
    _check_options(chunk_rows, "float64", "none", task)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValidationError(f"X must be 2-D and y 1-D with as many rows, got {X.shape}, {y.shape}")
    X = X.rechunk({1: -1})
    y = y.rechunk((X.chunks[0],))

    def batches(batch_rows: int):
        for i in range(X.numblocks[0]):
            xb, yb = X.blocks[i].compute(), y.blocks[i].compute()
            yield np.asarray(xb, dtype=np.float64), np.asarray(yb, dtype=np.float64), len(yb)

    src = sources_mod.Source("dask arrays", [f"x{j}" for j in range(X.shape[1])], None,
                             int(X.shape[0]), int(X.shape[0]), batches)
    return _ingest_source(src, store, chunk_rows=chunk_rows, dtype="float64", impute="none",
                          standardize=False, overwrite=overwrite, progress=False, task=task)


def _ingest_source(src, store, *, chunk_rows, dtype, impute, standardize, overwrite, progress,
                   task, feature_chunks=None) -> StoreInfo:
    n_features = len(src.feature_names)
    rows = chunk_rows or int(np.clip(CHUNK_BYTES // (8 * max(n_features, 1)), 1024, 1 << 20))
    width = _feature_chunk(feature_chunks, n_features)
    with staged(store, overwrite=overwrite) as tmp:
        meta = _write_rows(src, tmp, rows, dtype, impute, progress, width)
        partials = meta.pop("partials")
        meta["task"], meta["classes"] = _decide_task(src, meta.pop("labels"), task)
        _write_labels(tmp, meta, rows)
        if src.classes is not None:  # y holds indices into the original labels
            meta["classes"] = [src.classes[int(i)] for i in meta["classes"]]
        meta.update(columns=src.columns or src.feature_names, categorical=src.categorical,
                    input_dtypes=src.dtypes, target=src.target)
        meta.update(feature_names=src.feature_names, chunk_rows=rows, dtype=dtype,
                    preprocess={"impute": impute, "standardize": bool(standardize)},
                    partitions={}, stats=None, source=src.name, format=FORMAT_VERSION)
        group = open_group(tmp, mode="r+")
        group.attrs["fedpipe"] = meta
        if impute == "median":  # the histograms need min/max first: a second pass over the store
            stats = stats_mod.compute_stats(tmp, median=True)
        else:
            stats = stats_mod.merge_partials(partials)
        group.attrs["fedpipe"] = {**meta, "stats": stats_mod.stats_to_json(stats)}
    info = read_info(store)
    log.debug("ingested %s: %d rows x %d features in %d chunks -> %s",
             src.name, info.n_rows, info.n_features, info.n_chunks, store)
    return info


def _feature_chunk(feature_chunks: int | None, n_features: int) -> int | None:
    """Columns per chunk of ``X`` for ``feature_chunks`` column blocks (``None``: one block)."""
    if feature_chunks is None:
        return None
    if not isinstance(feature_chunks, int | np.integer) or not 1 <= feature_chunks <= n_features:
        raise ValidationError(f"--feature-chunks must be in 1..{n_features} (the features), "
                              f"got {feature_chunks}")
    return -(-n_features // int(feature_chunks))


def _check_options(chunk_rows, dtype, impute, task) -> None:
    if chunk_rows is not None and (not isinstance(chunk_rows, int | np.integer) or chunk_rows <= 0):
        raise ValidationError(f"--chunk-rows must be a positive integer, got {chunk_rows}")
    if dtype not in DTYPES:
        raise ValidationError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if impute not in IMPUTE:
        raise ValidationError(f"--impute must be one of {', '.join(IMPUTE)}, got {impute!r}")
    if task is not None and task not in TASKS:
        raise ValidationError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def _rechunk(batches: Iterator, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Regroup batches of any size into blocks of exactly ``rows`` rows (the last may be short)."""
    xs, ys, held, units = [], [], 0, 0
    for X, y, step in batches:
        xs.append(X)
        ys.append(y)
        held += len(y)
        units += step
        while held >= rows:
            X_all, y_all = _join(xs), _join(ys)
            yield X_all[:rows], y_all[:rows], units
            held, units = held - rows, 0
            # Keep only a non-empty remainder, so aligned batches are never copied.
            xs, ys = ([X_all[rows:]], [y_all[rows:]]) if held else ([], [])
    if held:
        yield _join(xs), _join(ys), units


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _check_batch(src, X: np.ndarray, y: np.ndarray, first_row: int, impute: str) -> np.ndarray:
    bad_y = ~np.isfinite(y)
    if bad_y.any():
        row = first_row + int(np.argmax(bad_y))
        raise ValidationError(f"source {src.name}: target is missing or infinite at row {row}")
    bad = ~np.isfinite(X)
    if not bad.any():
        return X
    if impute == "none":
        r, c = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(X[r, c]) else "inf"
        raise ValidationError(
            f"source {src.name}: column {src.feature_names[c]!r} has {kind} at row {first_row + r}"
            " (use --impute mean|median)")
    return np.where(bad, np.nan, X)  # inf is treated as missing when imputing


def _progress(enabled: bool, total: int, label: str = "ingest") -> Progress:
    columns = [TextColumn(label), BarColumn(), TaskProgressColumn(), TimeRemainingColumn()]
    # stderr, so that --json keeps stdout to one line.
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)


def _write_rows(src, url: str, rows: int, dtype: str, impute: str, progress: bool,
                width: int | None = None) -> dict:
    """Stream rows into X and the raw labels into ``_labels``; returns partial metadata."""
    group = zarr.open_group(url, mode="w", zarr_format=3)
    nf = len(src.feature_names)
    # A streamed source grows the arrays chunk by chunk; a known length saves the resizes.
    known = src.n_rows or 0
    X_arr = row_array(group, "X", n_cols=nf, rows=rows, dtype=dtype, length=known, col_chunk=width)
    lab = row_array(group, "_labels", n_cols=None, rows=rows, dtype="float64", length=known)
    hx = hashlib.sha256()
    partials: list = []  # per-chunk column statistics, taken while the rows are in memory
    x_crcs: list[int] = []
    labels: set[float] | None = set()
    n = 0
    pending = None  # the previous block's write, overlapped with checking/hashing the next
    with ThreadPoolExecutor(1, thread_name_prefix="fedpipe-write") as writer, \
            _progress(progress, src.progress_total) as bar:
        task_id = bar.add_task("ingest", total=src.progress_total)
        block = rows * max(1, WRITE_BYTES // (rows * 8 * max(nf, 1))) if src.in_memory else rows
        for X, y, units in _rechunk(src.batches(block), block):
            X = _check_batch(src, X, y, n, impute).astype(dtype, copy=False)
            if pending is not None:
                pending.result()
            if n + len(y) > known:
                X_arr.resize((n + len(y), nf))
                lab.resize((n + len(y),))
            pending = writer.submit(_write_block, X_arr, lab, n, X, y)
            hx.update(np.ascontiguousarray(X))
            partials += [stats_math.chunk_stats(X[i : i + rows]) for i in range(0, len(y), rows)]
            # each chunk's digest starts with its X bytes; _write_labels adds its y
            x_crcs += [crc32c.crc32c(np.ascontiguousarray(X[i : i + rows]))
                       for i in range(0, len(y), rows)]
            if labels is not None:
                labels.update(np.unique(y).tolist())
                labels = labels if len(labels) <= MAX_LABELS else None
            n += len(y)
            bar.update(task_id, advance=units)
        if pending is not None:
            pending.result()
    if n == 0:
        raise ValidationError(f"source {src.name} has no rows")
    n_chunks = -(-n // rows)
    manifest = {"X": [chunk_key("", "X", i) for i in range(n_chunks)] if width is None else
                [f"X/c/{i}/{j}" for i in range(n_chunks) for j in range(-(-nf // width))]}
    return {"n_rows": n, "n_features": nf, "n_chunks": n_chunks, "manifest": manifest,
            **({"feature_chunk": width} if width is not None else {}),
            "labels": labels, "x_digest": hx.hexdigest(), "partials": partials,
            "x_crcs": x_crcs}


def _write_block(X_arr, lab, start: int, X: np.ndarray, y: np.ndarray) -> None:
    X_arr[start : start + len(y)] = X
    lab[start : start + len(y)] = y


def _decide_task(src, labels: set[float] | None, task: str | None) -> tuple[str, list | None]:
    """Task from the override, the source, or y: few integer values means classification."""
    integer = labels is not None and all(float(v).is_integer() for v in labels)
    if src.classes is not None:  # text or bool labels name classes: never a regression
        if task == "regression":
            raise ValidationError(f"source {src.name}: labels {src.classes[:3]}... are not "
                                  "numbers, so the task cannot be regression")
        task = task or ("binary" if len(src.classes) <= 2 else "multiclass")
    task = task or src.task
    if task is None:
        if not integer or len(labels) > MAX_CLASSES:
            task = "regression"
        else:
            task = "binary" if len(labels) <= 2 else "multiclass"
    if task == "regression":
        return task, None
    if labels is None:
        raise ValidationError(f"source {src.name}: task {task} but y has more than {MAX_LABELS} distinct values")
    if not integer:
        bad = next(v for v in sorted(labels) if not float(v).is_integer())
        raise ValidationError(f"source {src.name}: task {task} needs integer labels, found {bad}")
    if task == "binary" and len(labels) > 2:
        raise ValidationError(f"source {src.name}: task binary but y has {len(labels)} classes")
    return task, [int(v) for v in sorted(labels)]


def _write_labels(url: str, meta: dict, rows: int) -> None:
    """Write final ``y`` (class indices or float targets) from ``_labels``, chunk by chunk."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    raw = group["_labels"]
    classes = meta["classes"]
    dtype = "int64" if classes is not None else "float64"
    y_arr = row_array(group, "y", n_cols=None, rows=rows, dtype=dtype, length=raw.shape[0])
    hy, digests = hashlib.sha256(), []
    lookup = np.asarray(classes, dtype=np.float64) if classes is not None else None
    for i in range(meta["n_chunks"]):
        block = raw.blocks[i]
        out = np.searchsorted(lookup, block).astype(np.int64) if lookup is not None else block
        y_arr.blocks[i] = out
        hy.update(np.ascontiguousarray(out))
        digests.append(chunk_digest(None, out, meta["x_crcs"][i]))
    del group["_labels"]
    meta["manifest"]["y"] = [chunk_key("", "y", i) for i in range(meta["n_chunks"])]
    meta["chunk_digests"] = {"X": digests}
    del meta["x_crcs"]
    meta["content_hash"] = content_hash(bytes.fromhex(meta.pop("x_digest")), hy.digest())
