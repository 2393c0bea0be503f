"""FedBuff's arithmetic: staleness weights, buffer weighting, drops, dispatch, simulated speeds."""

from __future__ import annotations

import numpy as np
import pytest
from fedpipe.tasks import aggregate, fedbuff


def test_staleness_weight_is_one_when_fresh_and_decreases_polynomially():
    assert fedbuff.staleness_weight(0, 0.5) == 1.0
    weights = [fedbuff.staleness_weight(s, 0.5) for s in range(10)]
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))
    assert fedbuff.staleness_weight(3, 0.5) == pytest.approx(0.5)  # 1/sqrt(4)
    assert fedbuff.staleness_weight(7, 0.0) == 1.0  # a = 0: no down-weighting
    with pytest.raises(ValueError, match="staleness"):
        fedbuff.staleness_weight(-1, 0.5)


def test_max_staleness_drops_only_beyond_the_bound():
    assert not fedbuff.too_stale(3, 3)
    assert fedbuff.too_stale(4, 3)
    assert not fedbuff.too_stale(10**6, None)
    assert fedbuff.too_stale(1, 0)  # S = 0: only updates from the current version count


def test_buffer_sum_has_a_fixed_denominator():
    """Weighted deltas, unweighted rows: sum(w_i n_i d_i) / sum(n_i) through the usual chain."""
    rng = np.random.default_rng(0)
    chain = aggregate.default_chain()
    states = aggregate.init_states(chain, 4)
    deltas, rows, stale = rng.normal(size=(3, 4)), [5.0, 7.0, 2.0], [0, 2, 5]
    packets = []
    for d, n, s in zip(deltas, rows, stale, strict=True):
        packet, _ = aggregate.client_side(chain, states, {"delta": d, "n": np.asarray(n)})
        packets.append(fedbuff.weigh(packet, fedbuff.staleness_weight(s, 0.5)))
    total, _, _ = aggregate.server_side(chain, states, aggregate.add_packets(*packets))
    w = (1.0 + np.asarray(stale)) ** -0.5
    expected = (w[:, None] * np.asarray(rows)[:, None] * deltas).sum(0) / sum(rows)
    np.testing.assert_allclose(total["delta"], expected, rtol=1e-12)


def test_weigh_keeps_a_clipped_update_clipped_and_scales_gathered_rows():
    packet = {"delta": np.ones(3), "n": np.asarray(4.0), "clip/clipped": np.asarray(1.0)}
    out = fedbuff.weigh(packet, 0.25)
    np.testing.assert_array_equal(out["delta"], np.full(3, 0.25))
    assert out["n"] == 4.0 and out["clip/clipped"] == 1.0
    gathered = fedbuff.weigh({f"{aggregate.GATHER}delta": np.ones((1, 3))}, 0.5)
    np.testing.assert_array_equal(gathered[f"{aggregate.GATHER}delta"], np.full((1, 3), 0.5))
    assert fedbuff.weigh(packet, 1.0) is packet


def test_pick_client_is_a_function_of_seed_and_dispatch_over_idle_clients():
    idle = [str(i) for i in range(20)]
    picks = [fedbuff.pick_client(idle, 3, d) for d in range(200)]
    assert picks == [fedbuff.pick_client(idle, 3, d) for d in range(200)]
    assert picks != [fedbuff.pick_client(idle, 4, d) for d in range(200)]
    assert set(picks) == set(idle)  # uniform enough to reach every client
    assert fedbuff.pick_client(["7"], 0, 5) == "7"
    with pytest.raises(ValueError, match="idle"):
        fedbuff.pick_client([], 0, 0)


def test_two_tier_speeds_slow_the_given_share_by_the_factor():
    rows = {str(i): 10 for i in range(50)}
    times = fedbuff.durations(fedbuff.two_tier(0.2, 10), rows, seed=1)
    assert sorted(times.values()) == [1.0] * 40 + [10.0] * 10
    assert times == fedbuff.durations(fedbuff.two_tier(0.2, 10), rows, seed=1)
    assert times != fedbuff.durations(fedbuff.two_tier(0.2, 10), rows, seed=2)
    uneven = fedbuff.durations(fedbuff.constant(), {"a": 10, "b": 30}, seed=0)
    assert uneven == {"a": 0.5, "b": 1.5}  # work grows with a client's rows


def test_parse_speeds_and_mode_settings_refuse_bad_values():
    assert fedbuff.parse_speeds("two-tier:0.2,10") == fedbuff.two_tier(0.2, 10)
    assert fedbuff.parse_speeds("constant") == fedbuff.constant()
    assert fedbuff.two_tier(0.2, 10).spec == "two-tier:0.2,10"
    for bad in ("two-tier:0.2", "two-tier:1.5,10", "two-tier:0.2,0.5", "gamma:2", "constant:1"):
        with pytest.raises(ValueError):
            fedbuff.parse_speeds(bad)
    for kwargs, flag in (({"buffer_size": 0}, "--buffer-size"),
                         ({"max_concurrency": 0}, "--max-concurrency"),
                         ({"staleness_exponent": -1}, "--staleness-exponent"),
                         ({"max_staleness": -1}, "--max-staleness"),
                         ({"clock": "cpu"}, "--clock"),
                         ({"clock": "wall", "speeds": fedbuff.two_tier(0.2, 10)},
                          "--client-speeds")):
        with pytest.raises(ValueError, match=flag):
            fedbuff.buffered(**kwargs)


def test_staleness_summary_and_sync_round_time():
    out = fedbuff.staleness_summary([0, 2, 2, 5])
    assert out == {"mean": 2.25, "max": 5, "hist": {"0": 1, "2": 2, "5": 1}}
    assert fedbuff.staleness_summary([])["mean"] is None
    assert fedbuff.sync_round_time({"a": 1.0, "b": 10.0, "c": 2.0}, ["a", "c"]) == 2.0
