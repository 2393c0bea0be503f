"""``fedpipe federate --mode async``: the options of buffered asynchronous training (FedBuff).

Kept apart from :mod:`fedpipe.cli.federate` (two hooks there): the option group, the mode
object the options make (:func:`fedpipe.tasks.fedbuff.buffered`) and the one-line refusals of
the round-only options it does not go with.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedpipe.cli.argtypes import nonneg_float, nonneg_int, positive_int
from fedpipe.errors import ValidationError
from fedpipe.tasks import fedbuff

# What --mode async refuses outright (the flag, how to tell it was given, why).
_REFUSED = (("--secure-aggregation", lambda a: a.secure_aggregation,
             "its masks need a round's fixed set of clients"),
            ("--dp", lambda a: a.dp is not None,
             "the privacy accountant counts rounds of sampled clients"),
            ("--strategy scaffold", lambda a: a.strategy == "scaffold",
             "its control variates assume rounds"),
            ("--sites", lambda a: bool(getattr(a, "sites", None)),
             "site-local stores run rounds only"),
            ("--lr-schedule", lambda a: bool(a.lr_schedule), "it counts rounds"),
            ("--fraction", lambda a: a.fraction is not None, "async training samples no rounds"),
            ("--clients-per-round", lambda a: a.clients_per_round is not None,
             "async training samples no rounds (see --max-concurrency)"),
            ("--deadline", lambda a: a.deadline is not None, "async training waits for no round"),
            ("--min-clients", lambda a: a.min_clients != 1, "see --buffer-size"))
_ASYNC_ONLY = ("buffer_size", "max_concurrency", "staleness_exponent", "max_staleness",
               "clock", "client_speeds")


def add_options(p: argparse.ArgumentParser) -> None:
    """The ``--mode`` option and its async group."""
    g = p.add_argument_group("asynchronous training (FedBuff; docs/async.md)")
    g.add_argument("--mode", choices=["sync", "async"], default="sync",
                   help="sync: rounds (default); async: buffered asynchronous aggregation, "
                        "--rounds counts model versions")
    g.add_argument("--buffer-size", type=positive_int, help="K updates per server step (default 10)")
    g.add_argument("--max-concurrency", type=positive_int,
                   help="C clients training at once (default 20)")
    g.add_argument("--staleness-exponent", type=nonneg_float,
                   help="a in the staleness weight 1/(1+s)^a (default 0.5)")
    g.add_argument("--max-staleness", type=nonneg_int,
                   help="drop updates more than S versions old (default: none dropped)")
    g.add_argument("--clock", choices=list(fedbuff.CLOCKS),
                   help="virtual: simulated client times, reproducible (default); wall: real")
    g.add_argument("--client-speeds",
                   help="virtual clock: constant (default) or two-tier:FRACTION,FACTOR")


def make_mode(args: argparse.Namespace) -> fedbuff.Buffered | None:
    """The mode object of the options (None for rounds), refused in one line naming a flag."""
    if args.mode != "async":
        given = [name for name in _ASYNC_ONLY if getattr(args, name) is not None]
        if given:
            raise ValidationError(f"--{given[0].replace('_', '-')} only applies with "
                                  "--mode async")
        return None
    for flag, on, why in _REFUSED:
        if on(args):
            raise ValidationError(f"--mode async does not support {flag}: {why}")
    options: dict[str, Any] = {k: getattr(args, k) for k in _ASYNC_ONLY[:5]
                               if getattr(args, k) is not None}
    try:
        if args.client_speeds is not None:
            options["speeds"] = fedbuff.parse_speeds(args.client_speeds)
        return fedbuff.buffered(**options)
    except ValueError as exc:
        flag = "--client-speeds" if "--" not in str(exc) else ""
        raise ValidationError(f"{flag} {exc}".strip()) from None
