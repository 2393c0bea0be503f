"""Privacy accounting for DP federated runs, with Google's ``dp-accounting`` (RDP and PLD).

The DP event must be the mechanism the run performs:

* central DP, ``k`` of ``N`` clients sampled per round **without replacement** (what
  :func:`fedpipe.tasks.sampling.sample_clients` does):
  ``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z / 2))`` per round, RDP accountant,
  replace-one neighbours. The ``z / 2``: replacing one client's update (norm <= S) by another
  moves the clipped sum by up to ``2 S``, and dp-accounting's noise multiplier is the noise
  standard deviation over *that* sensitivity;
* central DP with every client in every round: ``GaussianDpEvent(z)`` per round (add/remove one
  client moves the sum by at most ``S``), PLD accountant;
* local DP: each client's release is ``GaussianDpEvent(z / 2)`` (any two updates differ by up to
  ``2 S``), composed over every round, since a client knows when it takes part (no sampling
  amplification), PLD accountant.

:class:`Accountant` gives ε after ``t`` rounds from one-round RDP (linear in ``t``) or by
composing a PLD ``t`` times; :func:`calibrate` finds the noise multiplier that spends a target ε
in the planned rounds.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import dp_accounting as dpa
from dp_accounting import pld, rdp
from fedpipe.errors import ValidationError

log = logging.getLogger("fedpipe")
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's per-order warnings


class DpSetup(NamedTuple):
    """What the accountant needs to know about a run's mechanism."""

    mode: str  # "central" or "local"
    noise_multiplier: float
    n_clients: int
    per_round: int
    delta: float


def round_event(setup: DpSetup, noise_multiplier: float | None = None) -> dpa.DpEvent:
    """The DP event of one round (see the module docstring for the choice)."""
    z = setup.noise_multiplier if noise_multiplier is None else noise_multiplier
    if setup.mode == "local":
        return dpa.GaussianDpEvent(z / 2)
    if setup.per_round >= setup.n_clients:
        return dpa.GaussianDpEvent(z)
    return dpa.SampledWithoutReplacementDpEvent(setup.n_clients, setup.per_round,
                                                dpa.GaussianDpEvent(z / 2))


def accountant_name(setup: DpSetup) -> str:
    """``"rdp"`` for sampling without replacement (PLD does not support it), else ``"pld"``."""
    return "rdp" if setup.mode == "central" and setup.per_round < setup.n_clients else "pld"


def _fresh(name: str) -> dpa.PrivacyAccountant:
    if name == "rdp":
        return rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    return pld.PLDAccountant()


def epsilon(event: dpa.DpEvent, rounds: int, delta: float, accountant: str = "rdp",
            relation: str = "replace_one") -> float:
    """ε after ``rounds`` self-compositions of ``event`` at ``delta`` (0 rounds: 0).

    ``relation`` is ``"replace_one"`` or ``"add_or_remove_one"`` (RDP only; PLD uses
    add/remove).
    """
    if rounds <= 0:
        return 0.0
    if accountant == "rdp":
        rel = (dpa.NeighboringRelation.REPLACE_ONE if relation == "replace_one"
               else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc: dpa.PrivacyAccountant = rdp.RdpAccountant(neighboring_relation=rel)
    else:
        acc = pld.PLDAccountant()
    return float(acc.compose(event, int(rounds)).get_epsilon(delta))


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of ``rounds`` Gaussian mechanisms of ``noise_multiplier`` (sensitivity 1) at ``delta``.

    Their composition is exactly one Gaussian mechanism of ``noise_multiplier / sqrt(rounds)``
    (the privacy loss of each is normal; Dong, Roth & Su 2019), whose δ(ε) dp-accounting's
    ``GaussianPrivacyLoss`` gives in closed form; ε is the smallest value with δ(ε) <= ``delta``,
    found by dp-accounting's own binary search. The same ε as composing the PLD ``rounds`` times
    (to 1e-8 relative, ``tests/pipeline/test_privacy.py``) in milliseconds instead of 0.2-6 s,
    which a run paid every round to report its ε.

    References
    ----------
    Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
    Calibration and Optimal Denoising", ICML 2018.
    """
    from dp_accounting.pld import common, privacy_loss_mechanism

    loss = privacy_loss_mechanism.GaussianPrivacyLoss(
        noise_multiplier / math.sqrt(rounds), sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    high = 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        high *= 2.0
    search = common.BinarySearchParameters(0.0, high, tolerance=1e-12 * high)
    return float(common.inverse_monotone_function(loss.get_delta_for_epsilon, delta, search))


class Accountant:
    """ε spent after ``t`` rounds of one run's mechanism (cached: asked for every round)."""

    def __init__(self, setup: DpSetup):
        self.setup = setup
        self.event = round_event(setup)
        self.name = accountant_name(setup)

    @functools.cache  # noqa: B019 (one accountant per run)
    def epsilon(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        if self.name == "rdp":  # RDP composes linearly: one round's curve, scaled
            orders, curve = self._rdp_curve()
            return float(rdp.compute_epsilon(orders, rounds * curve, self.setup.delta)[0])
        if isinstance(self.event, dpa.GaussianDpEvent):
            return gaussian_epsilon(self.event.noise_multiplier, rounds, self.setup.delta)
        return epsilon(self.event, rounds, self.setup.delta, self.name)

    @functools.cache  # noqa: B019
    def _rdp_curve(self):
        acc = _fresh("rdp").compose(self.event)
        return acc._orders, acc._rdp.copy()  # dp-accounting keeps them as these attributes

    def describe(self) -> dict:
        """What the run records: the event, the accountant, δ and the mode."""
        return {"event": str(self.event), "accountant": self.name, "delta": self.setup.delta,
                "mode": self.setup.mode, "noise_multiplier": self.setup.noise_multiplier,
                "neighbours": "replace-one" if self.name == "rdp" else "add/remove-one"}


def calibrate(setup: DpSetup, rounds: int, target_epsilon: float) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon``."""
    name = accountant_name(setup)
    try:
        z = dpa.calibrate_dp_mechanism(
            lambda: _fresh(name),
            lambda z: dpa.SelfComposedDpEvent(round_event(setup, z), int(rounds)),
            target_epsilon, setup.delta,
            bracket_interval=dpa.LowerEndpointAndGuess(0.05, 1.0), tol=1e-3)
    except (ValueError, RuntimeError) as exc:
        raise ValidationError(f"--target-epsilon {target_epsilon}: no noise multiplier reaches "
                              f"it in {rounds} rounds ({exc})") from None
    return float(z)


def check_budget(acc: Accountant, target_epsilon: float | None, start_round: int) -> None:
    """Refuse before round ``start_round`` a budget that is already spent, in one line."""
    if target_epsilon is None:
        return
    spent, next_ = acc.epsilon(start_round), acc.epsilon(start_round + 1)
    if next_ > target_epsilon:
        raise ValidationError(
            f"--target-epsilon {target_epsilon}: budget already spent (ε={spent:.4g} after "
            f"{start_round} round(s); round {start_round} would bring it to {next_:.4g})")


def noise_stage_spec(stages) -> dict | None:
    """The spec of the chain's noise stage (``kind == "gaussian_noise"``), if it has one."""
    specs = [s.spec for s in stages if s.spec and s.spec.get("kind") == "gaussian_noise"]
    if len(specs) > 1:
        raise ValidationError(f"the aggregation chain has {len(specs)} noise stages; one at most")
    return specs[0] if specs else None


def check_chain(stages) -> dict | None:
    """Refuse, in one line, a chain whose DP claim its other stages break; returns the noise
    stage's spec (None without DP).

    Central DP needs every contribution bounded by ``S`` and a fixed denominator: a clip to the
    noise's ``S`` (or adaptive clipping) before it, the fixed-denominator ``dp_mean`` rather
    than the row-weighted mean, and no robust rule (a median's sensitivity is not ``S / k``).
    """
    noise = noise_stage_spec(stages)
    if noise is None:
        return None
    kinds = [(s.spec or {}).get("kind", s.name) for s in stages]
    if noise["mode"] == "central":
        gather = [s.name for s in stages if s.reduction == "gather"]
        if gather:
            raise ValidationError(f"--dp central with --aggregator {gather[0]}: a robust rule "
                                  "breaks the sensitivity bound the noise is sized for; use "
                                  "--aggregator mean, or --dp local")
        if "dp_mean" not in kinds:
            raise ValidationError("--dp central needs the fixed-denominator mean (dp_mean): "
                                  "the row-weighted mean lets one client weigh more than S")
    if not noise.get("adaptive"):
        clips = [s.spec["clip"] for s in stages if s.spec and s.spec.get("kind") == "clip"]
        if not clips or clips[0] > noise["clip"]:
            raise ValidationError(f"--dp {noise['mode']}: noise is sized for --clip "
                                  f"{noise['clip']}, but no clip stage bounds updates to it")
    wire = [s for s in stages if s.spec and s.spec.get("kind") in ("fp16", "int8", "topk")]
    for stage in wire:
        bound = stage.spec.get("bound")
        if not noise.get("adaptive") and (bound is None or bound > noise["clip"]):
            raise ValidationError(f"--compress {stage.spec['kind']} with --dp: the decoded "
                                  f"update must be re-bounded to --clip {noise['clip']} "
                                  "(build it with bound=S)")
    return noise
