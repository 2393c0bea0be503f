"""Differential privacy as aggregation stages: L2 clipping, Gaussian noise, fixed-denominator mean.

Central DP-FedAvg is the chain ``validate -> clip(S) -> dp_mean(k) -> gaussian_noise(z, S)``:
each client's delta is clipped to norm ``S`` on its worker and weighted by at most 1, the sum is
noised once with ``N(0, (z S)^2)`` on the server and divided by a fixed denominator ``k``, so
one client moves the released sum by at most ``S`` whatever its row count. Local DP adds the
noise on the client's worker instead (``mode="local"``). :func:`adaptive_clip` replaces the
fixed ``S`` by a noised quantile estimate.

Noise comes from a Philox generator keyed by 128 bits: from the run seed for a reproducible
simulation, from the operating system's CSPRNG (:mod:`secrets`) otherwise. The key and the count
of noised rounds are the stage's state, so they are written with every checkpoint (the DP
ledger) and a resumed run draws exactly the noise the uninterrupted one would have drawn.
Accounting (what ε that noise buys) lives in :mod:`fedpipe.privacy`.

References
----------
McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg, clipping and the fixed denominator).
Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

from .aggregate import LOCAL, Packet, Stage, StageSpec, StageState

CLIENT_ID = f"{LOCAL}client_id"  # a stable 64-bit tag of the client, put in by its worker
_NOISE_STREAM = 0xD9  # keeps the noise counters apart from any other use of the key


# --------------------------------------------------------------------------------------------
# math


def clip_l2(x: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """``x`` scaled to L2 norm at most ``bound``; returns ``(clipped, original norm)``."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0 or not np.isfinite(peak):
        return x, peak
    unit = x / peak  # the norm of a huge update (1e300) would overflow without the rescale
    norm = peak * float(np.linalg.norm(unit))
    if norm <= bound:
        return x, norm
    return unit * (bound / float(np.linalg.norm(unit))), norm


def client_tag(client: str) -> int:
    """A stable 63-bit integer for a client id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(str(client).encode()).digest()[:8], "little") >> 1


def noise_key(seed: int | None) -> np.ndarray:
    """128-bit Philox key: from ``seed`` (reproducible simulation) or from OS entropy (None)."""
    if seed is None:
        value = secrets.randbits(128)
        return np.array([value & (2**64 - 1), value >> 64], dtype=np.uint64)
    return np.random.SeedSequence([int(seed), _NOISE_STREAM]).generate_state(2, np.uint64)


def noise_rng(key: np.ndarray, round_: int, client: int = 0) -> np.random.Generator:
    """The noise stream of one round (and one client, for local DP): a Philox counter block."""
    counter = np.array([0, 0, int(round_), int(client)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=np.asarray(key, np.uint64), counter=counter))


def capped_weight(n: float, cap: float | None) -> float:
    """``min(n / cap, 1)``, or 1 (uniform) when ``cap`` is None: each client's weight is <= 1."""
    return 1.0 if cap is None else min(float(n) / float(cap), 1.0)


def split_noise(z: float, sigma_b: float) -> float:
    """Noise multiplier of the update sum when the clipped count takes ``sigma_b`` of the budget.

    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``; refused when ``z >= 2 sigma_b`` (the count
    would use the whole budget), as TFF and Flower refuse it.

    References
    ----------
    Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
    (Theorem 1).
    """
    if z <= 0 or sigma_b <= 0:
        raise ValueError(f"noise multiplier and count noise must be > 0, got {z}, {sigma_b}")
    if z >= 2 * sigma_b:
        raise ValueError(f"noise multiplier {z} >= 2 * count noise {sigma_b}: adaptive "
                         "clipping would spend the whole budget on the count")
    return (z ** -2 - (2 * sigma_b) ** -2) ** -0.5


def next_clip(clip: float, below_fraction: float, quantile: float, lr: float) -> float:
    """Geometric step of the clip norm towards the ``quantile`` of update norms."""
    return clip * math.exp(-lr * (below_fraction - quantile))


# --------------------------------------------------------------------------------------------
# stages


def clip(bound: float, name: str = "clip") -> Stage:
    """Clip each client's delta to L2 norm ``bound`` on its worker; count the clipped ones."""
    if not bound > 0:
        raise ValueError(f"clip norm must be > 0, got {bound}")

    def before_sum(packet: Packet, state: StageState) -> Packet:
        delta, norm = clip_l2(packet["delta"], bound)
        return {**packet, "delta": delta, f"{name}/clipped": np.asarray(float(norm > bound))}

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        return total, state, {"clipped": float(total.pop(f"{name}/clipped")), "bound": bound}

    return Stage(name, lambda n: {}, before_sum, after_sum,
                 spec=StageSpec(kind="clip", clip=float(bound)))


def dp_mean(denominator: float, cap: float | None = None, name: str = "dp_mean") -> Stage:
    """Mean with weights ``min(n_k / cap, 1)`` (uniform when ``cap`` is None), divided by a
    fixed ``denominator`` (the clients per round), so one client's share is bounded.

    References
    ----------
    McMahan et al., ICLR 2018 (the fixed-denominator estimator f~_f).
    """
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")

    def before_sum(packet: Packet, state: StageState) -> Packet:
        w = capped_weight(float(packet["n"]), cap)
        return {**packet, "delta": packet["delta"] * w, f"{name}/weight": np.asarray(w)}

    def after_sum(total: Packet, state: StageState):
        weight = float(total[f"{name}/weight"])
        total = {k: v for k, v in total.items() if k != f"{name}/weight"}
        return ({**total, "delta": total["delta"] / denominator}, state,
                {"weight": weight, "denominator": float(denominator)})

    return Stage(name, lambda n: {}, before_sum, after_sum,
                 spec=StageSpec(kind="dp_mean", denominator=float(denominator), cap=cap,
                                weights="uniform" if cap is None else f"capped at {cap:g} rows"))


def _noise_init(seed: int | None):
    def init(n_params: int) -> StageState:
        return {"key": noise_key(seed), "round": np.asarray(0, dtype=np.int64)}
    return init


def gaussian_noise(noise_multiplier: float, clip_norm: float, mode: str = "central",
                   seed: int | None = None, name: str = "noise") -> Stage:
    """Gaussian noise ``N(0, (z S)^2)``: once on the server's sum (central) or on each client's
    worker before its update leaves (local).

    Parameters
    ----------
    noise_multiplier : float
        ``z``, the noise standard deviation over the sensitivity ``S``.
    clip_norm : float
        ``S``: the bound a :func:`clip` stage earlier in the chain enforces.
    mode : {"central", "local"}
    seed : int, optional
        Reproducible simulation: the noise follows from ``(seed, round[, client])``. Without it
        the key comes from the OS's CSPRNG (and lives only in the state and the checkpoint).

    References
    ----------
    McMahan et al., ICLR 2018; Dwork & Roth, "The Algorithmic Foundations of Differential
    Privacy", 2014 (the Gaussian mechanism).
    """
    if mode not in ("central", "local"):
        raise ValueError(f"mode must be 'central' or 'local', got {mode!r}")
    if not noise_multiplier >= 0 or not clip_norm > 0:
        raise ValueError(f"need noise multiplier >= 0 and clip > 0, got {noise_multiplier}, "
                         f"{clip_norm}")
    std = float(noise_multiplier) * float(clip_norm)

    def before_sum(packet: Packet, state: StageState) -> Packet:
        if mode == "central":
            return packet
        rng = noise_rng(state["key"], int(state["round"]), int(packet.get(CLIENT_ID, 0)))
        return {**packet, "delta": packet["delta"] + rng.normal(0.0, std, packet["delta"].shape)}

    def after_sum(total: Packet, state: StageState):
        r = int(state["round"])
        if mode == "central":
            noise = noise_rng(state["key"], r).normal(0.0, std, total["delta"].shape)
            total = {**total, "delta": total["delta"] + noise}
        return total, {**state, "round": np.asarray(r + 1, dtype=np.int64)}, {"std": std}

    return Stage(name, _noise_init(seed), before_sum, after_sum,
                 spec=StageSpec(kind="gaussian_noise", mode=mode,
                                noise_multiplier=float(noise_multiplier), clip=float(clip_norm),
                                reproducible=seed is not None))


def adaptive_clip(noise_multiplier: float, clients_per_round: int, initial: float = 0.1,
                  quantile: float = 0.5, lr: float = 0.2, count_noise: float | None = None,
                  seed: int | None = None, name: str = "adaptive_clip") -> Stage:
    """Clip to a norm that follows the ``quantile`` of update norms, plus central noise.

    One stage, since the clip norm of a round sets the noise of that round. Each client clips
    to the round's ``C`` and reports whether its norm was at most ``C``; the server noises the
    update sum with ``z_delta * C`` and the count with ``count_noise`` (default ``m / 20``),
    where ``z_delta`` (:func:`split_noise`) makes the pair spend exactly the budget of ``z``.
    Put :func:`dp_mean` before it for the fixed denominator.

    References
    ----------
    Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
    (Algorithm 1 with the geometric update).
    """
    m = int(clients_per_round)
    sigma_b = float(count_noise) if count_noise is not None else m / 20.0
    z_delta = split_noise(noise_multiplier, sigma_b)

    def init(n_params: int) -> StageState:
        return {**_noise_init(seed)(n_params), "clip": np.asarray(float(initial))}

    def before_sum(packet: Packet, state: StageState) -> Packet:
        delta, norm = clip_l2(packet["delta"], float(state["clip"]))
        below = float(norm <= float(state["clip"]))
        return {**packet, "delta": delta, f"{name}/below": np.asarray(below)}

    def after_sum(total: Packet, state: StageState):
        r, c = int(state["round"]), float(state["clip"])
        rng = noise_rng(state["key"], r)
        total = dict(total)
        below = float(total.pop(f"{name}/below")) + rng.normal(0.0, sigma_b)
        total["delta"] = total["delta"] + rng.normal(0.0, z_delta * c, total["delta"].shape)
        new = {**state, "round": np.asarray(r + 1, dtype=np.int64),
               "clip": np.asarray(next_clip(c, below / m, quantile, lr))}
        return total, new, {"clip": c, "noised_below": below, "std": z_delta * c}

    return Stage(name, init, before_sum, after_sum,
                 spec=StageSpec(kind="gaussian_noise", mode="central", adaptive=True,
                                noise_multiplier=float(noise_multiplier), z_delta=z_delta,
                                count_noise=sigma_b, clip=float(initial),
                                reproducible=seed is not None))

