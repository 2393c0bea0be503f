"""Site statistics under secure aggregation: the driver learns only sums over all sites.

Each statistics pass is one run of the masking protocol of :mod:`fedpipe.engine.fed_secagg`
(:func:`~fedpipe.engine.fed_secagg.masked_sum`): every site's pinned task computes its packet,
the chain's client part encodes it exactly (:func:`fedpipe.tasks.secure_stats.exact_sum`) and
masks it, the ``sum-…`` tree adds masked words, and the driver unmasks only the total. Min and
max, which no sum gives, come from a 256-ary search whose passes are secure sums of 0/1 vectors
(:mod:`fedpipe.tasks.secure_stats`); the median's histograms are secure sums too. Every site
must answer: a statistic over fewer sites would be a wrong statistic, so a short pass fails
the run.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from distributed import Client
from fedpipe.data import sites as site_tasks
from fedpipe.engine import fed_secagg, placement
from fedpipe.errors import TrainingError
from fedpipe.tasks import aggregate, secure
from fedpipe.tasks import secure_stats as exact
from fedpipe.tasks import sites as sites_math

# What the driver learns of the sites' data in a statistics pass under secure aggregation.
DISCLOSED = {
    "stats": "sums over all sites of rows, per-column count, sum, sum of squares and missing "
             "count (exact)",
    "extremes": "for the min and max of each column: per threshold of an 8-pass 256-ary "
                "search, how many sites' min (max) lie beyond it",
    "median": "sums over all sites of per-column histograms (the median's passes)",
}


def _report(fn: Callable, chain: tuple, states: dict, args: tuple, client: str) -> dict:
    return fn(client, chain, states, *args)


class SecureRunner:
    """Statistics passes over ``clients`` as secure sums: ``runner(name, chain, fn, *args)``
    runs ``fn(client, chain + exact_sum, states, *args)`` on each site and returns the server
    part's output of their sum."""

    def __init__(self, dc: Client, clients: Sequence[str], config: secure.SecAgg) -> None:
        self.dc, self.clients = dc, list(clients)
        self.groups = placement.discover(dc, self.clients)
        self.config = config._replace(bits=64, dropout=0.0)
        self.token = uuid.uuid4().hex[:12]
        self.passes = 0

    def __call__(self, name: str, chain: tuple, fn: Callable, *args) -> dict:
        chain = (*chain, exact.exact_sum(self.config))
        states = aggregate.init_states(chain, 0)
        report_of = functools.partial(_report, fn, chain, states, args)
        r, self.passes = self.passes, self.passes + 1

        def upload(mine: list[str], peers: dict, ctx: bytes) -> Callable[[], dict]:
            return functools.partial(fed_secagg.masked_group, self.token, mine, r, peers, ctx,
                                     self.config.bits, report_of)

        out = fed_secagg.masked_sum(self.dc, self.token, self.groups, self.clients, r,
                                    self.config, {}, None, len(self.clients), upload, name=name)
        if out.rejected or out.aborted is not None:
            raise TrainingError(f"secure statistics pass {name}: "
                                f"{out.aborted or out.rejected}")
        packet, _, _ = aggregate.server_side(chain, states, out.total)
        return packet


def site_stats(run: SecureRunner, features: list[str] | None) -> dict[str, np.ndarray]:
    """Count, sum, sum of squares, missing, min and max per column: nothing per site."""
    packet = run("stats", (), site_tasks.secure_stats_report, features, run.token)
    lo, bits = exact.search_start(2 * len(packet["count"]))
    while bits > 0:
        counts = run("extremes", (), site_tasks.extremes_report, features, run.token, lo, bits)
        lo, bits = exact.search_step(lo, bits, counts["above"])
    packet["min"], packet["max"] = exact.extremes_of(lo)
    return sites_math.finish_stats(packet)
