"""Update compression as aggregation stages: fp16, unbiased stochastic int8, top-k with error
feedback.

A compression stage encodes the client's delta into the arrays that would travel (``float16``
values; ``int8`` codes and one ``float64`` scale; ``int32`` indices and ``float32`` values),
records their byte count under :data:`fedpipe.tasks.aggregate.WIRE_BYTES`, and hands the
decoded float64 delta to the next stage. The worker adds its clients' packets before anything
leaves it, so decoding where the code is made is the same arithmetic as decoding on the
server; the bytes reported are those of the encoded arrays.

Put clipping before compression (the quantiser's range is then set by clipped values). Under
DP the *decoded* vector is what enters the sum, and stochastic rounding (at most one level per
coordinate) or error feedback (the residual of earlier rounds) can make it longer than ``S``:
give the stage ``bound=S`` and the decoded delta is scaled back to norm ``S`` — a change of the
int8 scale or of the top-k values only, so the bytes are unchanged and the sum's sensitivity
stays ``S``.

References
----------
Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding",
NeurIPS 2017. Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
"""

from __future__ import annotations

import math

import numpy as np

from .aggregate import LOCAL, WIRE_BYTES, Packet, RejectedUpdate, Stage, StageSpec, StageState
from .privacy import CLIENT_ID, clip_l2

LEVELS = 127


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Unbiased stochastic rounding of ``x / max|x|`` to 127 levels: ``(codes, scale)``.

    ``E[decode(codes, scale)] = x`` exactly; each coordinate is off by less than one level.
    """
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    if scale == 0.0:
        return np.zeros(x.shape, np.int8), 0.0
    y = np.abs(x) / scale * LEVELS
    low = np.floor(y)
    up = rng.random(x.shape) < (y - low)
    return (np.sign(x) * (low + up)).astype(np.int8), scale


def dequantize_int8(codes: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of :func:`quantize_int8` (in expectation)."""
    return codes.astype(np.float64) * (scale / LEVELS)


def top_k(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``ceil(fraction d)`` largest-magnitude entries: ``(int32 indices, float32 values)``."""
    k = max(1, math.ceil(fraction * x.size))
    idx = np.argpartition(np.abs(x), x.size - k)[x.size - k:] if k < x.size else np.arange(x.size)
    idx = np.sort(idx).astype(np.int32)
    return idx, x[idx].astype(np.float32)


def densify(idx: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """The dense float64 vector of a sparse ``(indices, values)`` pair."""
    out = np.zeros(size)
    out[idx] = values
    return out


def _stage(name: str, kind: str, encode, bound: float | None, **spec) -> Stage:
    """A compression stage around ``encode(delta, state, packet) -> (decoded, nbytes, local)``."""

    def before_sum(packet: Packet, state: StageState) -> Packet:
        decoded, nbytes, local = encode(packet["delta"], state, packet)
        if not np.isfinite(decoded).all():
            raise RejectedUpdate(f"{kind} cannot encode this update (out of range)")
        if bound is not None:
            decoded = clip_l2(decoded, bound)[0]
        return {**packet, **local, "delta": decoded, WIRE_BYTES: np.asarray(float(nbytes)),
                f"{name}/raw_bytes": np.asarray(float(packet["delta"].nbytes))}

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        sent, raw = float(total.pop(WIRE_BYTES)), float(total.pop(f"{name}/raw_bytes"))
        new = {**state, "round": np.asarray(int(state["round"]) + 1, dtype=np.int64)}
        return total, new, {"bytes": sent, "ratio": raw / sent if sent else 0.0}

    def init(n_params: int) -> StageState:
        return {"round": np.asarray(0, dtype=np.int64)}

    return Stage(name, init, before_sum, after_sum,
                 spec=StageSpec(kind=kind, bound=bound, **spec))


def fp16(bound: float | None = None, name: str = "compress") -> Stage:
    """Send the delta as float16 (4x fewer bytes than float64); overflow rejects the update."""

    def encode(delta, state, packet):
        with np.errstate(over="ignore"):
            half = delta.astype(np.float16)
        return half.astype(np.float64), half.nbytes, {}

    return _stage(name, "fp16", encode, bound)


def int8(seed: int = 0, bound: float | None = None, name: str = "compress") -> Stage:
    """Unbiased stochastic int8 quantisation, QSGD-style (``d`` bytes plus an 8-byte scale).

    Rounding randomness follows from ``(seed, round, client)``.

    References
    ----------
    Alistarh et al., "QSGD", NeurIPS 2017 (stochastic quantisation with s = 127 levels).
    """

    def encode(delta, state, packet):
        rng = np.random.default_rng([int(seed), int(state["round"]),
                                     int(packet.get(CLIENT_ID, 0)), 0x18])
        codes, scale = quantize_int8(delta, rng)
        return dequantize_int8(codes, scale), codes.nbytes + 8, {}

    return _stage(name, "int8", encode, bound, seed=int(seed))


def topk(fraction: float, bound: float | None = None, name: str = "compress") -> Stage:
    """Top-k sparsification with error feedback: the residual stays on the client's worker.

    Each round the client sends the ``fraction`` largest entries of ``delta + residual`` (int32
    indices, float32 values) and keeps what it did not send as its next residual.

    References
    ----------
    Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    key = f"{LOCAL}{name}/residual"

    def encode(delta, state, packet):
        acc = delta + packet[key] if key in packet else delta
        idx, values = top_k(acc, fraction)
        sent = densify(idx, values, acc.size)
        if bound is not None:  # what is not sent, scaled away included, is fed back
            sent = clip_l2(sent, bound)[0]
        return sent, idx.nbytes + values.nbytes, {key: acc - sent}

    return _stage(name, "topk", encode, bound, fraction=float(fraction))
