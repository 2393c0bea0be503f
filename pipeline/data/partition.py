"""Split a store's rows among federated clients, as an index over one client-sorted copy.

The assignment (one client index per row) comes from :mod:`fedpipe.tasks.partition`. The rows
are then written once, ordered by client (stable, so each client keeps the store's row order),
into ``partitions/NAME/<generation>/X`` and ``.../y`` in ordinary row chunks, beside the
assignment and the client table. Each client is a row range of that copy, so the cost is one
read-and-write pass of the data and the number of files does not depend on the number of
clients. The partition is committed last by one atomic put of its own
``partitions/NAME/partition.json`` (:mod:`fedpipe.data.index`): no shared metadata is
read-modified-written, so concurrent runs on one store cannot lose each other's partitions,
and a run that fails leaves the previous partition of that name as it was.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

import numpy as np
import zarr
from fedpipe.data import index, lease
from fedpipe.data.store import (
    StoreInfo,
    array_path,
    chunk_digest,
    chunk_key,
    content_hash,
    open_group,
    read_info,
    read_rows,
    row_array,
)
from fedpipe.errors import ValidationError
from fedpipe.tasks import partition as part_math

log = logging.getLogger("fedpipe")

SCHEMES = ("iid", "dirichlet", "quantity", "column")
DEFAULT_ALPHA = {"dirichlet": 0.5, "quantity": 1.0}
LAYOUT = "sorted-rows"
# Rows of the sorted copy gathered in memory at once: one pass over the store's chunks per
# window, so a store up to this size is read exactly once.
WINDOW_BYTES = 512 << 20


def partition(
    store: str,
    *,
    clients: int,
    scheme: str = "iid",
    alpha: float | None = None,
    column: str | None = None,
    min_size: int = 1,
    seed: int = 0,
    name: str = "default",
    assignment: np.ndarray | None = None,
) -> dict:
    """Partition the rows of ``store`` among ``clients`` clients and write the partition index.

    Parameters
    ----------
    store : str
        Store location.
    clients : int
        Number of clients, at most the number of rows.
    scheme : {"iid", "dirichlet", "quantity", "column"}
        IID shuffle; Dirichlet label skew (``alpha``, default 0.5; regression targets use 10
        quantile bins as labels); power-law quantity skew (exponent ``alpha``, default 1.0);
        or a natural split by the values of feature ``column``.
    min_size : int
        Fewest rows a client may get; an assignment below it is an error.
    seed : int
        Seed of the assignment.
    name : str
        Partition name; an existing partition of that name is replaced (atomically: readers
        see the old partition or the new one).
    assignment : array of int, optional
        A split the caller already has: the client index ``0..clients-1`` of every row, in the
        store's row order (e.g. scikit-learn's ``groups``); the partition records the scheme
        ``"given"``, and ``scheme``, ``alpha`` and ``column`` must be left at their defaults.

    Returns
    -------
    dict
        The partition's metadata, as :func:`fedpipe.data.store.read_info` gives it in
        ``info.partitions[name]``: per client ``n_rows``, ``n_chunks``, ``label_hist`` and
        ``offset`` (first row in the sorted copy at ``path``).
    """
    info = read_info(store, partitions=False)  # other partitions' size must not matter
    lease.check_unused(store, f"partition {name!r}", partition=name)  # never pull it from a run
    alpha = _check_args(info, clients, scheme, alpha, column, min_size, name)
    (y,) = read_rows(open_group(store), info, range(info.n_chunks), ("y",))
    labels, n_labels, edges = _labels(y, info)
    try:
        if assignment is None:
            assignment = _assign(store, info, labels, clients, scheme, alpha, column, min_size,
                                 seed)
        else:
            assignment, scheme = _given(assignment, info, clients, scheme, alpha, column), "given"
            _check_sizes(assignment, clients, min_size)
    except ValueError as exc:
        raise ValidationError(f"partition {name!r}: {exc}") from None
    hist = part_math.label_histograms(labels, assignment, clients, n_labels)
    sizes = np.bincount(assignment, minlength=clients)
    table = {"n_rows": sizes.tolist(), "offset": (np.cumsum(sizes) - sizes).tolist(),
             "label_hist": hist.tolist()}
    record = {"scheme": scheme, "seed": seed, "alpha": alpha, "column": column,
              "min_size": min_size, "label_bins": edges, "layout": LAYOUT, "n_rows": info.n_rows,
              "chunk_rows": info.chunk_rows, "path": f"partitions/{name}/g{uuid.uuid4().hex[:12]}"}
    group = open_group(store, mode="r+")
    try:
        record["content_hash"], manifest, record["chunk_digests"] = _write_sorted(
            store, group, info, assignment, y, record["path"])
        previous = index.read_partition(group, name, clients=False)
        index.write_partition(group, name, {**record, "manifest": manifest}, table)
    except BaseException:
        _drop(group, record["path"], name)
        raise
    if previous is not None and previous["path"] != record["path"]:
        log.info("replaced partition %r", name)
        index.delete(group, previous["path"])
    log.debug("partition %r: %d clients, sizes %s..%s", name, clients, sizes.min(), sizes.max())
    return {**record, "clients": index.expand_clients(table, info.chunk_rows)}


def _check_args(info: StoreInfo, clients, scheme, alpha, column, min_size, name) -> float | None:
    if scheme not in SCHEMES:
        raise ValidationError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not isinstance(clients, int | np.integer) or clients < 1:
        raise ValidationError(f"--clients must be a positive integer, got {clients}")
    if clients > info.n_rows:
        raise ValidationError(f"--clients {clients} is larger than the {info.n_rows} rows of the store")
    if min_size < 0:
        raise ValidationError(f"--min-size must be >= 0, got {min_size}")
    if clients * min_size > info.n_rows:
        raise ValidationError(f"--clients {clients} x --min-size {min_size} is more than the {info.n_rows} rows")
    if not name or "/" in name or name.startswith("."):
        raise ValidationError(f"--name {name!r} is not a valid partition name")
    if scheme == "column":
        if column is None:
            raise ValidationError("--scheme column needs --column NAME")
        if column not in info.feature_names:
            raise ValidationError(f"--column {column!r} is not a feature of the store")
    elif column is not None:
        raise ValidationError(f"--column applies to --scheme column, not {scheme}")
    if scheme in DEFAULT_ALPHA:
        alpha = DEFAULT_ALPHA[scheme] if alpha is None else float(alpha)
        if not alpha > 0:
            raise ValidationError(f"--alpha must be > 0, got {alpha}")
        return alpha
    if alpha is not None:
        raise ValidationError(f"--alpha applies to --scheme dirichlet or quantity, not {scheme}")
    return None


def _labels(y: np.ndarray, info: StoreInfo) -> tuple[np.ndarray, int, list | None]:
    """All of y as labels (discretised for regression); returns labels, count, edges."""
    if info.task != "regression":
        return y.astype(np.int64), len(info.classes), None
    labels, edges = part_math.quantile_bins(y)
    return labels, max(len(edges) - 1, 1), edges.tolist()


def _column(store: str, info: StoreInfo, column: str) -> np.ndarray:
    group = open_group(store)
    j = info.feature_names.index(column)
    step = _window_rows(info) // info.chunk_rows
    return np.concatenate([read_rows(group, info, range(c, min(c + step, info.n_chunks)), ("X",))[0][:, j]
                           for c in range(0, info.n_chunks, step)])


def _window_rows(info: StoreInfo) -> int:
    """Rows held in memory at once (whole chunks, at least one): :data:`WINDOW_BYTES` of X."""
    row_bytes = np.dtype(info.dtype).itemsize * info.n_features + 8
    return max(1, WINDOW_BYTES // (row_bytes * info.chunk_rows)) * info.chunk_rows


def _assign(store, info, labels, clients, scheme, alpha, column, min_size, seed) -> np.ndarray:
    if scheme == "iid":
        assignment = part_math.iid(info.n_rows, clients, seed)
    elif scheme == "dirichlet":
        return part_math.dirichlet(labels, clients, alpha, seed, min_size)
    elif scheme == "quantity":
        return part_math.quantity(info.n_rows, clients, alpha, seed, min_size)
    else:
        assignment = part_math.by_values(_column(store, info, column), clients)
    _check_sizes(assignment, clients, min_size)
    return assignment


def _check_sizes(assignment: np.ndarray, clients: int, min_size: int) -> None:
    sizes = np.bincount(assignment, minlength=clients)
    if sizes.min() < min_size:
        k = int(np.argmin(sizes))
        raise ValueError(f"client {k} gets {sizes[k]} rows, fewer than --min-size {min_size}")


def _given(assignment, info: StoreInfo, clients: int, scheme, alpha, column) -> np.ndarray:
    """The caller's assignment, checked: one client index in ``0..clients-1`` per row."""
    if (scheme, alpha, column) != ("iid", None, None):
        raise ValueError("a given assignment takes no scheme, alpha or column")
    given = np.asarray(assignment)
    if given.shape != (info.n_rows,) or not np.issubdtype(given.dtype, np.integer):
        raise ValueError(f"the assignment must be {info.n_rows} integers (one per row), got "
                         f"shape {given.shape} of {given.dtype}")
    if given.size and (given.min() < 0 or given.max() >= clients):
        raise ValueError(f"the assignment names clients outside 0..{clients - 1}")
    return given.astype(np.int64)


def _drop(group: zarr.Group, path: str, name: str) -> None:
    """Delete a generation that was not committed, and the partition's folder if it has no file."""
    index.delete(group, path)
    if index.read_partition(group, name, clients=False) is None:
        index.delete(group, f"partitions/{name}")


def _write_sorted(store: str, group: zarr.Group, info: StoreInfo, assignment: np.ndarray,
                  y_all: np.ndarray, path: str) -> tuple[str, dict[str, list[str]], dict]:
    """Write the rows ordered by client and the assignment; returns (content hash, manifest,
    each chunk's :func:`~fedpipe.data.store.chunk_digest`).

    The copy is written in windows of whole chunks; each window reads only the store chunks
    that hold its rows, once (a store below :data:`WINDOW_BYTES` is one window). ``y_all``,
    already read for the labels, is not read again.
    """
    rows, n = info.chunk_rows, info.n_rows
    order = np.argsort(assignment, kind="stable")  # stable: a client's rows keep store order
    y_dtype = "int64" if info.task != "regression" else "float64"
    X_out = row_array(group, array_path(path, "X"), n_cols=info.n_features, rows=rows,
                      dtype=info.dtype, length=n)
    y_out = row_array(group, array_path(path, "y"), n_cols=None, rows=rows, dtype=y_dtype, length=n)
    row_array(group, array_path(path, "assignment"), n_cols=None, rows=rows, dtype="int32",
              length=n)[:] = assignment.astype(np.int32)
    window = _window_rows(info)
    source = open_group(store)
    hx, hy, digests = hashlib.sha256(), hashlib.sha256(), []
    for lo in range(0, n, window):
        X = _gather(source, info, order[lo : lo + window])
        y = y_all[order[lo : lo + window]].astype(y_dtype)
        X_out[lo : lo + len(y)] = X
        y_out[lo : lo + len(y)] = y
        hx.update(X)
        hy.update(y)
        digests += [chunk_digest(X[i : i + rows], y[i : i + rows]) for i in range(0, len(y), rows)]
    n_chunks = -(-n // rows)
    manifest = {array_path(path, a): [chunk_key(path, a, i) for i in range(n_chunks)]
                for a in ("X", "y", "assignment")}
    return content_hash(hx.digest(), hy.digest()), manifest, {array_path(path, "X"): digests}


def _gather(source: zarr.Group, info: StoreInfo, rows_wanted: np.ndarray) -> np.ndarray:
    """The store's X rows ``rows_wanted`` (in that order), reading each chunk holding them once.

    The chunks are read in runs of consecutive ones, each run at most a window of rows.
    """
    rows = info.chunk_rows
    src_chunk = rows_wanted // rows
    by_chunk = np.argsort(src_chunk, kind="stable")
    chunks, starts = np.unique(src_chunk[by_chunk], return_index=True)
    step = _window_rows(info) // rows
    breaks = np.flatnonzero((np.diff(chunks) != 1) | (np.arange(1, len(chunks)) % step == 0)) + 1
    runs = np.split(np.arange(len(chunks)), breaks)
    if len(runs) == 1:  # one read holds every row wanted: a single gather
        first, last = int(chunks[0]), int(chunks[-1])
        (Xr,) = read_rows(source, info, range(first, last + 1), ("X",))
        return Xr[rows_wanted - first * rows]
    X = np.empty((len(rows_wanted), info.n_features), dtype=info.dtype)
    for run in runs:
        first, last = int(chunks[run[0]]), int(chunks[run[-1]])
        (Xr,) = read_rows(source, info, range(first, last + 1), ("X",))
        stop = starts[run[-1] + 1] if run[-1] + 1 < len(starts) else len(by_chunk)
        dest = by_chunk[starts[run[0]] : stop]
        X[dest] = Xr[rows_wanted[dest] - first * rows]
    return X
