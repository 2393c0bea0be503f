"""Site statistics under secure aggregation: exact sums, and nothing of one site in the clear.

Real site-local stores on disk (one ``fedpipe ingest`` each), workers that know only their own
store, the real masking protocol (X25519, Shamir, ChaCha20). What the driver receives is
recorded at ``Client._gather``, the one door every result comes through.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fedpipe.cli.main import main
from fedpipe.data import sites as site_tasks
from fedpipe.data import store
from fedpipe.data.stats import compute_stats
from fedpipe.engine import sites
from fedpipe.tasks import secure
from fedpipe.tasks import stats as stats_math
from sites_support import ingest_site, site_rows

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sites-secure")
    parts = site_rows(n_sites=3, n_rows=600, n_features=4, seed=3)
    urls = [ingest_site(tmp, f"site-{i}", X, y) for i, (X, y) in enumerate(parts)]
    pooled = ingest_site(tmp, "pooled", np.concatenate([p[0] for p in parts]),
                         np.concatenate([p[1] for p in parts]))
    return {"sites": urls, "parts": parts, "pooled": pooled, "tmp": tmp}


def _own_stats(url: str) -> stats_math.Stats:
    """A site's statistics as its worker computes them (same chunks, same merge)."""
    info = store.read_info(url, partitions=False)
    return stats_math.merge_many([stats_math.chunk_stats(X) for X, _ in site_tasks._raw_chunks(info)])


def _spy(dc) -> list:
    """Record every result the driver receives (gather, get and Future.result all come here)."""
    received: list = []
    gather = dc._gather

    async def recording(*args, **kwargs):
        out = await gather(*args, **kwargs)
        received.append(out)
        return out

    dc._gather = recording
    return received


def _arrays(obj, kind: str) -> list[np.ndarray]:
    if isinstance(obj, np.ndarray):
        return [obj] if obj.dtype.kind == kind else []
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _arrays(v, kind)]
    if isinstance(obj, list | tuple):
        return [a for v in obj for a in _arrays(v, kind)]
    return []


def _cached_site_stats(dask_worker) -> list:
    from fedpipe.engine import placement

    return [k for k in placement.worker_cache(dask_worker).state if "site-stats" in k]


def _settings(threshold: float = 0.5) -> secure.SecAgg:
    return secure.find([secure.secure_sum(1, threshold=threshold)])


def test_secure_statistics_are_exact_and_the_driver_sees_no_site_in_the_clear(stores):
    own = [_own_stats(u) for u in stores["sites"]]
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    with sites.site_cluster(workers, processes=False) as dc:
        received = _spy(dc)
        plan = sites.prepare_sites(dc, secagg=_settings())
        secret = received[:]
        received.clear()
        plain = sites.prepare_sites(dc)
        left = dc.run(_cached_site_stats)
    assert left and not any(left.values())  # the sites' cached statistics were freed
    # exact: the sum of the sites' own sums rounded once, as math.fsum gives it
    for key in ("sum", "sumsq"):
        want = [math.fsum(s[key][j] for s in own) for j in range(4)]
        np.testing.assert_array_equal(plan.stats[key], want)
    X = np.concatenate([p[0] for p in stores["parts"]])
    np.testing.assert_array_equal(plan.stats["min"], np.nanmin(X, axis=0))  # the search: exact
    np.testing.assert_array_equal(plan.stats["max"], np.nanmax(X, axis=0))
    np.testing.assert_array_equal(plan.stats["count"], plain.stats["count"])
    np.testing.assert_array_equal(plan.stats["missing"], plain.stats["missing"])
    pooled = compute_stats(stores["pooled"])
    for key in ("sum", "sumsq"):
        np.testing.assert_allclose(plan.stats[key], pooled[key], rtol=1e-12)
    for key in ("mean", "var"):
        np.testing.assert_allclose(plan.stats[key], plain.stats[key], rtol=1e-12)
    # the driver: no float of any site's statistics, and integer words that look uniform
    # (masked mod 2^64: a word below 2^36 has probability 2^-28; plain limbs are all below 2^34)
    site_values = np.concatenate([np.r_[s["sum"], s["sumsq"], s["min"], s["max"]] for s in own])
    seen_floats = np.concatenate([a.ravel() for a in _arrays(secret, "f")] or [np.zeros(0)])
    assert not np.isin(site_values, seen_floats).any()
    words = np.concatenate([a.ravel() for a in _arrays(secret, "u")])
    assert words.size > 1000 and np.count_nonzero(words < 2**36) == 0
    # the same probe finds the sites' min and max in a run without secure aggregation
    seen_plain = np.concatenate([a.ravel() for a in _arrays(received, "f")])
    assert np.isin(np.concatenate([s["min"] for s in own]), seen_plain).all()
    assert plan.info.preprocess["computed"] == "federated, secure aggregation"
    assert any("how many sites" in d for d in plan.disclosed)
    assert not any("each site's per-column min" in d for d in plan.disclosed)
    assert any("each site's per-column min" in d for d in plain.disclosed)


def test_median_zoom_is_within_tolerance_of_the_pooled_median_also_in_secure(stores):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    X = np.concatenate([p[0] for p in stores["parts"]])
    X[0, 3] = 1e6  # one far outlier: a single pass's bins are 1e3 wide
    parts = np.array_split(X, 3)
    urls = [ingest_site(stores["tmp"], f"zoom-{i}", P, np.zeros(len(P), dtype=int))
            for i, P in enumerate(parts)]
    workers = [([str(i)], url) for i, url in enumerate(urls)]
    truth = np.nanmedian(X, axis=0)
    spread = np.nanmax(X, axis=0) - np.nanmin(X, axis=0)
    with sites.site_cluster(workers, processes=False) as dc:
        clients = sites.site_clients(dc)
        coarse = sites.federated_stats(dc, clients, median=True, median_passes=0)
        fine = sites.federated_stats(dc, clients, median=True, median_passes=2)
        safe = sites.federated_stats(dc, clients, median=True, median_passes=1,
                                     secagg=_settings())
    # the audit: one histogram is within one bin; each zoom pass 1024 times closer
    assert np.all(np.abs(coarse["median"] - truth) <= spread / 1024)
    assert np.abs(coarse["median"][3] - truth[3]) > 1e-3  # the outlier made the bins coarse
    assert np.all(np.abs(fine["median"] - truth) <= spread / 1024**3)
    assert np.all(np.abs(safe["median"] - truth) <= spread / 1024**2)


def test_federate_sites_with_secure_aggregation_says_what_was_disclosed(stores, capsys):
    workers = [([str(i)], url) for i, url in enumerate(stores["sites"])]
    out = stores["tmp"] / "secure-run"
    with sites.site_cluster(workers, processes=False) as dc:
        code = main(["federate", "--sites", "--scheduler", dc.scheduler.address, "--model",
                     "softmax", "--rounds", "2", "--secure-aggregation", "--out", str(out),
                     "--json", "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "summary.json").read_text())
    assert summary["disclosed"] == saved["disclosed"]
    assert any("how many sites" in d for d in saved["disclosed"])
    assert saved["preprocess"]["computed"] == "federated, secure aggregation"
    assert saved["secagg"]["rounds_aborted"] == 0
