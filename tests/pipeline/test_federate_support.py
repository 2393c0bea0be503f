"""Helpers for the federated tests: partitioned stores (no tests in this module)."""

from __future__ import annotations

from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition


def partitioned_store(path: str, *, source: str, clients: int, chunk_rows: int = 100,
                      scheme: str = "iid", alpha: float | None = None, seed: int = 0,
                      name: str = "fed", **ingest_options) -> str:
    """Ingest ``source`` at ``path`` and partition it among ``clients`` clients as ``name``."""
    ingest(source, path, chunk_rows=chunk_rows, progress=False, **ingest_options)
    options = {"alpha": alpha} if alpha is not None else {}
    partition(path, clients=clients, scheme=scheme, seed=seed, name=name, **options)
    return path
