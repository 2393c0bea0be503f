"""Buffered asynchronous federated learning (FedBuff): the arithmetic, in plain NumPy.

Clients train continuously, each from the newest global model it was given; their updates
wait in a buffer and every ``K`` of them make one server step. An update computed from version
``v`` that arrives when the server is at version ``t`` has staleness ``s = t - v``; it is
weighted by ``1 / (1 + s)^a`` before the sum, and dropped when ``s`` exceeds the bound. The sum
keeps its fixed denominator (the chain's ``weighted_mean`` divides by the buffered clients'
rows, not by their staleness weights), so stale updates move the model less, as in the paper.

The engine (:mod:`fedpipe.engine.fedbuff`) runs the loop; this module holds what it computes:
the mode's settings (:func:`buffered`), the simulated client speeds of the virtual clock
(:func:`two_tier`, :func:`constant`), the staleness weight, the weighting of a packet, the
client picked for the next dispatch and the staleness summary of one aggregation.

References
----------
Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .aggregate import GATHER, Packet

CLOCKS = ("virtual", "wall")
_PICK = 0x46B  # separates the dispatch stream from the clients' training streams
_SLOW = 0x5E1  # ... and the choice of slow clients


class Speeds(NamedTuple):
    """Simulated client speeds: a share ``fraction`` of the clients is ``factor`` times slower.

    A client's simulated time per task is its factor times its rows over the mean rows (work
    grows with the data a client trains on). ``constant()`` is the one-tier case.
    """

    fraction: float = 0.0
    factor: float = 1.0

    @property
    def spec(self) -> str:
        return "constant" if self.fraction == 0.0 else f"two-tier:{self.fraction:g},{self.factor:g}"


def constant() -> Speeds:
    """Every client at the same speed (simulated time proportional to its rows)."""
    return Speeds()


def two_tier(fraction: float, factor: float) -> Speeds:
    """A share ``fraction`` of the clients (picked by the run's seed) ``factor`` times slower."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"two-tier fraction must be in [0, 1], got {fraction}")
    if not factor >= 1.0:
        raise ValueError(f"two-tier slowdown factor must be >= 1, got {factor}")
    return Speeds(float(fraction), float(factor))


def parse_speeds(text: str) -> Speeds:
    """``"constant"`` or ``"two-tier:FRACTION,FACTOR"`` (e.g. ``two-tier:0.2,10``)."""
    kind, _, args = text.partition(":")
    if kind == "constant" and not args:
        return constant()
    if kind == "two-tier":
        try:
            fraction, factor = (float(v) for v in args.split(","))
        except ValueError:
            raise ValueError(f"two-tier needs FRACTION,FACTOR (e.g. two-tier:0.2,10), got "
                             f"{text!r}") from None
        return two_tier(fraction, factor)
    raise ValueError(f"expected 'constant' or 'two-tier:FRACTION,FACTOR', got {text!r}")


def durations(speeds: Speeds, rows: Mapping[str, int], seed: int) -> dict[str, float]:
    """Simulated seconds one task of each client takes: factor * rows / mean rows."""
    clients = sorted(rows)
    mean = float(np.mean([max(rows[c], 1) for c in clients]))
    n_slow = int(round(speeds.fraction * len(clients)))
    slow = set(np.random.default_rng([int(seed), _SLOW]).permutation(len(clients))[:n_slow])
    return {c: (speeds.factor if i in slow else 1.0) * max(rows[c], 1) / mean
            for i, c in enumerate(clients)}


class Buffered(NamedTuple):
    """The asynchronous mode of ``federate`` (FedBuff); build it with :func:`buffered`."""

    buffer_size: int = 10
    max_concurrency: int = 20
    staleness_exponent: float = 0.5
    max_staleness: int | None = None
    clock: str = "virtual"
    speeds: Speeds = Speeds()

    @property
    def spec(self) -> dict:
        return {"mode": "async", "buffer_size": self.buffer_size,
                "max_concurrency": self.max_concurrency,
                "staleness_exponent": self.staleness_exponent,
                "max_staleness": self.max_staleness, "clock": self.clock,
                "client_speeds": self.speeds.spec}


def buffered(buffer_size: int = 10, max_concurrency: int = 20, staleness_exponent: float = 0.5,
             max_staleness: int | None = None, clock: str = "virtual",
             speeds: Speeds | None = None) -> Buffered:
    """FedBuff: ``max_concurrency`` clients in flight, a server step every ``buffer_size`` updates.

    Parameters
    ----------
    buffer_size : int
        K, the updates aggregated per server step (a new model version).
    max_concurrency : int
        C, the most clients training at once.
    staleness_exponent : float
        a in the weight ``1 / (1 + s)^a`` (0: no down-weighting).
    max_staleness : int, optional
        S: updates more than S versions old are dropped and counted (None: none dropped).
    clock : str
        ``"virtual"``: simulated client times (``speeds``), updates handled in simulated
        arrival order, so a run is reproducible bit for bit from its seed; ``"wall"``: real
        arrival order (``as_completed``).
    speeds : Speeds, optional
        Simulated speeds of the virtual clock (default :func:`constant`).

    References
    ----------
    Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
    """
    if int(buffer_size) < 1:
        raise ValueError(f"--buffer-size must be at least 1, got {buffer_size}")
    if int(max_concurrency) < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    if not staleness_exponent >= 0:
        raise ValueError(f"--staleness-exponent must be >= 0, got {staleness_exponent}")
    if max_staleness is not None and int(max_staleness) < 0:
        raise ValueError(f"--max-staleness must be >= 0, got {max_staleness}")
    if clock not in CLOCKS:
        raise ValueError(f"--clock must be virtual or wall, got {clock!r}")
    if speeds is not None and clock == "wall" and speeds != constant():
        raise ValueError("--client-speeds simulates the virtual clock: give --clock virtual")
    return Buffered(int(buffer_size), int(max_concurrency), float(staleness_exponent),
                    None if max_staleness is None else int(max_staleness), clock,
                    speeds or constant())


def staleness_weight(staleness: int, exponent: float) -> float:
    """``1 / (1 + s)^a``: FedBuff's polynomial down-weighting of a stale update."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


def too_stale(staleness: int, max_staleness: int | None) -> bool:
    """Whether an update ``staleness`` versions old is dropped."""
    return max_staleness is not None and staleness > max_staleness


def weigh(packet: Packet, weight: float) -> Packet:
    """The packet with its delta (summed or gathered) scaled by ``weight``, counts unscaled.

    Applied after the client's stages (a clipped update stays clipped: ``weight <= 1``) and
    before the sum, so the chain's server part divides by the unweighted row count.
    """
    if weight == 1.0:
        return packet
    return {k: v * weight if k in ("delta", f"{GATHER}delta") else v for k, v in packet.items()}


def pick_client(idle: Sequence[str], seed: int, dispatch: int) -> str:
    """The client of the ``dispatch``-th task: uniform over the idle ones, from the seed."""
    if not idle:
        raise ValueError("no idle client to dispatch")
    return idle[int(np.random.default_rng([int(seed), int(dispatch), _PICK]).integers(len(idle)))]


def staleness_summary(stalenesses: Sequence[int]) -> dict:
    """Mean, max and histogram (``{"s": count}``) of one aggregation's update staleness."""
    values = np.asarray(stalenesses, dtype=np.int64)
    if values.size == 0:
        return {"mean": None, "max": None, "hist": {}}
    counts = np.bincount(values)
    return {"mean": float(values.mean()), "max": int(values.max()),
            "hist": {str(s): int(c) for s, c in enumerate(counts) if c}}


def sync_round_time(durations_: Mapping[str, float], sampled: Sequence[str]) -> float:
    """Simulated time of one synchronous round: it waits for its slowest sampled client."""
    return max(durations_[c] for c in sampled)


