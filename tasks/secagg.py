"""Secure aggregation, the protocol's math: the server learns the sum of the updates only.

Pure functions with explicit inputs (randomness comes in as ``entropy`` bytes, drawn by the
caller from the operating system), run by a client's worker or by the server:

* fixed-point encoding of floats into ``Z_{2^k}`` and back (:func:`encoding`, :func:`encode`,
  :func:`decode`), with the check that a sum of ``n`` encodings cannot wrap;
* per-round X25519 key pairs (:func:`round_keys`), key agreement expanded by HKDF-SHA256
  (:func:`agree`) and ChaCha20 as the mask generator (:func:`prg`);
* Shamir ``t``-of-``n`` secret sharing over the prime field ``GF(2^256 + 297)``
  (:func:`share_secret`, :func:`reconstruct`) and authenticated encryption of the shares
  routed through the server (:func:`seal`, :func:`unseal`);
* the mask graph, complete or SecAgg+'s sparse ring (:func:`mask_graph`), the client's mask
  (:func:`client_mask`) and what the server removes after dropouts (:func:`server_unmask`).

Masks are full 256-bit-keyed ChaCha20 streams, never a seed folded to 32 bits.

References
----------
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017. Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PRIME = 2**256 + 297  # the smallest prime above 2^256: any 32-byte secret is a field element
SHARE_BYTES = 33
_ZERO_NONCE = bytes(16)  # every ChaCha20 / AEAD key below is derived for one use only


# --------------------------------------------------------------------------------------------
# fixed-point encoding in Z_{2^k}


class Encoding(NamedTuple):
    """Fixed point in ``Z_{2^bits}``: ``x -> round(x * scale) mod 2^bits`` for ``|x| <= bound``."""

    bits: int
    scale: float
    bound: float
    clients: int

    @property
    def dtype(self) -> type:
        return np.uint32 if self.bits <= 32 else np.uint64


def encoding(clients: int, bound: float, bits: int = 32, scale: float | None = None) -> Encoding:
    """The encoding for sums of up to ``clients`` vectors with entries in ``[-bound, bound]``.

    ``scale`` defaults to the largest power of two for which such a sum cannot wrap.

    Raises
    ------
    ValueError
        When the sum could wrap (``clients * (bound * scale + 1) >= 2^(bits-1)``) or the
        encoding would be coarser than 1.
    """
    if not 8 <= bits <= 64:
        raise ValueError(f"bits must be between 8 and 64, got {bits}")
    if clients < 1 or not bound > 0:
        raise ValueError(f"need clients >= 1 and bound > 0, got {clients} and {bound}")
    limit = 2 ** (bits - 1) - 1  # the decoded sum is read as a signed number
    if scale is None:
        room = limit / clients - 1
        if room < bound:
            raise ValueError(f"{clients} clients with values up to {bound:g} do not fit "
                             f"{bits} bits even at precision 1: use more bits or a smaller bound")
        scale = 2.0 ** math.floor(math.log2(room / bound))
    if clients * (bound * scale + 1) > limit:
        raise ValueError(f"the sum of {clients} values up to {bound:g} at scale {scale:g} can "
                         f"wrap around 2^{bits}: use more bits, a smaller bound or scale")
    return Encoding(int(bits), float(scale), float(bound), int(clients))


def encode(values: np.ndarray, enc: Encoding) -> np.ndarray:
    """``round(values * scale) mod 2^bits`` as unsigned integers; refuses values past the bound."""
    values = np.asarray(values, dtype=np.float64)
    worst = float(np.max(np.abs(values))) if values.size else 0.0
    if not worst <= enc.bound:  # also catches NaN
        raise ValueError(f"value {worst:.4g} outside the encoding range +-{enc.bound:g}")
    ints = np.rint(values * enc.scale).astype(np.int64)
    return _reduce(ints.astype(np.uint64), enc.bits).astype(enc.dtype)


def decode(total: np.ndarray, enc: Encoding) -> np.ndarray:
    """Floats from a sum of encodings: reduce mod ``2^bits``, read as signed, divide by scale."""
    ints = _reduce(np.asarray(total).astype(np.uint64), enc.bits).astype(np.int64)
    if enc.bits < 64:
        ints = np.where(ints >= 2 ** (enc.bits - 1), ints - 2**enc.bits, ints)
    return ints.astype(np.float64) / enc.scale


def _reduce(x: np.ndarray, bits: int) -> np.ndarray:
    return x if bits == 64 else x & np.uint64(2**bits - 1)


# --------------------------------------------------------------------------------------------
# keys, key agreement, PRG, encryption


class RoundKeys(NamedTuple):
    """A client's key pairs for one round: ``c`` encrypts shares, ``s`` seeds pairwise masks."""

    c_secret: bytes
    c_public: bytes
    s_secret: bytes
    s_public: bytes


def round_keys(entropy: bytes) -> RoundKeys:
    """Two X25519 key pairs from 64 bytes of fresh randomness (new ones every round)."""
    if len(entropy) != 64:
        raise ValueError("round_keys needs 64 bytes of entropy")
    c, s = (X25519PrivateKey.from_private_bytes(entropy[i:i + 32]) for i in (0, 32))
    return RoundKeys(_raw(c), _raw(c.public_key()), _raw(s), _raw(s.public_key()))


def public_key(secret: bytes) -> bytes:
    """The X25519 public key of a 32-byte secret key."""
    return _raw(X25519PrivateKey.from_private_bytes(secret).public_key())


def _raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    return key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def exchange(secret: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret (the same from either side); feed it to :func:`derive`."""
    return exchanger(secret)(peer_public)


def exchanger(secret: bytes) -> Callable[[bytes], bytes]:
    """:func:`exchange` with ``secret`` fixed: loading the private key costs as much as an
    exchange (it derives the public key), so a client agreeing with n peers loads it once."""
    private = X25519PrivateKey.from_private_bytes(secret)
    return lambda peer_public: private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive(shared: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869, zero salt) of a shared secret, bound to ``info``: 32 bytes.

    Written with the standard library's HMAC: the ``cryptography`` HKDF object costs ~70 us a
    call, a third of a round's client-side crypto at 100 clients.
    """
    prk = hmac.digest(bytes(32), shared, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def agree(secret: bytes, peer_public: bytes, info: bytes) -> bytes:
    """32-byte key from X25519(secret, peer_public), bound to ``info`` by HKDF-SHA256."""
    return derive(exchange(secret, peer_public), info)


def prg(seed: bytes, size: int, bits: int) -> np.ndarray:
    """``size`` uniform integers mod ``2^bits`` from the ChaCha20 keystream of a 32-byte seed."""
    dtype = np.uint32 if bits <= 32 else np.uint64
    words = np.zeros(size, dtype)
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    # the keystream XORed into zeros, written in place: no bytes object of the stream's size
    stream.update_into(memoryview(words).cast("B"), memoryview(words).cast("B"))
    if bits not in (32, 64):
        words &= dtype(2**bits - 1)
    return words


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Authenticated encryption (ChaCha20-Poly1305) under a single-use key."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE[:12], plaintext, aad)


def unseal(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises ``cryptography.exceptions.InvalidTag`` if tampered."""
    return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE[:12], ciphertext, aad)


def context(run: str, round_: int) -> bytes:
    """What every derived key of a round is bound to: run and round, so none is reused."""
    return f"fedpipe-secagg/{run}/{int(round_)}".encode()


def pair_info(ctx: bytes, purpose: str, a: str, b: str) -> bytes:
    """HKDF info for a key between clients ``a`` and ``b`` (ordered: directions differ)."""
    return b"/".join([ctx, purpose.encode(), str(a).encode(), str(b).encode()])


# --------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(PRIME)


def share_secret(secret: bytes, xs: Sequence[int], t: int, entropy: bytes) -> dict[int, bytes]:
    """Shares ``f(x)`` of a 32-byte secret for each holder ``x`` (1-based, distinct).

    ``f`` has degree ``t - 1``, ``f(0) = secret`` and coefficients from ``entropy`` (>= 32
    bytes, expanded by ChaCha20), so any ``t`` shares give the secret and fewer give nothing.

    References
    ----------
    Shamir, "How to Share a Secret", CACM 1979.
    """
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} must be between 1 and the {len(xs)} holders")
    if len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError("share holders need distinct x >= 1")
    stream = prg(hashlib.sha256(entropy).digest(), 10 * (t - 1), 32).tobytes()
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(stream[40 * i:40 * i + 40], "big") % PRIME for i in range(t - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner; x is small, so one reduction at the end is cheaper
            y = y * x + c
        shares[int(x)] = (y % PRIME).to_bytes(SHARE_BYTES, "big")
    return shares


def reconstruct(shares: Mapping[int, bytes], t: int) -> bytes:
    """The 32-byte secret from at least ``t`` shares (Lagrange interpolation at 0)."""
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares, fewer than the threshold {t}")
    points = sorted(shares.items())[:t]
    weights = _lagrange_at_zero(tuple(x for x, _ in points))
    secret = sum(int.from_bytes(y, "big") * w for (_, y), w in zip(points, weights,
                                                                    strict=True)) % PRIME
    if secret >= 2**256:
        raise ValueError("shares do not interpolate to a 32-byte secret (corrupt share?)")
    return secret.to_bytes(32, "big")


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    # The weights depend only on the (public) x-coordinates: the server reconstructing every
    # uploader's seed from the same survivors computes them once, not once per secret.
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


# --------------------------------------------------------------------------------------------
# mask graph and masks


def sparse_degree(n: int) -> int:
    """SecAgg+'s neighbour count: even, about ``2 * log2(n)``; ``n - 1`` (complete) when small."""
    k = 2 * math.ceil(math.log2(max(n, 2)))
    return n - 1 if k >= n - 1 else k


def mask_graph(clients: Sequence[str], kind: str, seed: bytes) -> dict[str, list[str]]:
    """Each client's neighbours: every other client (``full``) or a ring of degree
    :func:`sparse_degree` over a public random order (``sparse``, a Harary graph).

    References
    ----------
    Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020.
    """
    clients = sorted(clients)
    n = len(clients)
    if kind == "full" or sparse_degree(n) >= n - 1:
        return {c: [d for d in clients if d != c] for c in clients}
    if kind != "sparse":
        raise ValueError(f"mask graph must be 'full' or 'sparse', got {kind!r}")
    order = [clients[i] for i in np.random.default_rng(list(seed)).permutation(n)]
    half = sparse_degree(n) // 2
    where = {c: i for i, c in enumerate(order)}
    return {c: sorted({order[(where[c] + d) % n] for d in range(-half, half + 1) if d})
            for c in clients}


def pair_seed(secret: bytes, peer_public: bytes, ctx: bytes, a: str, b: str) -> bytes:
    """The pairwise mask seed of clients ``a`` and ``b`` (the same from either side)."""
    return _pair_seed(exchanger(secret), peer_public, ctx, a, b)


def _pair_seed(exchange_: Callable[[bytes], bytes], peer_public: bytes, ctx: bytes, a: str,
               b: str) -> bytes:
    lo, hi = sorted([str(a), str(b)])
    return derive(exchange_(peer_public), pair_info(ctx, "mask", lo, hi))


def client_mask(me: str, s_secret: bytes, self_seed: bytes, peers: Mapping[str, bytes],
                ctx: bytes, size: int, bits: int) -> np.ndarray:
    """The mask a client adds: ``PRG(b_u) + sum_v (+/-) PRG(s_uv)`` over its live neighbours.

    ``peers`` maps each neighbour still in the round to its mask public key; the pair's mask
    is added by the smaller client id and subtracted by the larger, so they cancel in a sum.
    """
    mask = prg(self_seed, size, bits)
    agree_ = exchanger(s_secret)
    for peer, public in peers.items():
        pm = prg(_pair_seed(agree_, public, ctx, me, peer), size, bits)
        # in place, wrapping mod 2^32 / 2^64
        (np.add if str(me) < str(peer) else np.subtract)(mask, pm, out=mask)
    return mask


def server_unmask(total: np.ndarray, self_seeds: Mapping[str, bytes],
                  dropped_secrets: Mapping[str, bytes], dropped_peers: Mapping[str, Iterable[str]],
                  s_publics: Mapping[str, bytes], ctx: bytes, bits: int) -> np.ndarray:
    """The sum of the uploaded encodings from their masked sum.

    Removes the self mask of every uploader (``self_seeds``: reconstructed ``b_u``), and for
    each client that dropped before uploading (``dropped_secrets``: its reconstructed mask
    secret key) the pairwise masks its uploading neighbours (``dropped_peers``) added for it.
    """
    size = total.size
    out = total.copy()
    for seed in self_seeds.values():
        np.subtract(out, prg(seed, size, bits).astype(out.dtype, copy=False), out=out)
    for u, secret in dropped_secrets.items():
        agree_ = exchanger(secret)
        for v in dropped_peers[u]:
            pm = prg(_pair_seed(agree_, s_publics[v], ctx, u, v), size, bits)
            # undo what v added for u
            (np.subtract if str(v) < str(u) else np.add)(out, pm.astype(out.dtype, copy=False),
                                                         out=out)
    return _reduce(out.astype(np.uint64), bits).astype(out.dtype)
