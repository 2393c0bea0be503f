"""``fedpipe report RUN_DIR`` and ``fedpipe compare RUN_DIR RUN_DIR …``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpipe.errors import ValidationError
from fedpipe.monitor import report
from rich import box
from rich.console import Console
from rich.table import Table

log = logging.getLogger("fedpipe")


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``report`` and ``compare`` subcommands."""
    p = subparsers.add_parser("report", parents=parents, help="write RUN_DIR/report.html (PNG plots)",
                              description="Write a self-contained HTML report of a run with PNG plots.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by fedpipe train/federate")
    p.set_defaults(func=run_report)

    c = subparsers.add_parser("compare", parents=parents, help="overlay several runs in one plot + table",
                              description="Overlay the loss/accuracy curves of several runs; table of final metrics.")
    c.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories to compare")
    c.add_argument("--out", default="compare.html", help="HTML file to write (PNG beside it; default: %(default)s)")
    c.set_defaults(func=run_compare)


def _check_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValidationError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    return run_dir


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    """Write the report of ``args.run_dir``; returns its path and the PNGs written."""
    run_dir = _check_run_dir(args.run_dir)
    html_path = report.write_report(run_dir)
    pngs = sorted(str(p) for p in (run_dir / report.REPORT_DIR).glob("*.png"))
    log.info("report: %s", html_path)
    return {"report": str(html_path), "pngs": pngs}


def run_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Write the comparison of ``args.run_dirs`` and print its table (unless --json/--quiet)."""
    run_dirs = [_check_run_dir(d) for d in args.run_dirs]
    html_path, rows = report.compare_runs(run_dirs, args.out)
    if not (args.json or args.quiet):
        print_table(rows)
    log.info("comparison: %s", html_path)
    return {"compare": str(html_path), "png": str(Path(html_path).with_suffix(".png")), "runs": rows}


def print_table(rows: Sequence[Mapping[str, Any]], title: str = "runs", console: Console | None = None) -> None:
    """The rows as a rich table on stdout (one screen: one line per run)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    cols = list(dict.fromkeys(k for row in rows for k in row))
    for col in cols:
        table.add_column(report.header(col), no_wrap=col == "run",
                         justify="left" if col in ("run", "mode") else "right")
    for row in rows:
        table.add_row(*(report.fmt(row.get(c)) for c in cols))
    if console is None:
        # Not a terminal (a pipe, CI logs): rich would squeeze the table into 80 columns.
        console = Console()
        console = console if console.is_terminal else Console(width=120)
    console.print(table)


def add_report_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--report`` to a training command (``train``, ``federate``)."""
    parser.add_argument("--report", action="store_true",
                        help="write RUN_DIR/report.html at the end (needs --out)")


def check_report_option(args: argparse.Namespace) -> None:
    """Fail before training, not after, when ``--report`` has no run directory to write to."""
    if getattr(args, "report", False) and not getattr(args, "out", None):
        raise ValidationError("--report needs --out RUN_DIR (the report is written into it)")


def report_at_end(args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """With ``--report``, write the run's report and add its path to ``summary``."""
    if getattr(args, "report", False) and getattr(args, "out", None):
        path = report.write_report(args.out)
        log.info("report: %s", path)
        summary = {**summary, "report": str(path)}
    return summary
