"""argparse ``type=`` functions for numbers with a range: a bad value is argparse's one line.

``--server-lr -1`` fails while parsing, before any data is read or any cluster started, as
``fedpipe federate: error: argument --server-lr: must be a number > 0, got '-1'``. The same
functions check values from a ``--config`` file (:mod:`fedpipe.cli.config` calls them and names
the key); ``numeric`` tells it that a TOML string such as ``"5"`` is not a number.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any


def _ranged(kind: type, ok: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):  # nan and inf are never a setting
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted  # argparse and config errors read it
    parse.type_name = wanted  # type: ignore[attr-defined]
    parse.numeric = True  # type: ignore[attr-defined]
    return parse


positive_int = _ranged(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _ranged(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _ranged(float, lambda v: v > 0, "a number > 0")
nonneg_float = _ranged(float, lambda v: v >= 0, "a number >= 0")
# --fraction: a share of the clients, some of them at least.
share = _ranged(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
# --test-fraction: a held-out share; 0 holds nothing out, 1 would leave nothing to train on.
holdout = _ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
# --delta: a probability strictly between 0 and 1.
open_share = _ranged(float, lambda v: 0 < v < 1, "a number in (0, 1)")


class Renamed(argparse.Action):
    """An option also spelled the way an earlier fedpipe did: ``add_argument("--old", "--new",
    action=Renamed)`` (the name last, as fedpipe's messages read it); the old spelling still
    works and prints a one-line note on stderr."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string != self.option_strings[-1]:
            print(f"fedpipe: {option_string} is deprecated, use {self.option_strings[-1]}",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)
