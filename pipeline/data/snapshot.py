"""Dataset snapshots: the digest of the data a run trains on, recorded and checked.

The digest is a SHA-256 over what a run reads of a store's metadata: the root ``fedpipe``
attributes (shape, chunking, manifest, content hash, statistics, preprocessing) and, for a
federated run, its partition's commit record (generation path, content hash, manifest, client
table digest). It costs two small reads, whatever the store's size, and changes whenever
``ingest --overwrite`` or ``partition`` rewrites what the run reads.

A run pins the digest (:func:`pin`): it is checked against the run's own record on
``--resume`` before anything is written, written to ``config.toml`` (which every checkpoint
carries) and ``summary.json``, checked again when the run starts and when it ends, and the
store is leased (:mod:`fedpipe.data.lease`) in between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

from fedpipe import rundir
from fedpipe.data import index, lease
from fedpipe.data.store import open_group
from fedpipe.errors import ValidationError

log = logging.getLogger("fedpipe")

KEY = "data_snapshot"  # in config.toml and summary.json


def digest(url: str, partition: str | None = None) -> str:
    """SHA-256 of the store metadata (and ``partition``'s record) a run reads."""
    group = open_group(url)
    parts: dict[str, Any] = {"store": group.attrs["fedpipe"]}
    if partition is not None:
        parts["partition"] = index.read_partition(group, partition, clients=False)
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded(run_dir: str | Path) -> str | None:
    """The digest a run directory recorded in its ``config.toml``, or ``None``."""
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")).get(KEY)
    except tomllib.TOMLDecodeError:
        return None  # the option check of --resume names a damaged config


class Snapshot:
    """A run's pinned data: ``with snapshot:`` holds the store's lease and records the digest
    in the run's ``config.toml``; leaving the block checks the store did not change."""

    def __init__(self, url: str, partition: str | None, run_dir: Path | None, value: str):
        self.url, self.partition, self.run_dir, self.digest = url, partition, run_dir, value
        self._lease: Any = None

    def check(self, when: str) -> None:
        """Raise a one-line :class:`ValidationError` when the store no longer has the digest."""
        now = digest(self.url, self.partition)
        if now != self.digest:
            what = "store" if self.partition is None else f"partition {self.partition!r} of store"
            raise ValidationError(
                f"{what} {self.url} changed {when} (data snapshot {self.digest[:12]} is now "
                f"{now[:12]}: re-ingested or re-partitioned); results of this run are not "
                "written, rerun it on the store as it is now")

    def __enter__(self) -> Snapshot:
        self._lease = lease.held(self.url, partition=self.partition,
                                 run=None if self.run_dir is None else rundir.target(self.run_dir))
        self._lease.__enter__()
        try:
            self.check("before the run started")
            if self.run_dir is not None:
                _record(self.run_dir, self.digest)
        except BaseException:
            self._lease.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.check("during the run")
        finally:
            self._lease.__exit__(kind, value, traceback)


def pin(url: str, run_dir: str | Path | None, *, partition: str | None = None,
        resume: bool = False) -> Snapshot:
    """The store's snapshot for a run; on ``resume``, refuse a store other than the run's.

    Call it before the run writes anything, so a refused resume leaves its directory as it was.
    """
    value = digest(url, partition)
    before = recorded(run_dir) if resume and run_dir is not None else None
    if before is not None and before != value:
        raise ValidationError(
            f"--resume: store {url} is not the data run {run_dir} trained on (data snapshot "
            f"{value[:12]}, the run's {before[:12]}); resume on that data, or start a new --out")
    return Snapshot(str(url), partition, None if run_dir is None else Path(run_dir), value)


def _record(run_dir: Path, value: str) -> None:
    """Add the digest to ``config.toml`` (``--config`` ignores it: it records, not configures)."""
    path = run_dir / rundir.CONFIG
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if config.get(KEY) != value:
        rundir.write_config(run_dir, {**config, KEY: value})
