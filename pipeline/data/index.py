"""A partition's index files: the commit record ``partitions/NAME/partition.json`` and its client table.

A partition's rows live in a generation folder ``partitions/NAME/g<hex>/`` that is written once
and never changed: the client-sorted ``X`` and ``y``, the ``assignment``, and ``clients.json``,
the client table as columns (``n_rows``, ``offset``, ``label_hist``). ``partition.json`` is
small (scheme, seed, the generation's path, content hash, manifest, the table's SHA-256) and is
written last, in one put: zarr's local store writes it to a temporary file and renames it, an
object store's PUT replaces it whole. A partition exists exactly when its ``partition.json``
does, so concurrent writers of different partitions never touch a shared file, and a reader
sees an old partition or a new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import zarr
from fedpipe.errors import StoreError
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

PARTITION_FILE = "partition.json"
CLIENTS_FILE = "clients.json"


def partition_key(name: str) -> str:
    """Store key of partition ``name``'s commit record."""
    return f"partitions/{name}/{PARTITION_FILE}"


def read_partitions(group: zarr.Group) -> dict[str, dict[str, Any]]:
    """The committed partitions of a store by name, each with its client table.

    A partition folder without ``partition.json`` is being written (or was abandoned): skipped.
    """
    parts = {}
    for name in sorted(sync(_list_dir(group.store, "partitions"))):
        part = read_partition(group, name)
        if part is not None:
            parts[name] = part
    return parts


def read_partition(group: zarr.Group, name: str, *, clients: bool = True) -> dict[str, Any] | None:
    """Partition ``name``'s record (with ``"clients"`` unless ``clients=False``); None if absent.

    The client table is checked against the SHA-256 in the record: a damaged table is a
    :class:`StoreError`, never wrong row ranges.
    """
    raw = _get(group, partition_key(name))
    if raw is None:
        return None
    part = json.loads(raw)
    if not clients:
        return part
    key = f"{part['path']}/{CLIENTS_FILE}"
    table = _get(group, key)
    if table is None or hashlib.sha256(table).hexdigest() != part["clients_sha256"]:
        state = "missing" if table is None else "corrupt"
        raise StoreError(f"client table {key} of partition {name!r} is {state} in {group.store}")
    part["clients"] = expand_clients(json.loads(table), part["chunk_rows"])
    return part


def write_partition(group: zarr.Group, name: str, record: dict[str, Any],
                    clients: dict[str, list]) -> None:
    """Write the client table into the generation folder, then commit the record in one put."""
    table = json.dumps(clients, separators=(",", ":")).encode()
    _put(group, f"{record['path']}/{CLIENTS_FILE}", table)
    record = {**record, "clients_sha256": hashlib.sha256(table).hexdigest()}
    _put(group, partition_key(name), json.dumps(record, separators=(",", ":")).encode())


def expand_clients(table: dict[str, list], chunk_rows: int) -> dict[str, dict[str, Any]]:
    """The per-client form callers read (``clients["3"]["n_rows"]``) from the stored columns."""
    return {str(k): {"n_rows": n, "n_chunks": -(-n // chunk_rows), "label_hist": hist, "offset": off}
            for k, (n, off, hist) in enumerate(zip(table["n_rows"], table["offset"],
                                                   table["label_hist"], strict=True))}


def delete(group: zarr.Group, prefix: str) -> None:
    """Delete every key under ``prefix`` (a generation folder or a whole partition)."""
    sync(group.store.delete_dir(prefix))


def _get(group: zarr.Group, key: str) -> bytes | None:
    buf = sync(group.store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _put(group: zarr.Group, key: str, data: bytes) -> None:
    sync(group.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


async def _list_dir(zstore, prefix: str) -> list[str]:
    return [name async for name in zstore.list_dir(prefix)]
