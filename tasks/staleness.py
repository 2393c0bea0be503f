"""Bookkeeping of bounded-staleness (stale-synchronous) data-parallel training, in plain NumPy.

The driver of :mod:`fedpipe.engine.stale` splits the gradient blocks into *groups* (one per
worker by default). Each group computes its blocks' ``(loss_sum, grad_sum, n)`` at some parameter
*version* (the number of optimizer steps applied when it started) and the driver keeps every
group's latest contribution. A step at version ``v`` adds all the contributions (the newest of
each group) into one full-batch gradient; it is taken as soon as a result arrives and no
contribution is more than ``S`` versions old, ``v - u_g <= S``. A group whose contribution would
be too old holds the step back: the fast groups wait for it. With ``S = 0`` every step waits for
every group at the current version, which is synchronous full-batch training.

Everything here is a function of arrays and an explicit seed, so the loop's decisions can be
tested without a cluster and replayed from a checkpoint.

References
----------
Ho, Cipar, Cui, Kim, Lee, Gibbons, Gibson, Ganger, Xing, "More effective distributed ML via a
stale synchronous parallel parameter server", NIPS 2013.
"""

from __future__ import annotations

import numpy as np

NO_VERSION = -1  # a group that has not delivered any contribution yet


def group_blocks(n_blocks: int, n_groups: int) -> list[list[int]]:
    """Blocks of each group: block ``b`` belongs to group ``b mod n_groups``.

    The same round robin places block ``b`` on worker ``b mod W``, so with one group per worker
    a group is exactly the blocks one worker computes.
    """
    if n_groups < 1 or n_blocks < 1:
        raise ValueError(f"need at least one block and one group, got {n_blocks}, {n_groups}")
    n_groups = min(n_groups, n_blocks)
    return [list(range(g, n_blocks, n_groups)) for g in range(n_groups)]


def staleness(version: int, contrib_versions: np.ndarray) -> np.ndarray:
    """Versions each group's contribution is behind ``version`` (``version - u_g``)."""
    return version - np.asarray(contrib_versions, dtype=np.int64)


def may_step(version: int, contrib_versions: np.ndarray, max_staleness: int) -> bool:
    """True when every group has a contribution at most ``max_staleness`` versions old.

    Parameters
    ----------
    version : int
        The parameters' version now (optimizer steps applied so far).
    contrib_versions : array of int
        Version each group's latest contribution was computed at (:data:`NO_VERSION`: none).
    max_staleness : int
        The bound ``S`` (0: synchronous).
    """
    contrib_versions = np.asarray(contrib_versions, dtype=np.int64)
    if np.any(contrib_versions == NO_VERSION):
        return False
    return bool(np.all(staleness(version, contrib_versions) <= max_staleness))


def staleness_stats(version: int, contrib_versions: np.ndarray) -> dict[str, float]:
    """``{"staleness_mean", "staleness_max"}`` of the contributions a step at ``version`` adds."""
    lag = staleness(version, contrib_versions)
    return {"staleness_mean": float(lag.mean()), "staleness_max": int(lag.max())}


def virtual_duration(seed: int, group: int, dispatch: int, spread: float = 0.5) -> float:
    """Simulated seconds of a group's ``dispatch``-th task on the virtual clock.

    Each group has a fixed speed, lognormal with sigma ``spread`` (drawn from ``(seed,
    group)``), and each task a 10% jitter around it (drawn from ``(seed, group, dispatch)``):
    heterogeneous but reproducible workers, whatever the real cluster does.
    """
    base = np.random.default_rng([seed, group]).lognormal(0.0, spread)
    jitter = np.random.default_rng([seed, group, dispatch]).lognormal(0.0, 0.1)
    return float(base * jitter)


def next_arrival(finish: np.ndarray, busy: np.ndarray) -> int:
    """The busy group whose task ends first on the virtual clock (the lowest index on a tie)."""
    finish = np.where(np.asarray(busy, dtype=bool), np.asarray(finish, dtype=float), np.inf)
    if not np.isfinite(finish).any():
        raise ValueError("no task in flight")
    return int(np.argmin(finish))


def to_dispatch(version: int, contrib_versions: np.ndarray, busy: np.ndarray) -> list[int]:
    """Idle groups with something new to compute: their contribution is older than ``version``.

    An idle group whose contribution is at ``version`` already waits for the next step (a fast
    worker held back by the bound); every other idle group starts at the newest parameters.
    """
    idle = ~np.asarray(busy, dtype=bool)
    return [int(g) for g in np.flatnonzero(idle & (np.asarray(contrib_versions) < version))]


def simulate(seed: int, n_groups: int, max_staleness: int, steps: int,
             spread: float = 0.5) -> dict[str, np.ndarray]:
    """The stale loop's decisions on the virtual clock alone (no gradients): what a seeded run
    of :mod:`fedpipe.engine.stale` does, step by step.

    Returns ``{"time": virtual time of each step, "staleness": (steps, n_groups) versions each
    contribution was behind}``; the time of ``steps`` steps is ``time[-1]``. Comparing bounds on
    the same seed shows what staleness buys in time before any training is run.
    """
    version, now = 0, 0.0
    contrib = np.full(n_groups, NO_VERSION, dtype=np.int64)
    started = np.zeros(n_groups, dtype=np.int64)   # version each busy group computes at
    dispatches = np.zeros(n_groups, dtype=np.int64)
    finish = np.array([virtual_duration(seed, g, 0, spread) for g in range(n_groups)])
    busy = np.ones(n_groups, dtype=bool)
    dispatches[:] = 1
    times, lags = [], []
    while len(times) < steps:
        g = next_arrival(finish, busy)
        now, busy[g], contrib[g] = finish[g], False, started[g]
        if may_step(version, contrib, max_staleness):
            times.append(now)
            lags.append(staleness(version, contrib))
            version += 1
        for h in to_dispatch(version, contrib, busy):
            finish[h] = now + virtual_duration(seed, int(h), int(dispatches[h]), spread)
            started[h], busy[h] = version, True
            dispatches[h] += 1
    return {"time": np.array(times), "staleness": np.array(lags)}
