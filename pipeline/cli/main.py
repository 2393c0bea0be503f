"""The ``fedpipe`` command line: one parser, one subcommand per module, one error policy.

Every command returns a JSON-able summary dict. ``--json`` prints it as the last stdout line;
bad input (any :class:`~fedpipe.errors.FedpipeError`) prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from fedpipe.errors import FedpipeError

# Each module exposes ``register(subparsers, parents)``; the order is the order of ``--help``.
COMMAND_MODULES = (
    "fedpipe.cli.data",
    "fedpipe.cli.train",
    "fedpipe.cli.federate",
    "fedpipe.cli.report",
    "fedpipe.cli.predict",
    "fedpipe.cli.deploy",
    "fedpipe.cli.demo",
)

log = logging.getLogger("fedpipe")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage already; keep its message to one line naming the culprit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"fedpipe {self.prog.split(' ', 1)[-1]}: error: {message}\n")


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name: ``--json``, ``-v``, ``-q``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print only the JSON summary (last line)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedpipe", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parents = [common_options()]
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency inside the module is a real error
                raise
            continue
        module.register(subparsers, parents)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    level = logging.WARNING if quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    log.setLevel(level)
    # distributed logs every worker start at INFO; only show it when asked twice.
    logging.getLogger("distributed").setLevel(logging.DEBUG if args.verbose > 1 else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpipe`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        summary = args.func(args)
    except FedpipeError as exc:
        print(f"fedpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    if summary is not None and args.json:
        print(json.dumps(summary, default=_json_default))
    return 0


def _json_default(value: object) -> object:
    # NumPy scalars and arrays appear in summaries; JSON wants plain Python.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
