"""Split a store's rows among federated clients and rewrite each client's rows on its own.

The assignment (one client index per row) comes from :mod:`fedpipe.tasks.partition`. Rows are then
copied chunk by chunk into ``partitions/NAME/<client>/X`` and ``.../y``, whole chunks per
client, so a client's worker later reads its own data without touching anyone else's. The
partition's entry in the attributes is written last; on failure its arrays are deleted.
"""

from __future__ import annotations

import logging

import numpy as np
import zarr
from fedpipe.data.store import (
    StoreInfo,
    array_path,
    chunk_key,
    chunk_refs,
    open_group,
    read_info,
    read_raw_chunk,
    row_array,
)
from fedpipe.errors import StoreError, ValidationError
from fedpipe.tasks import partition as part_math

log = logging.getLogger("fedpipe")

SCHEMES = ("iid", "dirichlet", "quantity", "column")
DEFAULT_ALPHA = {"dirichlet": 0.5, "quantity": 1.0}


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
) -> dict:
    """Partition the rows of ``store`` among ``clients`` and write each client's rows.

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
        Partition name; an existing partition of that name is replaced.

    Returns
    -------
    dict
        The partition's metadata, as stored in ``attrs["fedpipe"]["partitions"][name]``.
    """
    info = read_info(store)
    alpha = _check_args(info, clients, scheme, alpha, column, min_size, name)
    labels, n_labels, edges = _labels(store, info)
    try:
        assignment = _assign(store, info, labels, clients, scheme, alpha, column, min_size, seed)
    except ValueError as exc:
        raise ValidationError(f"partition {name!r}: {exc}") from None
    hist = part_math.label_histograms(labels, assignment, clients, n_labels)
    meta = {"scheme": scheme, "seed": seed, "alpha": alpha, "column": column, "min_size": min_size,
            "label_bins": edges, "clients": {}}
    group = open_group(store, mode="r+")
    _forget(group, name)
    try:
        manifest = _write_clients(store, group, info, assignment, clients, name)
    except BaseException:
        _drop_arrays(group, name)
        raise
    sizes = np.bincount(assignment, minlength=clients)
    for k in range(clients):
        meta["clients"][str(k)] = {"n_rows": int(sizes[k]), "n_chunks": -(-int(sizes[k]) // info.chunk_rows),
                                   "label_hist": hist[k].tolist()}
    attrs = dict(group.attrs["fedpipe"])
    attrs["partitions"] = {**attrs["partitions"], name: meta}
    attrs["manifest"] = {**attrs["manifest"], **manifest}
    group.attrs["fedpipe"] = attrs
    log.debug("partition %r: %d clients, sizes %s..%s", name, clients, sizes.min(), sizes.max())
    return meta


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


def _labels(store: str, info: StoreInfo) -> tuple[np.ndarray, int, list | None]:
    """All of y (one number per row), discretised for regression; returns labels, count, edges."""
    group = open_group(store)
    y = np.concatenate([read_raw_chunk(group, info, ref)[1] for ref in chunk_refs(info)])
    if info.task != "regression":
        return y.astype(np.int64), len(info.classes), None
    labels, edges = part_math.quantile_bins(y)
    return labels, max(len(edges) - 1, 1), edges.tolist()


def _column(store: str, info: StoreInfo, column: str) -> np.ndarray:
    group = open_group(store)
    j = info.feature_names.index(column)
    return np.concatenate([read_raw_chunk(group, info, ref)[0][:, j] for ref in chunk_refs(info)])


def _assign(store, info, labels, clients, scheme, alpha, column, min_size, seed) -> np.ndarray:
    if scheme == "iid":
        assignment = part_math.iid(info.n_rows, clients, seed)
    elif scheme == "dirichlet":
        return part_math.dirichlet(labels, clients, alpha, seed, min_size)
    elif scheme == "quantity":
        return part_math.quantity(info.n_rows, clients, alpha, seed, min_size)
    else:
        assignment = part_math.by_values(_column(store, info, column), clients)
    sizes = np.bincount(assignment, minlength=clients)
    if sizes.min() < min_size:
        k = int(np.argmin(sizes))
        raise ValueError(f"client {k} gets {sizes[k]} rows, fewer than --min-size {min_size}")
    return assignment


def _forget(group: zarr.Group, name: str) -> None:
    """Drop an older partition of this name: first from the attributes, then its arrays."""
    attrs = dict(group.attrs["fedpipe"])
    if name in attrs["partitions"]:
        log.info("replacing partition %r", name)
        prefix = f"partitions/{name}/"
        attrs["partitions"] = {k: v for k, v in attrs["partitions"].items() if k != name}
        attrs["manifest"] = {k: v for k, v in attrs["manifest"].items() if not k.startswith(prefix)}
        group.attrs["fedpipe"] = attrs
    _drop_arrays(group, name)


def _drop_arrays(group: zarr.Group, name: str) -> None:
    if "partitions" in group and name in group["partitions"]:
        del group["partitions"][name]


def _write_clients(store, group, info: StoreInfo, assignment, clients: int, name: str) -> dict:
    """Copy rows into per-client arrays, one source chunk at a time; returns manifest entries."""
    rows = info.chunk_rows
    sizes = np.bincount(assignment, minlength=clients)
    y_dtype = "int64" if info.task != "regression" else "float64"
    targets = {}
    for k in range(clients):
        prefix = f"partitions/{name}/{k}"
        targets[k] = (row_array(group, array_path(prefix, "X"), n_cols=info.n_features, rows=rows,
                                dtype=info.dtype, length=int(sizes[k])),
                      row_array(group, array_path(prefix, "y"), n_cols=None, rows=rows,
                                dtype=y_dtype, length=int(sizes[k])))
    row_array(group, f"partitions/{name}/assignment", n_cols=None, rows=rows, dtype="int32",
              length=info.n_rows)[:] = assignment.astype(np.int32)
    # Buffers hold at most one chunk per client before it is flushed as a whole chunk.
    buffers = {k: ([], [], 0) for k in range(clients)}
    written = dict.fromkeys(range(clients), 0)
    source = open_group(store)
    for ref in chunk_refs(info):
        X, y = read_raw_chunk(source, info, ref)
        owner = assignment[ref.index * rows : ref.index * rows + len(y)]
        for k in np.unique(owner):
            xs, ys, held = buffers[k]
            mask = owner == k
            xs.append(X[mask])
            ys.append(y[mask])
            buffers[k] = (xs, ys, held + int(mask.sum()))
            written[k] = _flush(targets[k], buffers, k, written[k], rows, final=False)
    for k in range(clients):
        written[k] = _flush(targets[k], buffers, k, written[k], rows, final=True)
        if written[k] != sizes[k]:
            raise StoreError(f"client {k}: wrote {written[k]} rows, expected {sizes[k]}")
    manifest = {}
    for k in range(clients):
        prefix = f"partitions/{name}/{k}"
        n_chunks = -(-int(sizes[k]) // rows)
        for arr in ("X", "y"):
            manifest[array_path(prefix, arr)] = [chunk_key(prefix, arr, i) for i in range(n_chunks)]
    return manifest


def _flush(target, buffers, k: int, start: int, rows: int, *, final: bool) -> int:
    """Write the whole chunks held for client ``k`` (and the short tail when ``final``)."""
    xs, ys, held = buffers[k]
    if held < rows and not (final and held):
        return start
    X, y = np.concatenate(xs), np.concatenate(ys)
    n_out = held if final else held - held % rows
    X_arr, y_arr = target
    X_arr[start : start + n_out] = X[:n_out]
    y_arr[start : start + n_out] = y[:n_out]
    buffers[k] = ([X[n_out:]], [y[n_out:]], held - n_out)
    return start + n_out
