"""Helpers for the federated tests: partitioned stores (no tests in this module).

``partitioned_store`` uses :func:`fedpipe.data.partition.partition` when it exists and otherwise
writes an IID partition with the store's own layout helpers, so the federated tests do not
depend on the order in which the modules land.
"""

from __future__ import annotations

import numpy as np
import zarr
from fedpipe.data import store
from fedpipe.data.ingest import ingest


def partitioned_store(path: str, *, source: str, clients: int, chunk_rows: int = 100,
                      scheme: str = "iid", alpha: float | None = None, seed: int = 0,
                      name: str = "fed", **ingest_options) -> str:
    """Ingest ``source`` at ``path`` and partition it among ``clients`` clients as ``name``."""
    ingest(source, path, chunk_rows=chunk_rows, progress=False, **ingest_options)
    try:
        from fedpipe.data.partition import partition
    except ImportError:
        if scheme != "iid":
            raise
        write_iid_partition(path, clients=clients, name=name, seed=seed)
    else:
        options = {"alpha": alpha} if alpha is not None else {}
        partition(path, clients=clients, scheme=scheme, seed=seed, name=name, **options)
    return path


def write_iid_partition(url: str, *, clients: int, name: str, seed: int = 0) -> None:
    """Stand-in for ``fedpipe.data.partition``: shuffled rows split into near-equal client shares."""
    info = store.read_info(url)
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    X, y = group["X"][:], group["y"][:]
    order = np.random.default_rng(seed).permutation(len(y))
    meta = dict(group.attrs["fedpipe"])
    manifest = {k: list(v) for k, v in meta["manifest"].items()}
    records = {}
    for cid, rows in enumerate(np.array_split(order, clients)):
        rows = np.sort(rows)
        prefix = f"partitions/{name}/{cid}"
        chunk = max(1, min(info.chunk_rows, len(rows)))
        for arr_name, data in (("X", X[rows]), ("y", y[rows])):
            arr = store.row_array(group, store.array_path(prefix, arr_name),
                                  n_cols=X.shape[1] if arr_name == "X" else None, rows=chunk,
                                  dtype=str(data.dtype), length=len(rows))
            arr[:] = data
            n_chunks = -(-len(rows) // chunk)
            manifest[store.array_path(prefix, arr_name)] = [
                store.chunk_key(prefix, arr_name, i) for i in range(n_chunks)]
        hist = np.bincount(y[rows].astype(int), minlength=len(info.classes or [])).tolist()
        records[str(cid)] = {"n_rows": int(len(rows)), "n_chunks": int(n_chunks),
                             "label_hist": hist}
    partitions = dict(meta.get("partitions") or {})
    partitions[name] = {"scheme": "iid", "seed": seed, "alpha": None, "clients": records}
    group.attrs["fedpipe"] = {**meta, "manifest": manifest, "partitions": partitions}
