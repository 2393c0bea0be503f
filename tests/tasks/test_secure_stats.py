"""Exact secure sums of site statistics and the secure min/max search, without a cluster."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedpipe.tasks import aggregate, secure, secure_stats

pytest.importorskip("cryptography")


def _values(rng, n):
    # every scale a float64 has: subnormal to near overflow, both signs, and zeros
    exps = rng.integers(-1070, 1000, n).astype(float)
    return np.r_[rng.standard_normal(n) * 2.0**exps, 0.0, -0.0, 5e-324, -1.7e307]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_limb_sums_decode_to_the_correctly_rounded_sum(seed):
    rng = np.random.default_rng(seed)
    sites = [_values(rng, 40) for _ in range(5)]
    total = sum(secure_stats.encode(v) for v in sites)
    want = [math.fsum(v[j] for v in sites) for j in range(len(sites[0]))]
    np.testing.assert_array_equal(secure_stats.decode(total), want)


def test_values_without_an_exact_encoding_are_refused():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="exactly"):
            secure_stats.encode(np.array([bad]))
    with pytest.raises(ValueError, match="no exact"):
        secure_stats.encode(np.array([0.5]), frac=0, limbs=3)  # a count must be whole


def test_order_keys_sort_as_the_floats_do():
    x = np.sort(_values(np.random.default_rng(3), 200)[:-4])  # np.sort may swap -0.0 and 0.0
    x = np.r_[x[x < 0], -0.0, 0.0, 5e-324, x[x > 0]]
    keys = secure_stats.order_key(np.r_[-np.inf, x, np.inf])
    assert np.all(np.diff(keys.astype(object)) > 0)
    np.testing.assert_array_equal(secure_stats.key_value(keys), np.r_[-np.inf, x, np.inf])


def test_the_search_finds_the_exact_min_and_max():
    rng = np.random.default_rng(4)
    site_min = [np.r_[rng.standard_normal(3) * 1e5, np.inf] for _ in range(4)]
    site_max = [np.r_[rng.standard_normal(3) * 1e-5, -np.inf] for _ in range(4)]
    keys = [secure_stats.extreme_keys(lo, hi) for lo, hi in zip(site_min, site_max, strict=True)]
    lo, bits = secure_stats.search_start(len(keys[0]))
    passes = 0
    while bits > 0:
        t = secure_stats.search_thresholds(lo, bits)
        lo, bits = secure_stats.search_step(lo, bits, sum(secure_stats.above(k, t) for k in keys))
        passes += 1
    got_min, got_max = secure_stats.extremes_of(lo)
    assert passes == 8
    np.testing.assert_array_equal(got_min, np.min(site_min, axis=0))  # inf: a column of no values
    np.testing.assert_array_equal(got_max, np.max(site_max, axis=0))


def test_the_exact_stage_through_the_real_protocol_gives_the_fsum_and_masks_every_site():
    config = secure.find([secure.secure_sum(1, threshold=2)])
    stage = secure_stats.exact_sum(config)
    chain = (stage,)
    states = aggregate.init_states(chain, 0)
    rng = np.random.default_rng(5)
    packets = {c: {"sum": rng.standard_normal(3) * 1e3, "count": np.array([7.0, 3.0, 1.0])}
               for c in "abc"}
    encoded = {c: aggregate.client_side(chain, states, p)[0] for c, p in packets.items()}
    total, masked = secure.simulate(encoded, stage.before_sum.secagg, drop_unmask=["c"])
    out, _, _ = aggregate.server_side(chain, states, total)
    want = [math.fsum(p["sum"][j] for p in packets.values()) for j in range(3)]
    np.testing.assert_array_equal(out["sum"], want)
    np.testing.assert_array_equal(out["count"], [21.0, 9.0, 3.0])
    for seen in masked.values():  # what the server saw of each site: no limb in the clear
        words = np.concatenate(list(seen.values()))
        assert np.count_nonzero(words < 2**36) == 0
    with pytest.raises(ValueError, match="still masked"):
        stage.after_sum(aggregate.add_packets(*encoded.values()), {})
