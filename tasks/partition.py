"""Partition rows among federated clients: every function returns one client index per row.

Pure NumPy with explicit seeds; the same arguments always give the same assignment.
Invalid arguments raise ``ValueError`` with a one-line message naming the argument.
"""

from __future__ import annotations

import numpy as np


def _check(n_rows: int, clients: int, min_size: int) -> None:
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if clients > n_rows:
        raise ValueError(f"clients ({clients}) is larger than the number of rows ({n_rows})")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if clients * min_size > n_rows:
        raise ValueError(f"{clients} clients x min_size {min_size} is more than the {n_rows} rows")


def iid(n_rows: int, clients: int, seed: int) -> np.ndarray:
    """Shuffle the rows and deal them into ``clients`` near-equal parts."""
    _check(n_rows, clients, 0)
    rng = np.random.default_rng(seed)
    # np.array_split's part sizes: the first n_rows % clients parts get one row more.
    sizes = np.full(clients, n_rows // clients)
    sizes[: n_rows % clients] += 1
    assignment = np.empty(n_rows, dtype=np.int64)
    assignment[rng.permutation(n_rows)] = np.repeat(np.arange(clients), sizes)
    return assignment


def dirichlet(
    labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1, tries: int = 100
) -> np.ndarray:
    """Label skew: each class's rows are split among clients by proportions ~ Dir(alpha).

    Smaller ``alpha`` gives each client fewer classes. A draw that leaves a client with fewer
    than ``min_size`` rows is redrawn (up to ``tries`` times, from the same seeded stream).

    References
    ----------
    Hsu, Qi & Brown, "Measuring the effects of non-identical data distribution for federated
    visual classification", arXiv:1909.06335, 2019.
    """
    labels = np.asarray(labels)
    _check(len(labels), clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(tries):
        assignment = np.empty(len(labels), dtype=np.int64)
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(rows)).astype(int)
            for k, part in enumerate(np.split(rows, cuts)):
                assignment[part] = k
        if np.bincount(assignment, minlength=clients).min() >= min_size:
            return assignment
    sizes = np.bincount(assignment, minlength=clients)
    k = int(np.argmin(sizes))
    raise ValueError(
        f"client {k} gets {sizes[k]} rows (< min_size {min_size}) in {tries} Dirichlet draws; "
        "use fewer clients, a larger alpha or a smaller min_size")


def quantity(n_rows: int, clients: int, alpha: float, seed: int, min_size: int = 1) -> np.ndarray:
    """Quantity skew: client sizes follow a power law, ``size_k`` proportional to ``rank^-alpha``.

    Every client first gets ``min_size`` rows; the rest are shared by the power-law weights,
    whose ranks are shuffled so that client 0 is not always the largest.
    """
    _check(n_rows, clients, min_size)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    weights = rng.permutation(np.arange(1, clients + 1, dtype=np.float64) ** -alpha)
    spare = n_rows - clients * min_size
    extra = np.floor(weights / weights.sum() * spare).astype(np.int64)
    extra[np.argsort(-weights)[: spare - extra.sum()]] += 1  # hand out the rounding remainder
    sizes = min_size + extra
    assignment = np.repeat(np.arange(clients), sizes)
    return assignment[rng.permutation(n_rows)]


def by_values(values: np.ndarray, clients: int) -> np.ndarray:
    """Natural partition by a column: rows with equal values go to the same client.

    The sorted distinct values are cut into ``clients`` contiguous runs of near-equal length
    (value rank ``r`` of ``u`` goes to client ``r * clients // u``), so a categorical column
    with exactly ``clients`` values gives one client per value.
    """
    values = np.asarray(values)
    if np.isnan(values).any():
        raise ValueError(f"the column has a missing value at row {int(np.argmax(np.isnan(values)))}")
    distinct, rank = np.unique(values, return_inverse=True)
    _check(len(values), clients, 0)
    if len(distinct) < clients:
        raise ValueError(f"the column has {len(distinct)} distinct values, fewer than {clients} clients")
    return rank.astype(np.int64) * clients // len(distinct)


def quantile_bins(y: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Discretise a regression target into ``bins`` quantile bins; returns ``(labels, edges)``."""
    edges = np.unique(np.quantile(y, np.linspace(0, 1, bins + 1)))
    labels = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, max(len(edges) - 2, 0))
    return labels.astype(np.int64), edges


def label_histograms(labels: np.ndarray, assignment: np.ndarray, clients: int, n_labels: int) -> np.ndarray:
    """Counts of each label per client, shape ``(clients, n_labels)``."""
    flat = np.asarray(assignment, dtype=np.int64) * n_labels + np.asarray(labels, dtype=np.int64)
    return np.bincount(flat, minlength=clients * n_labels).reshape(clients, n_labels)


def label_skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global mix (0..1)."""
    hist = np.asarray(histograms, dtype=np.float64)
    sizes = hist.sum(axis=1, keepdims=True)
    local = hist[sizes[:, 0] > 0] / sizes[sizes[:, 0] > 0]
    overall = hist.sum(axis=0) / hist.sum()
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())
