"""``fedpipe ingest``, ``fedpipe info`` and ``fedpipe partition``: the data commands."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fedpipe.cli.argtypes import nonneg_int, positive_float, positive_int
from fedpipe.data import ingest as ingest_mod
from fedpipe.data import partition as partition_mod
from fedpipe.data.store import StoreInfo, read_info, verify_store
from fedpipe.errors import StoreError
from rich.console import Console
from rich.table import Table


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``ingest``, ``info`` and ``partition`` to the ``fedpipe`` parser."""
    p = subparsers.add_parser("ingest", parents=parents, help="validate a source and write a zarr store")
    p.add_argument("source", help="FILE.npz|.npy|.csv|.parquet, sklearn:NAME or synthetic:KIND?k=v&...")
    p.add_argument("store", help="store path or fsspec URL (e.g. memory://name)")
    p.add_argument("--target", help="label column of a CSV/Parquet source (default: target, y or label)")
    p.add_argument("--labels", metavar="Y.npy", help="labels of a .npy source (which holds X only)")
    p.add_argument("--chunk-rows", type=positive_int, help="rows per chunk (default: about 8 MiB per chunk)")
    p.add_argument("--feature-chunks", type=positive_int,
                   help="also cut X into this many column blocks (for --model-parallel)")
    p.add_argument("--dtype", choices=ingest_mod.DTYPES, default="float64", help="storage type of X")
    p.add_argument("--impute", choices=ingest_mod.IMPUTE, default="none",
                   help="fill NaN/inf when reading (default none: NaN/inf is an error)")
    p.add_argument("--standardize", action="store_true", help="standardise features when reading")
    p.add_argument("--task", choices=ingest_mod.TASKS, help="override the inferred task")
    p.add_argument("--categorical", help="comma-separated feature columns to one-hot encode "
                                         "(columns holding text always are)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=run_ingest)

    p = subparsers.add_parser("info", parents=parents, help="schema, counts, chunking and partitions")
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument("--verify", action="store_true",
                   help="read every chunk; report missing or corrupt ones (exit 2 if any)")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("partition", parents=parents, help="split rows among federated clients")
    p.add_argument("store", help="store path or fsspec URL")
    p.add_argument("--clients", type=positive_int, required=True, help="number of clients")
    p.add_argument("--scheme", choices=partition_mod.SCHEMES, default="iid", help="default iid")
    p.add_argument("--alpha", type=positive_float,
                   help="Dirichlet concentration (default 0.5) or quantity power-law exponent (1.0)")
    p.add_argument("--column", help="feature column whose values define clients (--scheme column)")
    p.add_argument("--min-size", type=nonneg_int, default=1, help="fewest rows per client (default 1)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the assignment (default 0)")
    p.add_argument("--name", default="default", help="partition name (default: default)")
    p.set_defaults(func=run_partition)


def _console(args: argparse.Namespace) -> Console | None:
    return None if args.json or args.quiet else Console()


def _info_summary(info: StoreInfo) -> dict[str, Any]:
    summary = dataclasses.asdict(info)
    summary.pop("manifest")
    summary.pop("chunk_digests")  # one per chunk, like the manifest: not a summary
    summary.pop("compute_dtype")  # a training setting, not the store's
    return summary


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """Ingest SOURCE into STORE; prints a one-line summary unless ``--quiet``/``--json``."""
    info = ingest_mod.ingest(
        args.source, args.store, target=args.target, chunk_rows=args.chunk_rows, dtype=args.dtype,
        impute=args.impute, standardize=args.standardize, overwrite=args.overwrite,
        progress=not (args.quiet or args.json), task=args.task, labels=args.labels,
        categorical=[c.strip() for c in (args.categorical or "").split(",") if c.strip()],
        feature_chunks=args.feature_chunks)
    if console := _console(args):
        console.print(f"{args.store}: {info.n_rows} rows x {info.n_features} features, "
                      f"{info.task}, {info.n_chunks} chunks of {info.chunk_rows} rows"
                      + _columns_note(info))
    summary = _info_summary(info)
    summary.pop("stats")
    return summary


def run_info(args: argparse.Namespace) -> dict[str, Any]:
    """Describe STORE; with ``--verify`` read every chunk and fail on a bad one."""
    info = read_info(args.store)
    summary = _info_summary(info)
    report = verify_store(args.store) if args.verify else None
    if report is not None:
        summary["verify"] = {
            "checked": report.n_checked,
            "missing": [list(r) for r in report.missing],
            "corrupt": [list(r) for r in report.corrupt],
            "content_hash_ok": report.content_hash_ok,
            "partition_hash_ok": report.partition_hash_ok,
            "unchecked": report.unchecked,
        }
    if console := _console(args):
        _print_info(console, info, summary.get("verify"))
    if report is not None and not report.ok:
        raise StoreError(_verify_line(args.store, report))
    return summary


def _columns_note(info: StoreInfo) -> str:
    if not info.feature_chunk:
        return ""
    return (f" x {-(-info.n_features // info.feature_chunk)} feature chunks of "
            f"{info.feature_chunk} columns")


def _verify_line(store: str, report) -> str:
    parts = []
    for kind, refs in (("missing", report.missing), ("corrupt", report.corrupt)):
        if refs:
            parts.append(f"{kind} chunks " + ", ".join(f"{r.prefix or 'X/y'}#{r.index}" for r in refs))
    if report.content_hash_ok is False:
        parts.append("content hash differs")
    parts += [f"partition {name!r} content hash differs"
              for name, ok in report.partition_hash_ok.items() if ok is False]
    if report.unchecked:
        parts.append(f"no crc32c checksum on {', '.join(report.unchecked)} (a flipped bit "
                     "decodes silently: re-ingest with this fedpipe)")
    return f"{store}: " + "; ".join(parts)


def _print_info(console: Console, info: StoreInfo, verify: dict | None) -> None:
    console.print(f"[bold]{info.url}[/]  {info.task}  {info.n_rows} rows x {info.n_features} "
                  f"features ({info.dtype}), {info.n_chunks} chunks of {info.chunk_rows} rows"
                  + _columns_note(info))
    if info.classes is not None:
        console.print(f"classes: {info.classes}")
    console.print(f"preprocess: {info.preprocess}   content hash: {info.content_hash[:16]}…")
    schema = Table("column", "count", "mean", "min", "max", title="features")
    stats = info.stats or {}
    for j, name in enumerate(info.feature_names[:50]):
        count = stats["count"][j] if stats else None
        mean = stats["sum"][j] / count if stats and count else None
        schema.add_row(name, str(count), _fmt(mean), _fmt(stats.get("min", [None] * (j + 1))[j]),
                       _fmt(stats.get("max", [None] * (j + 1))[j]))
    console.print(schema)
    if len(info.feature_names) > 50:
        console.print(f"… and {len(info.feature_names) - 50} more columns")
    _print_partitions(console, info)
    if verify is not None:
        bad = len(verify["missing"]) + len(verify["corrupt"])
        console.print(f"verify: {verify['checked']} chunks read, {bad} bad, "
                      f"content hash ok: {verify['content_hash_ok']}")


def _print_partitions(console: Console, info: StoreInfo, only: str | None = None) -> None:
    for name, part in info.partitions.items():
        if only is not None and name != only:
            continue
        table = Table("client", "rows", "chunks", "label histogram",
                      title=f"partition {name!r}: {part['scheme']}, seed {part['seed']}"
                      + (f", alpha {part['alpha']}" if part.get("alpha") is not None else ""))
        for cid, entry in part["clients"].items():
            table.add_row(cid, str(entry["n_rows"]), str(entry["n_chunks"]), str(entry["label_hist"]))
        console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def run_partition(args: argparse.Namespace) -> dict[str, Any]:
    """Partition STORE's rows among ``--clients`` clients and print the per-client table."""
    meta = partition_mod.partition(
        args.store, clients=args.clients, scheme=args.scheme, alpha=args.alpha, column=args.column,
        min_size=args.min_size, seed=args.seed, name=args.name)
    if console := _console(args):
        _print_partitions(console, read_info(args.store), only=args.name)
    return {"store": args.store, "name": args.name, **meta}
