"""DP stages, robust rules, compression and the attack harness: pure NumPy, no cluster."""

import numpy as np
import pytest
from fedpipe.tasks import aggregate, aggregators, attacks, compress, privacy, robust
from fedpipe.tasks.aggregate import (
    add_packets,
    check_chain,
    client_side,
    init_states,
    server_side,
    split_local,
    validate,
    wire_bytes,
)
from fedpipe.tasks.privacy import CLIENT_ID
from scipy import stats


def _packet(delta, n=1.0, client=0):
    return {"delta": np.asarray(delta, dtype=float), "n": np.asarray(float(n)),
            CLIENT_ID: np.asarray(client, dtype=np.uint64)}


def _run(chain, deltas, ns=None, states=None):
    states = states or init_states(chain, len(deltas[0]))
    sent = []
    for i, d in enumerate(deltas):
        packet, reason = client_side(chain, states, _packet(d, (ns or [1] * len(deltas))[i], i))
        assert reason is None, reason
        sent.append(split_local(packet)[0])
    return server_side(chain, states, add_packets(*sent))


# ---------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.filterwarnings("ignore:overflow")
def test_every_clipped_contribution_has_norm_at_most_s(seed):
    rng = np.random.default_rng(seed)
    bound = float(rng.uniform(0.01, 10))
    chain = (validate(), privacy.clip(bound), privacy.dp_mean(5, cap=50.0))
    states = init_states(chain, 7)
    for scale in (1e-3, 1.0, 1e3, 1e300):
        delta = rng.normal(size=7) * scale
        n = float(rng.integers(1, 200))
        packet, _ = client_side(chain, states, _packet(delta, n))
        assert np.linalg.norm(packet["delta"]) <= bound * (1 + 1e-12)
        unit = delta / np.max(np.abs(delta))  # direction, without overflowing at 1e300
        longer = np.linalg.norm(unit) * np.max(np.abs(delta)) > bound
        expected = unit * bound / np.linalg.norm(unit) if longer else delta  # same direction
        np.testing.assert_allclose(packet["delta"] / min(n / 50.0, 1.0), expected)


def test_dp_mean_divides_by_the_fixed_denominator_whoever_arrives():
    chain = (validate(), privacy.clip(10.0), privacy.dp_mean(4))
    total, _, found = _run(chain, [[1.0, 0.0], [3.0, 2.0]], ns=[5, 500])
    np.testing.assert_allclose(total["delta"], [1.0, 0.5])  # uniform weights, / 4 not / 2
    assert found["dp_mean/denominator"] == 4.0 and found["clip/clipped"] == 0.0


# ---------------------------------------------------------------------------------- noise


def test_central_noise_variance_within_the_chi_square_99_percent_bound():
    z, s, d, draws = 1.3, 0.7, 10, 200  # 2,000 noise coordinates in all
    stage = privacy.gaussian_noise(z, s, seed=11)
    state = stage.init(d)
    samples = []
    for _ in range(draws):
        out, state, _ = stage.after_sum({"delta": np.zeros(d)}, state)
        samples.append(out["delta"])
    x = np.concatenate(samples)
    k = x.size
    statistic = float(np.sum(x ** 2) / (z * s) ** 2)  # chi-square with k degrees of freedom
    lo, hi = stats.chi2.ppf([0.005, 0.995], k)
    assert lo <= statistic <= hi, (statistic, lo, hi)


def test_noise_is_a_function_of_key_and_round_and_os_entropy_differs():
    a, b = privacy.gaussian_noise(1.0, 1.0, seed=3), privacy.gaussian_noise(1.0, 1.0, seed=3)
    sa, sb = a.init(4), b.init(4)
    np.testing.assert_array_equal(a.after_sum({"delta": np.zeros(4)}, sa)[0]["delta"],
                                  b.after_sum({"delta": np.zeros(4)}, sb)[0]["delta"])
    fresh = [privacy.gaussian_noise(1.0, 1.0).init(4)["key"] for _ in range(2)]
    assert not np.array_equal(*fresh)  # OS entropy: 128-bit keys, never equal in practice
    r0 = privacy.noise_rng(sa["key"], 0).normal(size=3)
    r1 = privacy.noise_rng(sa["key"], 1).normal(size=3)
    assert not np.array_equal(r0, r1)


def test_local_noise_is_added_on_the_client_per_client():
    stage = privacy.gaussian_noise(2.0, 1.0, mode="local", seed=0)
    state = stage.init(3)
    p0 = stage.before_sum(_packet(np.zeros(3), client=1), state)
    p1 = stage.before_sum(_packet(np.zeros(3), client=2), state)
    assert np.all(p0["delta"] != 0) and not np.array_equal(p0["delta"], p1["delta"])
    total, state, _ = stage.after_sum({"delta": np.ones(3)}, state)
    np.testing.assert_array_equal(total["delta"], np.ones(3))  # no second noise on the server
    assert int(state["round"]) == 1


def test_adaptive_clipping_split_and_refusal():
    # Andrew et al.: z = 1, m = 100, sigma_b = m / 20 -> z_delta = 1.00504
    assert privacy.split_noise(1.0, 100 / 20) == pytest.approx(1.00504, abs=1e-5)
    with pytest.raises(ValueError, match="whole budget"):
        privacy.adaptive_clip(2.0, clients_per_round=20)  # sigma_b = 1, z >= 2 sigma_b


def test_adaptive_clip_moves_towards_the_median_norm():
    m = 100
    stage = privacy.adaptive_clip(0.5, m, initial=0.01, quantile=0.5, lr=0.5, seed=1)
    chain = (validate(), privacy.dp_mean(m), stage)
    state = init_states(chain, 2)
    norms = np.linspace(1.0, 3.0, m)  # median norm 2
    for _ in range(60):
        deltas = [[v, 0.0] for v in norms]
        _, state, _ = _run(chain, deltas, states=state)
    assert 1.5 < float(state[stage.name]["clip"]) < 2.5


# ---------------------------------------------------------------------------------- robust


X_BYZFL = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def test_byzfl_published_vectors():
    np.testing.assert_array_equal(robust.coordinate_median(X_BYZFL), [4, 5, 6])
    np.testing.assert_array_equal(robust.trimmed_mean(X_BYZFL, 1), [4, 5, 6])
    np.testing.assert_array_equal(robust.krum(X_BYZFL, 1), [1, 2, 3])
    np.testing.assert_array_equal(robust.multi_krum(X_BYZFL, 1), [2.5, 3.5, 4.5])


@pytest.mark.parametrize("stage", [aggregators.median(), aggregators.trimmed_mean(0.34),
                                   aggregators.krum(0.34), aggregators.multi_krum(0.34)],
                         ids=lambda s: s.name)
def test_gathering_stages_give_the_byzfl_vectors_through_the_chain(stage):
    expected = {"median": [4, 5, 6], "trimmed_mean": [4, 5, 6], "krum": [1, 2, 3],
                "multi_krum": [2.5, 3.5, 4.5]}[stage.name]
    total, _, found = _run((validate(), stage), X_BYZFL.tolist())
    np.testing.assert_array_equal(total["delta"], expected)
    assert found[f"{stage.name}/gathered"] == 3.0


def test_gather_reduction_stacks_in_order_and_sums_the_rest():
    a = {"gather/delta": np.ones((1, 2)), "n": np.asarray(1.0)}
    b = {"gather/delta": np.zeros((1, 2)), "n": np.asarray(2.0)}
    out = add_packets(a, b)
    np.testing.assert_array_equal(out["gather/delta"], [[1, 1], [0, 0]])
    assert float(out["n"]) == 3.0
    with pytest.raises(ValueError, match="one gathering"):
        check_chain((aggregators.median(), aggregators.krum()))


@pytest.mark.filterwarnings("ignore:overflow")
def test_robust_rules_ignore_a_huge_attacker_within_their_bound():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(9, 5))
    x = np.vstack([honest, np.full((1, 5), 1e300)])
    center = honest.mean(axis=0)
    for out in (robust.coordinate_median(x), robust.trimmed_mean(x, 1), robust.krum(x, 1),
                robust.multi_krum(x, 1), robust.centered_clipping(x, np.zeros(5), 1.0, 5)):
        assert np.all(np.isfinite(out)) and np.linalg.norm(out - center) < 3.0


@pytest.mark.parametrize("threads", [2, 3])
def test_median_and_trimmed_mean_by_coordinate_blocks_are_the_same_bits(monkeypatch, threads):
    x = np.random.default_rng(4).normal(size=(51, 1003))  # odd K, d not a multiple of blocks
    whole_median, whole_trimmed = np.median(x, axis=0), robust.trimmed_mean(x, 5)
    monkeypatch.setattr(robust, "PARALLEL_AT", 1)
    monkeypatch.setattr(robust.os, "cpu_count", lambda: threads)
    np.testing.assert_array_equal(robust.coordinate_median(x), whole_median)
    np.testing.assert_array_equal(robust.trimmed_mean(x, 5), whole_trimmed)
    np.testing.assert_allclose(whole_trimmed, np.sort(x, axis=0)[5:46].mean(axis=0))


def test_trimmed_mean_drops_f_at_each_end_per_coordinate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 6))
    expected = np.sort(x, axis=0)[2:-2].mean(axis=0)
    np.testing.assert_allclose(robust.trimmed_mean(x, 2), expected)


# ---------------------------------------------------------------------------------- compression


def test_int8_is_unbiased_and_seven_times_smaller():
    rng = np.random.default_rng(2)
    x = rng.normal(size=1000)
    mean = np.mean([compress.dequantize_int8(*compress.quantize_int8(x, rng))
                    for _ in range(2000)], axis=0)
    scale = np.max(np.abs(x)) / compress.LEVELS
    # each coordinate's rounding error has variance <= scale^2 / 4: 5 sigma over 2,000 draws
    assert np.max(np.abs(mean - x)) < 5 * scale / 2 / np.sqrt(2000)
    packet, _ = client_side((compress.int8(),), {"compress": {"round": np.asarray(0)}},
                            _packet(x))
    assert x.nbytes / wire_bytes({"delta": packet["delta"],
                                  "wire_bytes": packet["wire_bytes"]}) >= 7


def test_topk_sends_one_percent_at_least_fifty_times_fewer_bytes_with_error_feedback():
    rng = np.random.default_rng(3)
    d = 10_000
    stage = compress.topk(0.01)
    state = stage.init(d)
    residual_key = "local/compress/residual"
    local: dict = {}
    total_sent = np.zeros(d)
    deltas = rng.normal(size=(30, d))
    for delta in deltas:
        packet = stage.before_sum({**_packet(delta), **local}, state)
        packet, local = split_local(packet)
        assert d * 8 / float(packet["wire_bytes"]) >= 50
        assert np.count_nonzero(packet["delta"]) == 100
        total_sent += packet["delta"]
    # error feedback: what was sent plus what is kept is everything, up to float32 rounding
    np.testing.assert_allclose(total_sent + local[residual_key], deltas.sum(axis=0), atol=1e-4)


def test_compression_with_a_bound_keeps_the_decoded_update_within_s():
    rng = np.random.default_rng(4)
    for stage in (compress.int8(bound=1.0), compress.topk(0.1, bound=1.0),
                  compress.fp16(bound=1.0)):
        state = stage.init(50)
        for _ in range(5):
            delta = rng.normal(size=50)
            delta /= np.linalg.norm(delta)  # already clipped to 1
            packet = stage.before_sum(_packet(delta), state)
            assert np.linalg.norm(packet["delta"]) <= 1.0 + 1e-12


# ---------------------------------------------------------------------------------- attacks


@pytest.mark.filterwarnings("ignore:overflow")
def test_scaled_update_attacker_no_longer_moves_the_model_past_the_clip_bound():
    rng = np.random.default_rng(5)
    honest = [rng.normal(size=4) * 0.1 for _ in range(9)]
    attacker = np.full(4, 1e300)
    bound, k = 1.0, 10
    chain = (validate(), privacy.clip(bound), privacy.dp_mean(k))
    total, _, _ = _run(chain, [*honest, attacker])
    without, _, _ = _run(chain, [*honest, np.zeros(4)])
    # one client moves the mean by at most S / k, however large its update
    assert np.linalg.norm(total["delta"] - without["delta"]) <= bound / k * (1 + 1e-12)
    unclipped, _, _ = _run((validate(), aggregators.mean()), [*honest, attacker])
    assert np.linalg.norm(unclipped["delta"]) > 1e290  # what happens without the clip


def test_simulated_attack_replaces_the_attackers_rows_only():
    rows = np.arange(12.0).reshape(4, 3)
    bad = np.array([False, True, False, True])
    rng = np.random.default_rng(0)
    out = attacks.attack_rows("scaled", rows, bad, rng)
    np.testing.assert_array_equal(out[~bad], rows[~bad])
    np.testing.assert_array_equal(out[bad], 100 * rows[bad])
    np.testing.assert_array_equal(attacks.attack_rows("sign-flip", rows, bad, rng)[bad], -rows[bad])
    alie = attacks.attack_rows("alie", rows, bad, rng)[bad]
    assert np.all(alie < rows[~bad].mean(axis=0))


def test_simulated_attack_stage_feeds_the_inner_aggregator():
    stage = attacks.simulated_attack(aggregators.median(), "scaled", fraction=1.0)
    total, _, found = _run((validate(), stage), X_BYZFL.tolist())
    np.testing.assert_array_equal(total["delta"], [400, 500, 600])  # every client attacked
    assert found[f"{stage.name}/attackers"] == 3.0
    clean = attacks.simulated_attack(aggregators.mean(), "none", fraction=0.5)
    total, _, _ = _run((validate(), clean), X_BYZFL.tolist(), ns=[1, 1, 2])
    np.testing.assert_allclose(total["delta"], [4.75, 5.75, 6.75])  # the row-weighted mean


@pytest.mark.parametrize("stage", [aggregators.median(), aggregators.trimmed_mean(0.2)],
                         ids=["median", "trimmed-mean"])
def test_a_coordinate_rule_by_column_blocks_is_the_rule_on_the_rows(stage):
    # What the engine does with the rows of 3 workers (one of them with none): column block j
    # of every part, stacked in part order, the rule on it; the joined blocks must be the bits
    # of the rule on the stacked rows.
    rng = np.random.default_rng(4)
    parts = [{aggregators.ROWS: rng.normal(size=(k, 103)), "n": np.asarray(float(k))}
             for k in (7, 0, 12)]
    parts[1] = {"n": np.asarray(0.0)}  # a worker whose clients were all rejected
    rule = aggregators.column_rule((aggregate.validate(), stage))
    results = [aggregators.rule_on_blocks(rule, *(aggregators.column_block(p, j, 3, 103)
                                                   for p in parts)) for j in range(3)]
    slim = aggregate.add_packets(*(aggregators.without_rows(p) for p in parts))
    by_blocks, _, seen = stage.after_sum(aggregators.join_columns(slim, results), {})
    stacked = np.concatenate([parts[0][aggregators.ROWS], parts[2][aggregators.ROWS]])
    whole, _, counted = stage.after_sum({aggregators.ROWS: stacked, "n": slim["n"]}, {})
    np.testing.assert_array_equal(by_blocks["delta"], whole["delta"])
    assert seen == counted == {"gathered": 19.0}
    assert aggregators.column_rule((aggregators.krum(0.2),)) is None  # needs whole rows
