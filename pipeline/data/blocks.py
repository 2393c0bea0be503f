"""Reading one feature block of one row chunk: what a model-parallel shard's worker reads.

A store ingested with ``feature_chunks=F`` (``fedpipe ingest --feature-chunks F``) chunks ``X``
in two dimensions, ``chunk_rows`` x ``feature_chunk`` columns, so :func:`read_columns` fetches
and decodes only the stored chunks of its columns (each checked by its crc32c codec and the
manifest). On a row-chunked store it reads the row chunk and keeps the columns. Preprocessing
and the train/test split are those of :func:`fedpipe.data.store.read_chunk`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from fedpipe.data import store
from fedpipe.data.store import ChunkRef, StoreError, StoreInfo
from zarr.core.sync import sync

Side = tuple[np.ndarray, np.ndarray]


def feature_chunk(info: StoreInfo) -> int | None:
    """Columns per stored chunk of ``X`` (``None``: the store chunks rows only)."""
    width = getattr(info, "feature_chunk", None)
    return int(width) if width else None


def x_keys(info: StoreInfo, index: int, cols: tuple[int, int]) -> list[str]:
    """Store keys of row chunk ``index`` of ``X`` that hold columns ``cols``."""
    width = feature_chunk(info) or info.n_features
    first, last = cols[0] // width, (cols[1] - 1) // width
    return [f"X/c/{index}/{j}" for j in range(first, last + 1)]


def read_columns(url: str, info: StoreInfo, ref: ChunkRef, cols: tuple[int, int], *,
                 test_fraction: float, seed: int) -> tuple[Side, Side]:
    """``((X_train, y_train), (X_test, y_test))`` of columns ``cols`` of top-level chunk ``ref``.

    A chunk absent from the manifest or the store is a :class:`StoreError`, never zeros.
    """
    if ref.prefix:
        raise StoreError("model-parallel training reads the top-level rows, not a partition")
    if info.sparse:
        from fedpipe.data.sparse import read_block_csr  # scipy: only for sparse stores

        X, y = read_block_csr(url, info, ref, cols)
        if test_fraction == 0:
            return (X, y), (X[:0], y[:0])
        return store.split_rows(X, y, ref, test_fraction=test_fraction, seed=seed)
    group = store._opened(url, info.content_hash)
    listed = set(info.manifest.get("X", [])) | set(info.manifest.get("y", []))
    for key in [*x_keys(info, ref.index, cols), store.chunk_key("", "y", ref.index)]:
        if key not in listed or not sync(group.store.exists(key)):
            raise StoreError(f"chunk {key} is missing in {info.url}")
    lo = ref.index * info.chunk_rows
    hi = min(lo + info.chunk_rows, info.n_rows)
    try:
        X = group["X"][lo:hi, cols[0]:cols[1]]
        y = group["y"][lo:hi]
    except Exception as exc:  # numcodecs raises plain errors on bad bytes
        raise StoreError(f"chunk {ref.index} of X in {info.url} is corrupt ({exc})") from exc
    X = store.apply_preprocess(X, _columns_info(info, cols))
    if test_fraction == 0:
        return (X, y), (X[:0], y[:0])
    return store.split_rows(X, y, ref, test_fraction=test_fraction, seed=seed)


def _columns_info(info: StoreInfo, cols: tuple[int, int]) -> StoreInfo:
    """``info`` with its per-column statistics cut to ``cols`` (for the preprocessing)."""
    if not info.stats:
        return info
    stats = {k: (v[cols[0]:cols[1]] if isinstance(v, list) and len(v) == info.n_features else v)
             for k, v in info.stats.items()}
    return dataclasses.replace(info, stats=stats)
