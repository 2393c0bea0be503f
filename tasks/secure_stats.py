"""Site statistics under secure aggregation: exact integer encodings and a min/max search.

Secure aggregation sums vectors of integers mod ``2^64`` (:mod:`fedpipe.tasks.secure`). For the
preprocessing statistics the sum must be *exact*, so each float64 is written as the integer
``x * 2^1074`` (every finite float64 is one) in two's complement over ``32 * limbs`` bits, cut
into 32-bit limbs, one limb per uint64 word: up to ``2^32`` sites' limbs add without wrapping,
and the server recombines the limb sums with Python integers. The decoded sum is the exact sum
of the sites' values rounded once (``math.fsum``'s result), not a tree of float additions.

Min and max cannot be summed. :func:`search_thresholds` / :func:`search_step` find them exactly
by a 256-ary search over the order-preserving integer key of a float64: each pass, every site
says (as a 0/1 vector, securely summed) which of 255 thresholds its max lies at or above; 8
passes pin the 64-bit key. The server learns, per threshold, how many sites lie above it --
never a site's value.

References
----------
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017. FATE, "Federated feature engineering" (statistics from aggregated sums).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import aggregate, secure
from .aggregate import Packet, Stage, StageSpec, StageState

LIMB_BITS = 32
FLOAT_FRAC = 1074  # 2^-1074, the smallest subnormal, is the integer 1
FLOAT_LIMBS = 67  # |x| < 2^1024: 2098 bits, + 32 for 2^32 sites, + sign <= 67 * 32
INT_LIMBS = 3  # counts below 2^63 from up to 2^32 sites, signed
SEARCH_BITS = 8  # 256-ary search: 8 passes pin a 64-bit key
_MASK = (1 << LIMB_BITS) - 1


def encode(values: np.ndarray, frac: int = FLOAT_FRAC, limbs: int = FLOAT_LIMBS) -> np.ndarray:
    """``values * 2^frac`` as exact integers, in limbs: uint64 of shape ``values.shape + (limbs,)``.

    Raises ``ValueError`` for a value that is not finite or not a multiple of ``2^-frac``.
    """
    values = np.asarray(values, dtype=np.float64)
    width = LIMB_BITS * limbs
    room = 2.0 ** min(max(width - LIMB_BITS - 1, 1), 62)  # as below: room for 2^32 sites
    if frac == 0 and np.all(np.abs(values) < room) and np.all(values == np.rint(values)):
        n = values.astype(np.int64)[..., None]  # whole counts: int64 arithmetic is exact
        shift = np.minimum(LIMB_BITS * np.arange(limbs), 63)  # >> sign-extends
        return ((n >> shift) & _MASK).astype(np.uint64)
    out = np.zeros(values.size * limbs, dtype=np.uint64)
    for i, x in enumerate(values.reshape(-1).tolist()):
        if not np.isfinite(x):
            raise ValueError(f"value {x} cannot be encoded exactly")
        p, q = x.as_integer_ratio()  # q is a power of two
        n, rest = divmod(p << frac, q)
        if rest or abs(n) >= 1 << max(width - LIMB_BITS - 1, 1):  # room for 2^32 sites
            raise ValueError(f"value {x!r} has no exact {limbs}-limb encoding at 2^-{frac}")
        n %= 1 << width
        out[i * limbs:(i + 1) * limbs] = [(n >> (LIMB_BITS * k)) & _MASK for k in range(limbs)]
    return out.reshape(*values.shape, limbs)


def decode(total: np.ndarray, frac: int = FLOAT_FRAC, limbs: int = FLOAT_LIMBS) -> np.ndarray:
    """The float64 of a sum of :func:`encode` d vectors (limb sums mod ``2^64``), rounded once."""
    words = np.asarray(total, dtype=np.uint64).reshape(-1, limbs)
    width = LIMB_BITS * limbs
    if limbs == 1 and frac == 0:  # the search's counts: one signed 32-bit word each
        ints = (words[:, 0] & np.uint64(_MASK)).astype(np.int64)
        out = np.where(ints >= 1 << 31, ints - (1 << 32), ints).astype(np.float64)
        return out.reshape(np.shape(total)[:-1]) if np.ndim(total) > 1 else out
    out = np.empty(len(words))
    for i, row in enumerate(words.tolist()):
        n = sum(int(w) << (LIMB_BITS * k) for k, w in enumerate(row)) % (1 << width)
        n = n - (1 << width) if n >> (width - 1) else n
        try:
            out[i] = n / (1 << frac)  # int / int: correctly rounded
        except OverflowError:
            out[i] = np.inf if n > 0 else -np.inf
    return out.reshape(np.shape(total)[:-1]) if np.ndim(total) > 1 else out


# how each key of a statistics packet is encoded: floats at 2^-1074, counts as integers
KINDS: Mapping[str, tuple[int, int]] = {"sum": (FLOAT_FRAC, FLOAT_LIMBS),
                                        "sumsq": (FLOAT_FRAC, FLOAT_LIMBS),
                                        "above": (0, 1)}  # the search's 0/1: one word
_COUNT = (0, INT_LIMBS)


def exact_sum(config: secure.SecAgg, name: str = "exact_secure_sum") -> Stage:
    """The innermost stage of a statistics chain under secure aggregation: exact limbs.

    ``config`` is the run's :func:`~fedpipe.tasks.secure.secure_sum` settings (threshold,
    mask graph); the words are always 64-bit (limb sums must not wrap). Like ``secure_sum``, it
    refuses to decode a sum the protocol has not unmasked.
    """
    config = config._replace(bits=64, dropout=0.0)

    def init(n_params: int) -> StageState:
        return {}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        if any(k.startswith(aggregate.GATHER) for k in packet):
            raise ValueError(f"{name}: a gathered entry would reach the server in the clear")
        try:
            return {_wire(k, v): encode(v, *KINDS.get(k, _COUNT)).reshape(-1)
                    for k, v in packet.items()}
        except ValueError as exc:
            raise aggregate.RejectedUpdate(str(exc)) from None

    def after_sum(total: Packet, state: StageState):
        if secure.UNMASKED not in total:
            raise ValueError(f"{name}: the sum is still masked (run it in a secure round)")
        out = {}
        for wire, v in total.items():
            if wire != secure.UNMASKED:
                shape, key = _unwire(wire)
                out[key] = decode(v, *KINDS.get(key, _COUNT)).reshape(shape)
        return out, state, {}

    before_sum.secagg = config  # secure.find() reads it: the protocol's settings
    return Stage(name, init, before_sum, after_sum, spec=StageSpec(kind="exact_secure_sum"))


def _wire(key: str, value: np.ndarray) -> str:
    return f"exact{','.join(map(str, np.shape(value)))}/{key}"  # the shape rides in the name


def _unwire(wire: str) -> tuple[tuple[int, ...], str]:
    shape, key = wire[len("exact"):].split("/", 1)
    return tuple(int(n) for n in shape.split(",") if n), key


# --------------------------------------------------------------------------------------------
# min and max by a secure search over order-preserving keys

_SIGN = np.uint64(1 << 63)


def order_key(x: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 values (``-inf`` lowest, ``+inf`` highest)."""
    bits = np.asarray(x, dtype=np.float64).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: np.ndarray) -> np.ndarray:
    """The float64 of :func:`order_key`'s keys."""
    key = np.asarray(key, dtype=np.uint64)
    return np.where(key & _SIGN, key & ~_SIGN, ~key).view(np.float64)


def search_start(n: int) -> tuple[np.ndarray, int]:
    """The search's first interval: every key (``lo`` 0, width ``2^64``, as its bit count)."""
    return np.zeros(n, dtype=np.uint64), 64


def search_thresholds(lo: np.ndarray, bits: int) -> np.ndarray:
    """The 255 thresholds splitting ``[lo, lo + 2^bits)`` into 256 equal parts: (n, 255)."""
    step = np.uint64(1) << np.uint64(bits - SEARCH_BITS)
    return lo[:, None] + np.arange(1, 1 << SEARCH_BITS, dtype=np.uint64)[None, :] * step


def above(keys: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """A site's search packet: 1 where its key is at or above the threshold, as float."""
    return (keys[:, None] >= thresholds).astype(np.float64)


def search_step(lo: np.ndarray, bits: int, counts: np.ndarray) -> tuple[np.ndarray, int]:
    """The next interval from the summed packets: the part holding the largest key."""
    parts = (np.asarray(counts) > 0).sum(axis=1).astype(np.uint64)
    bits -= SEARCH_BITS
    return lo + parts * (np.uint64(1) << np.uint64(bits)), bits


def extreme_keys(stats_min: np.ndarray, stats_max: np.ndarray) -> np.ndarray:
    """A site's keys to search: its max, then its min complemented (its max is the min)."""
    return np.concatenate([order_key(stats_max), ~order_key(stats_min)])


def extremes_of(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(min, max)`` from the searched keys of :func:`extreme_keys`."""
    n = len(keys) // 2
    return key_value(~keys[n:]), key_value(keys[:n])
