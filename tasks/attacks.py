"""SIMULATION ONLY: Byzantine attacks for evaluating robust aggregation.

Nothing here runs in a normal run. :func:`simulated_attack` wraps an aggregator stage so that a
chosen fraction of clients (picked by a hash of ``(seed, client)``) send attacked updates, and
the benchmark (``benchmarks/bench_privacy.py --attack-table``) reports what each rule makes of
them. The attackers are omniscient where the attack assumes it (ALIE sees the honest updates
of the round), which is the worst case the rules are meant to bound.

References
----------
Baruch, Baruch & Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
Learning", NeurIPS 2019 (ALIE). Blanchard et al., NeurIPS 2017; Yin et al., ICML 2018.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .aggregate import GATHER, Packet, Stage, StageSpec, StageState, add_packets
from .privacy import CLIENT_ID

ATTACKS = ("none", "sign-flip", "scaled", "gaussian", "alie", "label-flip")
_ROWS, _FLAG, _N = f"{GATHER}attack/rows", f"{GATHER}attack/flag", f"{GATHER}attack/n"


def is_attacker(client_tag: int, fraction: float, seed: int = 0) -> bool:
    """Whether a client is one of the simulated attackers (a stable hash below ``fraction``)."""
    digest = hashlib.sha256(f"{seed}:{int(client_tag)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def attack_rows(kind: str, rows: np.ndarray, bad: np.ndarray, rng: np.random.Generator,
                scale: float = 100.0, sigma: float = 1.0) -> np.ndarray:
    """The updates after the attackers (``bad``, a boolean mask) replace theirs.

    ``sign-flip``: ``-u``; ``scaled``: ``scale * u``; ``gaussian``: ``N(0, sigma^2)``;
    ``alie``: ``mu - z sigma`` of the honest rows with Baruch et al.'s ``z_max``.
    ``label-flip`` and ``none`` change no update (label flip poisons the data instead:
    :func:`flip_labels`).
    """
    out = rows.copy()
    if kind in ("none", "label-flip") or not bad.any():
        return out
    if kind == "sign-flip":
        out[bad] = -rows[bad]
    elif kind == "scaled":
        out[bad] = scale * rows[bad]
    elif kind == "gaussian":
        out[bad] = rng.normal(0.0, sigma, rows[bad].shape)
    elif kind == "alie":
        honest = rows[~bad] if (~bad).any() else rows
        out[bad] = honest.mean(axis=0) - alie_z(len(rows), int(bad.sum())) * honest.std(axis=0)
    else:
        raise ValueError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")
    return out


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``Phi(z) = (n - s) / n`` with ``s = floor(n/2 + 1) - f``."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Label flip: class ``c`` becomes ``n_classes - 1 - c``."""
    return (n_classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)


def simulated_attack(inner: Stage, kind: str, fraction: float, seed: int = 0) -> Stage:
    """SIMULATION ONLY: ``inner`` aggregating updates of which ``fraction`` are attacked.

    The wrapper gathers every update, lets the attack replace the attackers' rows, then runs
    ``inner``'s client part on each row and its server part on their reduction, so any
    aggregator (the mean included) sees exactly what the attackers would have sent.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")

    def before_sum(packet: Packet, state: StageState) -> Packet:
        packet = dict(packet)
        bad = is_attacker(int(packet.get(CLIENT_ID, 0)), fraction, seed)
        rows = packet.pop("delta")[None, :]
        return {**packet, _ROWS: rows, _FLAG: np.asarray([float(bad)]),
                _N: np.asarray([float(packet["n"])])}

    def after_sum(total: Packet, state: StageState):
        total = dict(total)
        rows, bad, ns = total.pop(_ROWS), total.pop(_FLAG) > 0, total.pop(_N)
        rng = np.random.default_rng([seed, int(state["round"]), 0xA7])
        rows = attack_rows(kind, rows, bad, rng)
        inner_state = {k[6:]: v for k, v in state.items() if k.startswith("inner/")}
        sent = [inner.before_sum({"delta": r, "n": np.asarray(n)}, inner_state)
                for r, n in zip(rows, ns, strict=True)]
        summed = add_packets(*sent)
        rest = {k: v for k, v in total.items() if k != "n"}
        out, inner_state, found = inner.after_sum({**summed, **rest}, inner_state)
        new = {"round": np.asarray(int(state["round"]) + 1)}
        new |= {f"inner/{k}": v for k, v in inner_state.items()}
        return out, new, {**found, "attackers": float(bad.sum())}

    def init(n_params: int) -> StageState:
        return {"round": np.asarray(0), **{f"inner/{k}": v
                                           for k, v in inner.init(n_params).items()}}

    return Stage(f"attacked_{inner.name}", init, before_sum, after_sum, reduction="gather",
                 spec=StageSpec(kind="simulated_attack", attack=kind, fraction=fraction,
                                inner=inner.spec))
