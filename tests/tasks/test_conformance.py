"""check_stage and check_strategy on every built-in stage and strategy, and on broken ones."""

import fedpipe as fp
import numpy as np
import pytest
from fedpipe.tasks import aggregate, attacks, optimizers, secure, sites, stages
from fedpipe.tasks.aggregate import Stage, Strategy
from fedpipe.tasks.conformance import stage_checks, strategy_checks

# Every stage factory of fp.stages, built with arguments it accepts (noise with and without a
# seed: an OS-entropy key lives in the state, so the same state must still give the same bits).
STAGES = {
    "validate": stages.validate, "weighted_mean": stages.weighted_mean, "mean": stages.mean,
    "clip": lambda: stages.clip(0.5), "dp_mean": lambda: stages.dp_mean(5),
    "dp_mean capped": lambda: stages.dp_mean(5, cap=20),
    "gaussian_noise": lambda: stages.gaussian_noise(1.0, 1.0, seed=3),
    "gaussian_noise local": lambda: stages.gaussian_noise(1.0, 1.0, mode="local", seed=3),
    "gaussian_noise os key": lambda: stages.gaussian_noise(1.0, 1.0),
    "adaptive_clip": lambda: stages.adaptive_clip(0.5, 100, seed=1),
    "fp16": stages.fp16, "int8": stages.int8, "topk": lambda: stages.topk(0.3),
    "topk bounded": lambda: stages.topk(0.3, bound=0.5),
    "median": stages.median, "trimmed_mean": stages.trimmed_mean, "krum": stages.krum,
    "multi_krum": stages.multi_krum, "centered_clip": stages.centered_clip,
    "simulated_attack": lambda: attacks.simulated_attack(stages.median(), "alie", 0.4),
}
STRATEGIES = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"]


def test_every_stage_factory_is_checked():
    factories = set(stages.__all__) - {"Stage", "check_chain", "default_chain"}
    assert factories <= {name.split()[0] for name in STAGES}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_builtin_stage_conforms(name):
    fp.check_stage(STAGES[name]())


def test_secure_sum_conforms_through_the_masking_protocol():
    stage = stages.secure_sum(5, bound=100.0)
    config = secure.find([stage])

    def masked_sum(sent):  # the round's protocol between the client and server parts
        entropy = {str(i): bytes([i + 1]) * 160 for i in range(len(sent))}
        return secure.simulate({str(i): p for i, p in enumerate(sent)}, config,
                               entropy=entropy)[0]

    fp.check_stage(stage, reduce=masked_sum)
    with pytest.raises(AssertionError, match="'server_part'.*still masked"):  # plain sums are refused
        fp.check_stage(stage)


def test_site_statistics_stages_conform():
    rng = np.random.default_rng(0)
    fp.check_stage(sites.stats_stage(),
                   packets=[sites.stats_packet(rng.normal(size=(10, 3))) for _ in range(3)])
    fp.check_stage(sites.hist_stage(),
                   packets=[{"hist": rng.integers(0, 5, size=(3, 8)).astype(float)}
                            for _ in range(3)])


@pytest.mark.parametrize("name", STRATEGIES)
def test_builtin_strategy_conforms(name):
    fp.check_strategy(getattr(fp.strategies, name)())


def test_strategies_as_data_conform():
    # a client optimizer of its own, epochs and a DP chain; and data-parallel's configuration
    fp.check_strategy(Strategy("adam-clients", optimizers.adam(0.05),
                               client=optimizers.adam(0.05), local_epochs=2,
                               stages=(stages.validate(), stages.clip(1.0), stages.dp_mean(4),
                                       stages.gaussian_noise(0.01, 1.0, seed=0))))
    fp.check_strategy(Strategy("data-parallel", optimizers.momentum(0.1),
                               client=optimizers.sgd(1.0), local_epochs=1,
                               stages=aggregate.default_chain()))


def test_checks_are_named_one_by_one():
    assert [n for n, _ in stage_checks(stages.clip(1.0))] == [
        "spec", "reduction", "state_in", "client_part", "server_part", "measurements",
        "state_out", "determinism"]
    assert [n for n, _ in strategy_checks(fp.strategies.fedavg())] == [
        "plain_data", "server_optimizer", "client_optimizer", "local_epochs", "stages",
        "rebuildable", "determinism", "decreases_loss"]


# --- broken stages: the named check fails ----------------------------------------------------

def _counting(before=None, after=None, init=None) -> Stage:
    def before_sum(packet, state):
        return {**packet, "c/count": np.asarray(1.0)}

    def after_sum(total, state):
        total = dict(total)
        return total, state, {"count": float(total.pop("c/count"))}

    return Stage("c", init or (lambda n: {"round": np.asarray(0)}), before or before_sum,
                 after or after_sum)


def test_a_correct_handmade_stage_passes():
    fp.check_stage(_counting())


def _in_place(packet, state):
    packet["delta"] *= 2.0
    return packet


def _leaves_its_counter(total, state):
    return dict(total), state, {}


def _popped(total):
    return {k: v for k, v in total.items() if k != "c/count"}


def _global_noise(total, state):
    total = _popped(total)
    return {**total, "delta": total["delta"] + np.random.normal(size=total["delta"].shape)}, \
        state, {}


def _float_round(total, state):
    return _popped(total), {"round": np.asarray(float(state["round"]) + 1)}, {}


def _nan_measurement(total, state):
    return _popped(total), state, {"spread": float("nan")}


@pytest.mark.parametrize("broken, check", [
    (_counting(before=_in_place), "client_part"),
    (_counting(after=_leaves_its_counter), "server_part"),
    (_counting(after=_global_noise), "determinism"),
    (_counting(after=_float_round), "state_out"),
    (_counting(after=_nan_measurement), "measurements"),
    (_counting(init=lambda n: {"round": 0}), "state_in"),
    (_counting()._replace(reduction="mean"), "reduction"),
    (_counting()._replace(reduction="gather"), "client_part"),
    (_counting()._replace(spec={"kind": "c", "sizes": (1, 2)}), "spec"),
])
def test_a_broken_stage_fails_the_named_check(broken, check):
    with pytest.raises(AssertionError, match=f"check_stage '{check}' of stage 'c'"):
        fp.check_stage(broken)


# --- broken strategies ------------------------------------------------------------------------

def _forgetful_sgd(lr):
    # keeps its step count outside the state: a reloaded state does not continue identically
    steps = [0]

    def update(g, state, p):
        steps[0] += 1
        return -lr / steps[0] * g, {"step": np.asarray(int(state["step"]) + 1)}

    return optimizers.Optimizer(lambda p: {"step": np.asarray(0)}, update)


# steps up the averaged delta's opposite: a valid optimizer whose rounds climb the loss
_ascent = optimizers.Optimizer(lambda p: {"step": np.asarray(0)},
                               lambda g, s, p: (1.0 * g, {"step": np.asarray(int(s["step"]) + 1)}))


@pytest.mark.parametrize("broken, check", [
    (fp.strategies.fedavg()._replace(local_epochs=0), "local_epochs"),
    (fp.strategies.fedavg()._replace(client_transforms=[optimizers.add_proximal(0.1)]),
     "plain_data"),
    (fp.strategies.scaffold()._replace(client_transforms=("control_variates",)), "plain_data"),
    (fp.strategies.fedavg()._replace(server=_forgetful_sgd(1.0)), "server_optimizer"),
    (fp.strategies.fedavg()._replace(stages=(stages.validate(), _counting(after=_float_round))),
     "stages"),
    (fp.strategies.fedavg()._replace(stages=(stages.median(), stages.krum())), "stages"),
    (fp.strategies.fedavg()._replace(server=_ascent), "decreases_loss"),
])
def test_a_broken_strategy_fails_the_named_check(broken, check):
    with pytest.raises(AssertionError, match=f"check_strategy '{check}' of strategy '(fedavg|scaffold)'"):
        fp.check_strategy(broken)
