"""Sparse stores: CSR chunks of rows x feature blocks, for wide hashed or one-hot inputs.

``fp.ingest_sparse(X, y, store, feature_chunks=F)`` writes a ``scipy.sparse`` matrix (e.g.
scikit-learn's ``HashingVectorizer`` output, 2**20 columns) as one CSR piece per row chunk
``i`` and feature block ``j``: three one-chunk zarr arrays ``sparse/<i>/<j>/{data,indices,
indptr}`` (column indices local to the block), with fedpipe's checksummed codecs. A
model-parallel shard reads only its blocks' pieces (:func:`read_block_csr`), so memory follows
the non-zeros, never rows x features. The store has no dense ``X``: it trains with
``--model-parallel`` only (data-parallel ``fit`` refuses it in one line).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import scipy.sparse as sp
import zarr
from fedpipe.data.store import (
    FORMAT_VERSION,
    ChunkRef,
    StoreError,
    StoreInfo,
    codecs,
    open_group,
    read_info,
    row_array,
    staged,
)
from fedpipe.errors import ValidationError
from zarr.core.sync import sync

PARTS = ("data", "indices", "indptr")


def ingest_sparse(X: Any, y: np.ndarray, store: str, *, chunk_rows: int = 10_000,
                  feature_chunks: int = 1, task: str | None = None,
                  overwrite: bool = False) -> StoreInfo:
    """Write a sparse matrix ``X`` (rows x features) and labels ``y`` as a sparse fedpipe store.

    Parameters
    ----------
    X : scipy.sparse matrix
        Any sparse format; stored as CSR float64.
    y : array of shape (rows,)
        Integer class labels (``binary``/``multiclass``) or float targets (``regression``).
    store : str
        Path of the zarr store to create.
    chunk_rows, feature_chunks : int
        Rows per row chunk; feature blocks the columns are cut into (the model-parallel shards
        read whole blocks).
    task : {"regression", "binary", "multiclass"}, optional
        Default: ``binary`` for two integer labels, ``multiclass`` for more, else regression.
    overwrite : bool
        Replace an existing store.

    Returns
    -------
    StoreInfo
        With ``sparse = {"nnz": ..., "feature_chunk": ...}``.
    """
    if not sp.issparse(X):
        raise ValidationError(f"ingest_sparse takes a scipy.sparse matrix, got {type(X).__name__}")
    X = sp.csr_matrix(X, dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    n, d = X.shape
    if len(y) != n or n == 0:
        raise ValidationError(f"X has {n} rows and y {len(y)} labels")
    if not np.all(np.isfinite(X.data)):
        raise ValidationError("X holds NaN or inf values")
    if not 1 <= feature_chunks <= d or chunk_rows < 1:
        raise ValidationError(f"--feature-chunks must be in 1..{d}, --chunk-rows positive")
    task, classes, y = _labels(y, task)
    width, n_chunks = -(-d // feature_chunks), -(-n // chunk_rows)
    with staged(store, overwrite=overwrite) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        y_arr = row_array(group, "y", n_cols=None, rows=chunk_rows, dtype=str(y.dtype), length=n)
        y_arr[:] = y
        digest, keys = hashlib.sha256(), []
        for i in range(n_chunks):
            rows = X[i * chunk_rows:(i + 1) * chunk_rows]
            for j in range(-(-d // width)):
                piece = rows[:, j * width:(j + 1) * width].tocsr()
                for name in PARTS:
                    values = getattr(piece, name).astype(np.int64 if name != "data" else np.float64)
                    path = f"sparse/{i}/{j}/{name}"
                    arr = group.create_array(path, shape=(len(values),),
                                             chunks=(max(len(values), 1),), dtype=values.dtype,
                                             compressors=codecs(),
                                             config={"write_empty_chunks": True})
                    arr[:] = values
                    digest.update(np.ascontiguousarray(values))
                    keys.append(f"{path}/c/0")
        digest.update(np.ascontiguousarray(y))
        group.attrs["fedpipe"] = {
            "n_rows": n, "n_features": d, "chunk_rows": chunk_rows, "n_chunks": n_chunks,
            "task": task, "classes": classes, "feature_names": [], "dtype": "float64",
            "preprocess": {"impute": "none", "standardize": False}, "partitions": {},
            "stats": None, "content_hash": digest.hexdigest(), "format": FORMAT_VERSION,
            "manifest": {"y": [f"y/c/{i}" for i in range(n_chunks)], "sparse": keys},
            "feature_chunk": width, "sparse": {"nnz": int(X.nnz), "feature_chunk": width},
            "source": "sparse arrays"}
    return read_info(store)


def _labels(y: np.ndarray, task: str | None) -> tuple[str, list | None, np.ndarray]:
    values = np.unique(y)
    integer = np.issubdtype(values.dtype, np.integer) or bool(np.all(values == np.round(values)))
    task = task or ("binary" if integer and len(values) <= 2 else
                    "multiclass" if integer and len(values) <= 50 else "regression")
    if task == "regression":
        return task, None, y.astype(np.float64)
    if not integer:
        raise ValidationError(f"task {task} needs integer labels")
    return task, [int(v) for v in values], np.searchsorted(values, y).astype(np.int64)


def read_block_csr(url: str, info: StoreInfo, ref: ChunkRef,
                   cols: tuple[int, int]) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(X, y)`` of row chunk ``ref``, columns ``cols`` (on feature-block edges), as CSR."""
    width = info.sparse["feature_chunk"]
    if cols[0] % width or (cols[1] % width and cols[1] != info.n_features):
        raise StoreError(f"columns {cols} do not fall on {info.url}'s feature blocks of {width}")
    group = open_group(url)
    listed = set(info.manifest.get("sparse", []))
    pieces = []
    for j in range(cols[0] // width, -(-cols[1] // width)):
        arrays = []
        for name in PARTS:
            key = f"sparse/{ref.index}/{j}/{name}/c/0"
            if key not in listed or not sync(group.store.exists(key)):
                raise StoreError(f"sparse chunk {key} is missing in {info.url}")
            try:
                arrays.append(group[f"sparse/{ref.index}/{j}/{name}"][:])
            except Exception as exc:
                raise StoreError(f"sparse chunk {key} in {info.url} is corrupt ({exc})") from exc
        data, indices, indptr = arrays
        lo = j * width
        pieces.append(sp.csr_matrix((data, indices, indptr),
                                    shape=(len(indptr) - 1, min(width, info.n_features - lo))))
    y = group["y"][ref.index * info.chunk_rows:(ref.index + 1) * info.chunk_rows]
    return sp.hstack(pieces, format="csr"), y
