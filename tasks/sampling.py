"""Client sampling for a federated round: a pure function of ``(seed, round)``.

The sample of round ``r`` depends on nothing but the seed, the round number and the client list,
so a resumed run samples exactly the clients the uninterrupted run would have sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Tags the sampling stream so it never coincides with the local-training streams that use
# the same (seed, round) pair.
_SAMPLING_STREAM = 0x5A3F


def sample_size(n_clients: int, *, fraction: float | None = None,
                count: int | None = None) -> int:
    """How many clients a round samples.

    Parameters
    ----------
    n_clients : int
        Clients in the partition.
    fraction : float, optional
        Share of clients per round, in ``(0, 1]``; rounded to the nearest integer, at least 1.
    count : int, optional
        Fixed number of clients per round (capped at ``n_clients``). Give at most one of the two;
        with neither every client takes part.

    Returns
    -------
    int
    """
    if fraction is not None and count is not None:
        raise ValueError("give fraction or count, not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        return max(1, min(n_clients, int(round(fraction * n_clients))))
    if count is not None:
        if count < 1:
            raise ValueError(f"clients per round must be at least 1, got {count}")
        return min(n_clients, int(count))
    return n_clients


def sample_clients(clients: Sequence[str], round_: int, seed: int, *,
                   fraction: float | None = None, count: int | None = None) -> list[str]:
    """The clients taking part in round ``round_``, uniformly without replacement.

    Parameters
    ----------
    clients : sequence of str
        Every client id of the partition (order does not matter: it is sorted first).
    round_ : int
        Round number (0-based).
    seed : int
        Run seed.
    fraction, count
        See :func:`sample_size`.

    Returns
    -------
    list of str
        Sampled client ids, sorted.

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (client fraction C per round).
    """
    pool = sorted(clients)
    k = sample_size(len(pool), fraction=fraction, count=count)
    if k == len(pool):
        return pool
    rng = np.random.default_rng([int(seed), int(round_), _SAMPLING_STREAM])
    picked = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in picked)
