"""Reduction graphs submitted to a Dask cluster: a fixed-order tree of adds.

The tree's shape depends only on the number of inputs and the fan-in, never on which worker
finishes first, so the floating-point sum is bit-identical whatever the cluster looks like.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fedpipe.tasks.reduce import add_sums

if TYPE_CHECKING:  # fedpipe.data.stats builds its tree without a cluster: no distributed import
    from distributed import Client, Future

T = TypeVar("T")

FAN_IN = 8  # inputs per add task of every reduction tree (data-parallel and federated alike)
# Leaves fetched and added on the driver rather than summed by a tree of tasks on the workers.
GATHER_AT_MOST = 2


def fold_tree(
    leaves: Sequence[T], fan_in: int, node: Callable[[int, int, list[T]], T], min_levels: int = 0
) -> T:
    """Fold ``leaves`` with a fixed-order fan-in tree; return the root.

    Level ``l`` calls ``node(l, j, group)`` on the ``j``-th run of ``fan_in`` consecutive items
    of level ``l - 1`` (the leaves for ``l = 0``), until one item is left, and for at least
    ``min_levels`` levels. The grouping depends only on ``len(leaves)`` and ``fan_in``, which
    is what makes a floating-point reduction bit-identical whatever runs the nodes.

    Parameters
    ----------
    leaves : sequence
        The inputs, in the order that defines the reduction.
    fan_in : int
        Items per node (>= 2).
    node : callable
        ``node(level, index, group) -> item``: builds one node (a future, a graph key, ...).
    min_levels : int
        Levels built even when a single leaf is left (1 reduces a lone leaf once too).

    Returns
    -------
    The item of the last level's only node (the lone leaf when no level is built).
    """
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    if not leaves:
        raise ValueError("a reduction tree needs at least one leaf")
    items = list(leaves)
    level = 0
    while len(items) > 1 or level < min_levels:
        items = [node(level, j, items[i : i + fan_in])
                 for j, i in enumerate(range(0, len(items), fan_in))]
        level += 1
    return items[0]


def tree_sum(
    dask_client: Client,
    futures: Sequence[Future],
    fan_in: int = FAN_IN,
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
        A pure function adding its arguments (default :func:`fedpipe.tasks.reduce.add_sums`).

    Returns
    -------
    distributed.Future
    """
    if not futures:
        raise ValueError("tree_sum needs at least one future")
    name = f"{key_prefix}-{uuid.uuid4().hex}"  # fresh keys: never reuse a stale result

    def node(level: int, index: int, group: list[Future]) -> Future:
        return dask_client.submit(add, *group, key=(name, level, index))

    return fold_tree(futures, fan_in, node)


def fetch_sum(dask_client: Client, futures: Sequence[Future], add: Callable[..., Any],
              timeout: float | None = None, key_prefix: str = "sum",
              fan_in: int = FAN_IN) -> Any:
    """The sum of ``futures``' results: fetched and added on the driver when few, else the
    result of :func:`tree_sum` on the workers.

    With a leaf or two (one per simulation worker) a ``sum-…`` task costs a scheduling hop and a
    worker-to-worker transfer more than fetching both model-sized results (~5 ms per round on
    a loaded 2-core machine); the driver adds them with the same ``add`` in the same order, so
    the bits are those of the tree. ``timeout`` bounds the fetch too (a round's deadline).
    """
    from fedpipe import resilience  # imports distributed: only where a cluster is in use

    if len(futures) <= GATHER_AT_MOST:
        return add(*resilience.fetch(dask_client, futures, timeout))
    root = tree_sum(dask_client, futures, fan_in=fan_in, key_prefix=key_prefix, add=add)
    try:
        return root.result(timeout=timeout)
    except BaseException:
        root.cancel()
        raise


def tree_depth(n_leaves: int, fan_in: int = FAN_IN) -> int:
    """Number of add levels :func:`tree_sum` (:func:`fold_tree`) builds for ``n_leaves`` inputs."""
    depth = 0
    while n_leaves > 1:
        n_leaves = -(-n_leaves // fan_in)
        depth += 1
    return depth
