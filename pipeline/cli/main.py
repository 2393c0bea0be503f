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

from fedpipe.errors import FedpipeError, InfrastructureError

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
        # prog is already "fedpipe", "fedpipe train" or "fedpipe deploy render".
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    # Dask's own logs (worker starts, a task's failure with its traceback) only when asked:
    # fedpipe reports a failure in its one line. Workers fedpipe starts follow this level.
    dask_level = {0: logging.CRITICAL, 1: logging.WARNING}.get(args.verbose, logging.DEBUG)
    import distributed  # noqa: F401  (its import sets levels on its own loggers: override them)

    for name in [*logging.root.manager.loggerDict, "asyncio"]:  # asyncio: errors on Dask's loop
        if name.split(".")[0] in ("distributed", "asyncio", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(dask_level)


# Exit statuses (README, "Exit status"): 0 done, 1 a fedpipe bug, 2 bad input or data,
# 3 the cluster, network or disk failed (the same command may succeed later), 130 interrupted.
EXIT_BUG, EXIT_INPUT, EXIT_INFRASTRUCTURE, EXIT_INTERRUPTED = 1, 2, 3, 130
# OSErrors about a path the user named are bad input; the others (disk full, I/O error,
# connection reset) are the machine's.
_INPUT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                    FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpipe`` console script. Returns the exit status."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line printed already)
        return int(exc.code or 0)
    if unknown:  # argparse would blame the top-level parser; name the command instead
        print(f"{_prog(args)}: error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    _configure_logging(args)
    try:
        summary = args.func(args)
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, whatever failed; the traceback only with -v
        if args.verbose:
            log.exception("fedpipe %s failed", args.command)
        status, message = _classify(exc)
        message += _resume_hint(args, exc)
        print(f"{_prog(args)}: error: {message}", file=sys.stderr)
        return status
    if summary is not None and args.json:
        print(json.dumps(summary, default=_json_default))
    return 0


def _classify(exc: Exception) -> tuple[int, str]:
    """Exit status and one-line message for an exception that ended a command."""
    from distributed.client import FutureCancelledError, FuturesCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FedpipeError):
        return EXIT_INPUT, text
    if isinstance(exc, _INPUT_OS_ERRORS):
        return EXIT_INPUT, f"{exc.strerror or text}: {exc.filename}" if exc.filename else text
    if isinstance(exc, InfrastructureError):
        return EXIT_INFRASTRUCTURE, text
    if isinstance(exc, FutureCancelledError | FuturesCancelledError):  # the scheduler went away or forgot the work
        reason = "lost the connection to the Dask scheduler" if "connection" in text else text
        return EXIT_INFRASTRUCTURE, f"{reason} (rerun with -v for details)"
    if isinstance(exc, OSError | TimeoutError | CommClosedError | KilledWorker):
        return EXIT_INFRASTRUCTURE, f"{type(exc).__name__}: {text} (rerun with -v for details)"
    return EXIT_BUG, (f"internal error, please report it: {type(exc).__name__}: {text} "
                      "(rerun with -v for the traceback)")


def _resume_hint(args: argparse.Namespace, exc: Exception) -> str:
    """How to go on after the scheduler was lost: what is kept, and the command to resume."""
    from fedpipe.cluster import SchedulerLostError

    if not isinstance(exc, SchedulerLostError):
        return ""
    out = getattr(args, "out", None)  # options not given are absent (config files fill them)
    if out is None or args.command not in ("train", "federate"):
        return "; start a scheduler and workers again and rerun the command"
    from fedpipe import rundir

    kept = rundir.checkpoint_step(out)
    if kept is None:
        return f"; no checkpoint was written in {out} yet: start a scheduler and rerun the command"
    return (f"; {out} keeps its checkpoint at {kept}: start a scheduler and workers and "
            "rerun the command with --resume (and --scheduler ADDRESS)")


def _prog(args: argparse.Namespace) -> str:
    """``fedpipe train`` or ``fedpipe deploy render``: the command as the user typed it."""
    action = getattr(args, "deploy_action", None)
    return " ".join(filter(None, ("fedpipe", args.command, action)))


def _json_default(value: object) -> object:
    # NumPy scalars and arrays appear in summaries; JSON wants plain Python.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
