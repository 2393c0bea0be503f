"""Reduction graphs submitted to a Dask cluster: a fixed-order tree of adds.

The tree's shape depends only on the number of inputs and the fan-in, never on which worker
finishes first, so the floating-point sum is bit-identical whatever the cluster looks like.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from distributed import Client, Future

from tasks.reduce import add_sums


def tree_sum(
    dask_client: Client,
    futures: Sequence[Future],
    fan_in: int = 8,
    key_prefix: str = "sum",
    add: Callable[..., Any] = add_sums,
) -> Future:
    """Sum ``futures`` on the workers with a fixed-order tree; return the one root future.

    Level ``l`` adds consecutive groups of ``fan_in`` results of level ``l - 1`` (in input
    order) with ``add``; the driver only ever fetches the root.

    Parameters
    ----------
    dask_client : distributed.Client
    futures : sequence of Future
        The leaves, in the order that defines the sum.
    fan_in : int
        Inputs per add task (>= 2).
    key_prefix : str
        Task group shown on the dashboard; keys are ``(f"{key_prefix}-{token}", level, index)``.
    add : callable
        A pure function adding its arguments (default :func:`tasks.reduce.add_sums`).

    Returns
    -------
    distributed.Future
    """
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    if not futures:
        raise ValueError("tree_sum needs at least one future")
    name = f"{key_prefix}-{uuid.uuid4().hex}"  # fresh keys: never reuse a stale result
    level_items = list(futures)
    level = 0
    while len(level_items) > 1:
        level_items = [
            dask_client.submit(add, *level_items[i : i + fan_in], key=(name, level, i // fan_in))
            for i in range(0, len(level_items), fan_in)
        ]
        level += 1
    return level_items[0]


def tree_depth(n_leaves: int, fan_in: int = 8) -> int:
    """Number of add levels :func:`tree_sum` builds for ``n_leaves`` inputs."""
    depth = 0
    while n_leaves > 1:
        n_leaves = -(-n_leaves // fan_in)
        depth += 1
    return depth
