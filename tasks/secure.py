"""Secure aggregation as a stage of the chain, and the protocol steps of clients and server.

:func:`secure_sum` is the innermost stage of an aggregation chain: its client part encodes a
client's packet in fixed point (``Z_{2^k}``), its server part decodes the sum. Between the two,
the round runs the masking protocol (:mod:`fedpipe.engine.fed_secagg`) with the steps below, so
that what the server and the reduction tree see of a client is a uniformly random vector::

    advertise keys -> share keys (encrypted, via the server) -> masked upload -> sum
        -> survivors reveal shares -> server removes the masks -> decode

Each step is a pure function of its inputs; :mod:`fedpipe.tasks.secagg` holds the primitives.

References
----------
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017 (Figure 4, the semi-honest protocol). Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020 (the sparse mask graph).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from . import aggregate, secagg
from .secagg import Encoding, RoundKeys

Packet = dict[str, np.ndarray]
UNMASKED = "secagg:unmasked"  # set by recover(): the stage refuses to decode a masked sum


class TooFewSurvivors(ValueError):
    """Fewer than the threshold of clients are left: the round aborts, nothing is unmasked."""


class SecAgg(NamedTuple):
    """The settings of a :func:`secure_sum` stage (what ``config.toml`` records)."""

    clients: int
    bound: float
    bits: int
    threshold: float
    graph: str
    dropout: float
    dropout_phase: str
    encoding: Encoding


def secure_sum(clients: int, *, bound: float = 1e4, bits: int = 32, scale: float | None = None,
               threshold: float = 0.5, graph: str = "full", dropout: float = 0.0,
               dropout_phase: str = "mixed", name: str = "secure_sum") -> aggregate.Stage:
    """Secure aggregation: the server learns only the sum of the clients' packets.

    Put it last in the chain (innermost around the sum): stages before it (clipping) run on
    the plain update, stages after it on the server (noise) see only the unmasked sum.

    Parameters
    ----------
    clients : int
        Most clients summed in a round; with ``bound`` and ``bits`` it fixes the encoding so
        the sum cannot wrap (checked here, before round 0).
    bound : float
        Largest ``|value|`` of any packet entry (after weighting by rows); a client past it is
        rejected. The default fits clients of up to ~1,000 rows with updates up to ~10.
    bits : int
        ``k`` of ``Z_{2^k}`` (32: masked uint32 vectors, half a float64 update).
    scale : float, optional
        Fixed-point scale; default the largest power of two that cannot wrap.
    threshold : float
        Shamir threshold ``t``: a count (>= 1) or, below 1, a fraction of each share group
        (all clients, or a client and its neighbours with ``graph="sparse"``).
    graph : {"full", "sparse"}
        Pairwise masks between all clients, or SecAgg+'s ring of degree ~2 log2 n.
    dropout, dropout_phase
        Simulation only: the share of each round's clients made to drop out, and when
        (``"upload"``: before sending the masked update, ``"unmask"``: after it, ``"mixed"``).

    Raises
    ------
    ValueError
        A setting out of range, or an encoding whose sum could wrap.

    References
    ----------
    Bonawitz et al., CCS 2017; Bell et al., CCS 2020.
    """
    if graph not in ("full", "sparse"):
        raise ValueError(f"graph must be 'full' or 'sparse', got {graph!r}")
    if not (threshold >= 1 and float(threshold).is_integer() or 0 < threshold < 1):
        raise ValueError(f"threshold must be a count >= 1 or a fraction in (0, 1), got {threshold}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout_phase not in ("upload", "unmask", "mixed"):
        raise ValueError(f"dropout_phase must be upload, unmask or mixed, got {dropout_phase!r}")
    enc = secagg.encoding(int(clients), float(bound), int(bits), scale)
    config = SecAgg(int(clients), float(bound), int(bits), float(threshold), graph,
                    float(dropout), dropout_phase, enc)

    def init(n_params: int) -> dict:
        return {}

    def before_sum(packet: Packet, state: dict) -> Packet:
        # Entries that stay on the client's worker (aggregate.LOCAL) are never masked or sent.
        stays = {k: v for k, v in packet.items() if k.startswith(aggregate.LOCAL)}
        try:
            return {**{_wire_name(k, v): secagg.encode(v, enc).reshape(-1)
                       for k, v in packet.items() if k not in stays}, **stays}
        except ValueError as exc:
            raise aggregate.RejectedUpdate(f"{exc} (raise the secure_sum bound or clip)") from None

    def after_sum(total: Packet, state: dict):
        if UNMASKED not in total:
            raise ValueError(f"{name}: the sum is still masked (run it in a secure round)")
        out = {_plain_name(k): _restore(k, secagg.decode(v, enc))
               for k, v in total.items() if k != UNMASKED}
        return out, state, {"precision": 1.0 / enc.scale, "bits": float(enc.bits)}

    before_sum.secagg = config  # the stage remembers how it was built (find() reads it)
    return aggregate.Stage(name, init, before_sum, after_sum)


def find(stages: Sequence[aggregate.Stage]) -> SecAgg | None:
    """The settings of the chain's secure stage, or None; refuses a chain it cannot run in."""
    found = [i for i, s in enumerate(stages) if hasattr(s.before_sum, "secagg")]
    if not found:
        return None
    if found != [len(stages) - 1]:
        raise ValueError("secure_sum must be the last stage of the chain, and only one: "
                         "stages after it would see masked integers")
    return stages[found[0]].before_sum.secagg


def _wire_name(key: str, value: np.ndarray) -> str:
    return f"secagg{np.ndim(value)}/{key}"  # the dimension rides in the name: scalars stay 0-d


def _plain_name(key: str) -> str:
    return key.split("/", 1)[1]


def _restore(key: str, value: np.ndarray) -> np.ndarray:
    return value.reshape(()) if key.startswith("secagg0/") else value


def threshold_for(config: SecAgg, group: int) -> int:
    """Shamir threshold for a share group of ``group`` clients (itself and its neighbours)."""
    if config.threshold >= 1:
        return int(config.threshold)
    return max(1, math.ceil(config.threshold * group))


def dropout_plan(clients: Sequence[str], round_: int, seed: int, rate: float,
                 phase: str) -> dict[str, str]:
    """Simulated dropouts of a round: ``round(rate * n)`` clients, when each drops out.

    The choice is drawn from ``(seed, round)``, so a resumed run drops the same clients.
    """
    count = int(round(rate * len(clients)))
    if count == 0:
        return {}
    rng = np.random.default_rng([int(seed), int(round_), 0x5EC])
    chosen = [sorted(clients)[i] for i in rng.permutation(len(clients))[:count]]
    phases = [phase] * count if phase != "mixed" else [("upload", "unmask")[i % 2]
                                                        for i in range(count)]
    return dict(zip(chosen, phases, strict=True))


# --------------------------------------------------------------------------------------------
# client steps


def share_keys(me: str, keys: RoundKeys, holders: Sequence[str], index: Mapping[str, int],
               c_publics: Mapping[str, bytes], t: int, ctx: bytes,
               entropy: bytes) -> tuple[bytes, dict[str, bytes], dict[str, bytes]]:
    """Draw the self-mask seed, Shamir-share it and the mask secret key among ``holders``.

    Returns the seed and the X25519 secrets shared with each holder (both kept by the client;
    :func:`reveal` reuses the latter) and one ciphertext per holder (routed by the server).
    ``entropy`` is 96 fresh bytes, ``index`` gives each client its share's x-coordinate.
    """
    self_seed = entropy[:32]
    xs = [index[h] for h in holders]
    b_shares = secagg.share_secret(self_seed, xs, t, entropy[32:64])
    s_shares = secagg.share_secret(keys.s_secret, xs, t, entropy[64:96])
    out, shared = {}, {}
    exchange = secagg.exchanger(keys.c_secret)
    for h in holders:
        shared[h] = exchange(c_publics[h])
        key = secagg.derive(shared[h], secagg.pair_info(ctx, "enc", me, h))
        out[h] = secagg.seal(key, b_shares[index[h]] + s_shares[index[h]],
                             secagg.pair_info(ctx, "share", me, h))
    return self_seed, out, shared


def mask_packet(packet: Packet, me: str, keys: RoundKeys, self_seed: bytes,
                peers: Mapping[str, bytes], ctx: bytes, bits: int) -> Packet:
    """The encoded packet plus the client's mask (self mask and pairwise masks with ``peers``)."""
    flat, layout = _flatten(packet)
    mask = secagg.client_mask(me, keys.s_secret, self_seed, peers, ctx, flat.size, bits)
    return _split(_wrap(flat + mask.astype(flat.dtype), bits), layout)


def reveal(me: str, keys: RoundKeys, inbox: Mapping[str, bytes], c_publics: Mapping[str, bytes],
           uploaded: set[str], dropped: set[str], ctx: bytes,
           shared: Mapping[str, bytes] | None = None) -> dict[str, dict[str, bytes]]:
    """Shares a survivor gives back: of ``b_u`` for uploaders, of ``s_u`` for dropped clients.

    Never both for the same client (that would unmask its update): such a request is refused.
    ``shared`` holds the X25519 secrets :func:`share_keys` computed (saves recomputing them).
    """
    if uploaded & dropped:
        raise ValueError(f"server asked for both shares of {sorted(uploaded & dropped)}")
    out: dict[str, dict[str, bytes]] = {"b": {}, "s": {}}
    exchange = None
    for sender, ciphertext in inbox.items():
        if sender not in uploaded and sender not in dropped:
            continue
        dh = (shared or {}).get(sender)
        if dh is None:
            exchange = exchange or secagg.exchanger(keys.c_secret)
            dh = exchange(c_publics[sender])
        key = secagg.derive(dh, secagg.pair_info(ctx, "enc", sender, me))
        plain = secagg.unseal(key, ciphertext, secagg.pair_info(ctx, "share", sender, me))
        if sender in uploaded:
            out["b"][sender] = plain[:secagg.SHARE_BYTES]
        else:
            out["s"][sender] = plain[secagg.SHARE_BYTES:]
    return out


# --------------------------------------------------------------------------------------------
# server step


def recover(total: Packet, reveals: Mapping[str, Mapping[str, Mapping[str, bytes]]],
            index: Mapping[str, int], t: int, uploaded: Sequence[str], dropped: Sequence[str],
            graph: Mapping[str, Sequence[str]], s_publics: Mapping[str, bytes], ctx: bytes,
            bits: int) -> Packet:
    """The sum of the uploaders' encoded packets from their masked sum and the revealed shares.

    Raises
    ------
    TooFewSurvivors
        Some secret has fewer than ``t`` shares: nothing is unmasked.
    """
    by_kind: dict[str, dict[str, dict[int, bytes]]] = {"b": {}, "s": {}}
    for holder, given in reveals.items():
        for kind in ("b", "s"):
            for owner, share in given[kind].items():
                by_kind[kind].setdefault(owner, {})[index[holder]] = share
    short = [u for kind, owners in (("b", uploaded), ("s", dropped)) for u in owners
             if len(by_kind[kind].get(u, {})) < t]
    if short:
        raise TooFewSurvivors(f"{len(reveals)} client(s) answered the unmasking, fewer than the "
                              f"threshold {t} for {len(short)} secret(s): nothing is unmasked")
    seeds = {u: secagg.reconstruct(by_kind["b"][u], t) for u in uploaded}
    secrets = {u: secagg.reconstruct(by_kind["s"][u], t) for u in dropped}
    for u, secret in secrets.items():  # a wrong share would remove the wrong mask: check it
        if secagg.public_key(secret) != s_publics[u]:
            raise ValueError(f"reconstructed mask key of client {u} does not match its public key")
    live = set(uploaded)
    flat, layout = _flatten(total)
    flat = secagg.server_unmask(flat, seeds, secrets,
                                {u: [v for v in graph[u] if v in live] for u in dropped},
                                s_publics, ctx, bits)
    return {**_split(flat, layout), UNMASKED: np.asarray(1.0)}


def _flatten(packet: Packet) -> tuple[np.ndarray, list[tuple[str, int]]]:
    keys = sorted(packet)
    layout = [(k, int(np.size(packet[k]))) for k in keys]
    return np.concatenate([np.asarray(packet[k]).reshape(-1) for k in keys]), layout


def _split(flat: np.ndarray, layout: list[tuple[str, int]]) -> Packet:
    out, start = {}, 0
    for key, size in layout:
        out[key] = flat[start:start + size]
        start += size
    return out


def _wrap(x: np.ndarray, bits: int) -> np.ndarray:
    return x if bits in (32, 64) else x & x.dtype.type(2**bits - 1)


# --------------------------------------------------------------------------------------------
# serial reference: the whole protocol in one process (tests and benchmarks)


def simulate(packets: Mapping[str, Packet], config: SecAgg, *, run: str = "sim", round_: int = 0,
             drop_upload: Sequence[str] = (), drop_unmask: Sequence[str] = (),
             entropy: Mapping[str, bytes] | None = None) -> tuple[Packet, dict[str, Packet]]:
    """Run one round of the protocol serially on already *encoded* packets.

    Returns the recovered sum of the uploaders' packets and what the server saw of each
    uploader (its masked packet). ``entropy`` (client -> 160 bytes) makes it deterministic;
    default fresh OS randomness.

    Raises
    ------
    TooFewSurvivors
        Fewer than the threshold of clients are left for some secret.
    """
    import os

    clients = sorted(packets)
    rand = entropy or {c: os.urandom(160) for c in clients}
    ctx = secagg.context(run, round_)
    keys = {c: secagg.round_keys(rand[c][:64]) for c in clients}
    graph = secagg.mask_graph(clients, config.graph, ctx)
    index = {c: i + 1 for i, c in enumerate(clients)}
    t = threshold_for(config, len(next(iter(graph.values()), [])) + 1)
    c_pub = {c: k.c_public for c, k in keys.items()}
    s_pub = {c: k.s_public for c, k in keys.items()}
    inbox: dict[str, dict[str, bytes]] = {c: {} for c in clients}
    seeds = {}
    for c in clients:
        seeds[c], sealed, _ = share_keys(c, keys[c], [c, *graph[c]], index, c_pub, t, ctx,
                                      rand[c][64:160])
        for holder, ciphertext in sealed.items():
            inbox[holder][c] = ciphertext
    uploaded = [c for c in clients if c not in set(drop_upload)]
    masked = {c: mask_packet(packets[c], c, keys[c], seeds[c],
                             {v: s_pub[v] for v in graph[c]}, ctx, config.bits)
              for c in uploaded}
    if len(uploaded) < t:
        raise TooFewSurvivors(f"{len(uploaded)} uploads, fewer than the threshold {t}")
    total = aggregate.add_packets(*masked.values())
    dropped = [c for c in clients if c not in set(uploaded)]
    reveals = {v: reveal(v, keys[v], inbox[v], c_pub, set(uploaded), set(dropped), ctx)
               for v in uploaded if v not in set(drop_unmask)}
    return recover(total, reveals, index, t, uploaded, dropped, graph, s_pub, ctx,
                   config.bits), masked
