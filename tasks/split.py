"""Deterministic train/test split: a row's side depends only on (seed, chunk key, row in chunk)."""

from __future__ import annotations

import numpy as np


def test_mask(n_rows: int, chunk_key: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows of one chunk that belong to the test set.

    Parameters
    ----------
    n_rows : int
        Rows in the chunk.
    chunk_key : int
        Non-negative integer naming the chunk; together with ``seed`` it seeds the generator,
        so every worker that reads the chunk draws the same mask without coordination.
    fraction : float
        Expected share of test rows, in ``[0, 1)``.
    seed : int
        Split seed.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of shape ``(n_rows,)``; ``True`` marks a test row.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test fraction must be in [0, 1), got {fraction}")
    if n_rows < 0 or chunk_key < 0 or seed < 0:
        raise ValueError("n_rows, chunk_key and seed must be non-negative")
    rng = np.random.default_rng([seed, chunk_key])
    return rng.random(n_rows) < fraction


# Keeps pytest from collecting the function when a test module imports it by name.
test_mask.__test__ = False  # type: ignore[attr-defined]
