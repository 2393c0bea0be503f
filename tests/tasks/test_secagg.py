"""Secure aggregation math: exact sums after dropouts, abort below t, uniform masks, no reuse."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from fedpipe.tasks import aggregate, secagg, secure

N = 9


def _config(**kw) -> secure.SecAgg:
    stage = secure.secure_sum(kw.pop("clients", N), **kw)
    return secure.find([stage])


def _packets(n: int, size: int = 50, seed: int = 0, bits: int = 32) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if bits <= 32 else np.uint64
    return {f"{i:02d}": {"secagg1/delta": rng.integers(0, 2**bits, size, dtype=np.uint64).astype(dtype),
                         "secagg0/n": rng.integers(0, 2**bits, 1, dtype=np.uint64).astype(dtype)}
            for i in range(n)}


def _plain_sum(packets: dict, clients, bits: int) -> dict:
    return {k: sum(packets[c][k].astype(object) for c in clients) % 2**bits
            for k in next(iter(packets.values()))}


@pytest.mark.parametrize("graph", ["full", "sparse"])
@pytest.mark.parametrize("phase", ["upload", "unmask"])
@pytest.mark.parametrize("dropped", [0, 1, N // 3])
def test_sum_of_survivors_is_exact_mod_2k(graph, phase, dropped):
    packets = _packets(N)
    clients = sorted(packets)
    gone = clients[1:1 + dropped]
    config = _config(graph=graph, threshold=0.5)
    kw = {"drop_upload": gone} if phase == "upload" else {"drop_unmask": gone}
    total, masked = secure.simulate(packets, config, **kw)
    uploaded = [c for c in clients if phase == "unmask" or c not in gone]
    assert sorted(masked) == uploaded
    expected = _plain_sum(packets, uploaded, 32)
    for key, value in expected.items():  # integer equality mod 2^32
        assert value.astype(np.uint64).tolist() == total[key].astype(np.uint64).tolist()
    assert secure.UNMASKED in total


def test_sparse_graph_with_many_clients_and_64_bits():
    packets = _packets(40, size=8, seed=3, bits=64)
    clients = sorted(packets)
    config = _config(clients=40, graph="sparse", bits=64, threshold=0.5)
    graph = secagg.mask_graph(clients, "sparse", b"seed")
    degrees = {len(v) for v in graph.values()}
    assert degrees == {secagg.sparse_degree(40)} and secagg.sparse_degree(40) < 39
    assert all(c in graph[d] for c in clients for d in graph[c])  # symmetric
    total, _ = secure.simulate(packets, config, drop_upload=clients[::7])
    uploaded = [c for c in clients if c not in clients[::7]]
    expected = _plain_sum(packets, uploaded, 64)
    assert expected["secagg1/delta"].tolist() == total["secagg1/delta"].tolist()


def test_fewer_than_threshold_survivors_abort():
    packets = _packets(N)
    clients = sorted(packets)
    config = _config(threshold=6)
    with pytest.raises(secure.TooFewSurvivors, match="threshold 6"):
        secure.simulate(packets, config, drop_unmask=clients[:4])  # 5 answer, 6 needed
    with pytest.raises(secure.TooFewSurvivors):
        secure.simulate(packets, config, drop_upload=clients[:4])


def test_masked_update_passes_a_uniformity_test():
    # A constant (all-zero) update: whatever the server sees of it is the mask alone.
    packets = {f"{i}": {"secagg1/delta": np.zeros(20_000, np.uint32)} for i in range(4)}
    _, masked = secure.simulate(packets, _config(clients=4))
    counts = np.bincount(masked["0"]["secagg1/delta"].view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 330.5  # the 0.999 quantile of chi-square with 255 degrees of freedom
    zeros = np.bincount(np.zeros(80_000, np.uint8), minlength=256)  # the test can fail
    assert float(((zeros - expected) ** 2 / expected).sum()) > 330.5


def test_masks_differ_across_rounds_and_runs():
    packets = {f"{i}": {"secagg1/delta": np.zeros(64, np.uint32)} for i in range(3)}
    entropy = {c: bytes(range(160)) for c in packets}  # even the same client randomness...
    seen = [secure.simulate(packets, _config(clients=3), run=run, round_=r,
                            entropy=entropy)[1]["0"]["secagg1/delta"].tobytes()
            for run, r in (("a", 0), ("a", 1), ("b", 0))]
    assert len(set(seen)) == 3  # ...gives other pairwise masks: keys are bound to run+round
    fresh = [secure.simulate(packets, _config(clients=3))[1]["0"]["secagg1/delta"].tobytes()
             for _ in range(2)]
    assert fresh[0] != fresh[1]


def test_encoding_refuses_a_sum_that_could_wrap():
    with pytest.raises(ValueError, match="wrap"):
        secagg.encoding(clients=1000, bound=1e4, bits=32, scale=2**10)
    with pytest.raises(ValueError, match="do not fit"):
        secure.secure_sum(clients=10**6, bound=1e4, bits=32)
    enc = secagg.encoding(clients=100, bound=10.0, bits=32)
    worst = np.full(7, enc.bound)
    total = sum(secagg.encode(worst, enc).astype(np.uint64) for _ in range(100))
    np.testing.assert_allclose(secagg.decode(total, enc), 100 * worst)
    np.testing.assert_allclose(secagg.decode(total * 0 - sum(
        secagg.encode(worst, enc).astype(np.uint64) for _ in range(100)), enc), -100 * worst)


def test_encode_decode_roundtrip_within_half_a_step():
    enc = secagg.encoding(clients=8, bound=5.0, bits=32)
    x = np.random.default_rng(1).uniform(-5, 5, (8, 100))
    total = sum(secagg.encode(row, enc) for row in x)  # uint32 wrap-around arithmetic
    err = np.abs(secagg.decode(total, enc) - x.sum(0)).max()
    assert err <= 8 * 0.5 / enc.scale
    with pytest.raises(ValueError, match="outside"):
        secagg.encode(np.array([5.5]), enc)


def test_shamir_any_t_shares_reconstruct_fewer_do_not():
    secret = bytes(range(32))
    shares = secagg.share_secret(secret, [1, 2, 3, 4, 5], 3, b"e" * 32)
    assert secagg.reconstruct({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    assert secagg.reconstruct({x: shares[x] for x in (1, 3, 5)}, 3) == secret
    with pytest.raises(ValueError, match="fewer"):
        secagg.reconstruct({x: shares[x] for x in (1, 2)}, 3)
    wrong = {x: shares[x] for x in (1, 2, 3)}
    wrong[1] = (int.from_bytes(wrong[1], "big") ^ 1).to_bytes(33, "big")
    assert secagg.reconstruct(wrong, 3) != secret


def test_shares_are_authenticated():
    keys = secagg.round_keys(bytes(range(64)))
    key = secagg.agree(keys.c_secret, keys.c_public, b"info")
    sealed = secagg.seal(key, b"share", b"aad")
    assert secagg.unseal(key, sealed, b"aad") == b"share"
    with pytest.raises(InvalidTag):
        secagg.unseal(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad")


def test_a_client_never_reveals_both_shares_of_one_client():
    keys = secagg.round_keys(bytes(64))
    with pytest.raises(ValueError, match="both"):
        secure.reveal("a", keys, {}, {}, {"b"}, {"b"}, b"ctx")


def test_stage_round_trip_and_refuses_a_masked_sum():
    stage = secure.secure_sum(clients=3, bound=100.0)
    packets = [{"delta": np.array([1.5, -2.25]), "n": np.asarray(3.0)} for _ in range(3)]
    encoded = [stage.before_sum(p, {}) for p in packets]
    total = aggregate.add_packets(*encoded)
    with pytest.raises(ValueError, match="still masked"):
        stage.after_sum(total, {})
    out, _, measured = stage.after_sum({**total, secure.UNMASKED: np.asarray(1.0)}, {})
    np.testing.assert_allclose(out["delta"], [4.5, -6.75])
    assert out["n"].shape == () and float(out["n"]) == 9.0
    assert measured["precision"] > 0
    with pytest.raises(aggregate.RejectedUpdate, match="outside"):
        stage.before_sum({"delta": np.array([1e3])}, {})


def test_secure_stage_must_be_last():
    chain = (secure.secure_sum(clients=3), aggregate.weighted_mean())
    with pytest.raises(ValueError, match="last stage"):
        secure.find(chain)
    assert secure.find(aggregate.default_chain()) is None


def test_dropout_plan_is_deterministic_and_sized():
    clients = [str(i) for i in range(30)]
    plan = secure.dropout_plan(clients, 3, 7, 1 / 3, "mixed")
    assert len(plan) == 10 and set(plan.values()) == {"upload", "unmask"}
    assert plan == secure.dropout_plan(clients, 3, 7, 1 / 3, "mixed")
    assert plan != secure.dropout_plan(clients, 4, 7, 1 / 3, "mixed")


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_prg_is_the_chacha20_keystream_reduced_mod_2k(bits):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(32))
    dtype = np.uint32 if bits <= 32 else np.uint64
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    expected = np.frombuffer(stream.update(bytes(1000 * np.dtype(dtype).itemsize)), dtype)
    got = secagg.prg(seed, 1000, bits)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected & dtype(2**bits - 1) if bits < 32 else expected)


def test_lagrange_weights_shared_across_secrets_reconstruct_each():
    rng = np.random.default_rng(3)
    secrets = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(3)]
    shares = [secagg.share_secret(s, [1, 2, 3, 4], 3, bytes(32 + i)) for i, s in enumerate(secrets)]
    # same holders (so the same cached weights) for every secret, then another holder set
    assert [secagg.reconstruct({x: sh[x] for x in (1, 2, 4)}, 3) for sh in shares] == secrets
    assert [secagg.reconstruct({x: sh[x] for x in (2, 3, 4)}, 3) for sh in shares] == secrets


def test_one_exchanger_agrees_with_each_peer_like_exchange():
    me, a, b = (secagg.round_keys(bytes([i]) * 64) for i in (1, 2, 3))
    agree = secagg.exchanger(me.c_secret)
    for peer in (a, b):
        assert agree(peer.c_public) == secagg.exchange(peer.c_secret, me.c_public)
