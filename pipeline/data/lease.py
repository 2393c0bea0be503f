"""Store leases: a run reading a store says so, and the commands that rewrite it wait their turn.

A run writes ``<store>/.fedpipe-leases/<id>.json`` (its process id, host, the partition it reads)
when it starts and removes it when it ends. ``fedpipe ingest --overwrite`` refuses a store with
any lease; ``fedpipe partition NAME`` refuses only while a run reads partition ``NAME`` (writing
another partition changes nothing a run reads). A lease whose process is gone from this host is
stale and ignored, so a killed run never locks its store for good; a lease from another host is
honoured until removed by hand (the refusal names the file).

The folder holds no ``zarr.json``: zarr and fedpipe's readers never look into it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import psutil
from fedpipe.errors import ValidationError

LEASES = ".fedpipe-leases"


def _folder(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, f"{path.rstrip('/')}/{LEASES}"


@contextmanager
def held(url: str, *, partition: str | None = None, run: str | None = None) -> Iterator[str]:
    """Hold a read lease on the store at ``url`` for the duration of the block; yields its path."""
    fs, folder = _folder(url)
    path = f"{folder}/{uuid.uuid4().hex[:16]}.json"
    record = {"pid": os.getpid(), "host": socket.gethostname(), "partition": partition,
              "run": None if run is None else str(run), "since": time.time()}
    fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(path, json.dumps(record).encode())
    try:
        yield path
    finally:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def holders(url: str) -> list[tuple[str, dict[str, Any]]]:
    """Live leases on the store at ``url`` as ``(path, record)``; stale ones are removed."""
    fs, folder = _folder(url)
    try:
        paths = [p for p in fs.ls(folder, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    live = []
    for path in sorted(paths):
        try:
            record = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # being written or just removed
        if record.get("host") == socket.gethostname() and not psutil.pid_exists(record["pid"]):
            fs.rm_file(path)  # its run was killed: nobody reads the store through it
            continue
        live.append((path, record))
    return live


def check_unused(url: str, action: str, *, partition: str | None = None) -> None:
    """Refuse ``action`` in one line while a run reads the store (or, given ``partition``,
    while a run reads that partition)."""
    for path, record in holders(url):
        if partition is not None and record.get("partition") != partition:
            continue
        what = f"partition {partition!r} of store" if partition is not None else "store"
        run = f" (run {record['run']})" if record.get("run") else ""
        raise ValidationError(
            f"{action}: {what} {url} is in use by process {record['pid']} on {record['host']}"
            f"{run}; wait for it to finish (or delete {path} if that process is gone)")
