"""Site-local stores for tests: rows split among sites, each site's store ingested on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fedpipe.cli.main import main
from sklearn.datasets import make_classification


def site_rows(n_sites: int = 3, n_rows: int = 900, n_features: int = 5, seed: int = 0):
    """``[(X, y), ...]`` per site: 3 classes, site 0 without class 2, one column far off scale
    and a few missing values (so the federated imputation and standardisation matter)."""
    X, y = make_classification(n_rows, n_features, n_informative=3, n_redundant=0,
                               n_classes=3, class_sep=2.0, random_state=seed)
    X[:, 1] = X[:, 1] * 100.0 + 50.0
    X[::23, 2] = np.nan
    first = np.flatnonzero(y != 2)[: n_rows // (2 * n_sites)]
    rest = np.setdiff1d(np.arange(n_rows), first)
    return [(X[first], y[first])] + [(X[idx], y[idx])
                                     for idx in np.array_split(rest, n_sites - 1)]


def ingest_site(tmp: Path, name: str, X: np.ndarray, y: np.ndarray, *extra: str) -> str:
    """What a site does on its own machine: ``fedpipe ingest its.npz its-store.zarr``."""
    source, store = tmp / f"{name}.npz", tmp / f"{name}.zarr"
    np.savez(source, X=X, y=y)
    argv = ["ingest", str(source), str(store), "--chunk-rows", "64", "--impute", "mean",
            "--quiet", *extra]
    assert main(argv) == 0
    return str(store)
