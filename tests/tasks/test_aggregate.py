"""Aggregation stages and server steps: pure NumPy, checked against direct formulas."""

import numpy as np
import pytest
from fedpipe.tasks import aggregate, optimizers
from fedpipe.tasks.aggregate import (
    RejectedUpdate,
    Stage,
    add_packets,
    add_reports,
    client_report,
    client_side,
    default_chain,
    init_states,
    server_side,
)


def _packet(delta, n):
    return {"delta": np.asarray(delta, dtype=float), "n": np.asarray(float(n))}


def _aggregate(chain, packets):
    states = init_states(chain, 3)
    sent = [client_side(chain, states, p)[0] for p in packets]
    return server_side(chain, states, add_packets(*[p for p in sent if p is not None]))


def check_stage_chain(chain, n_params=3):
    """Conformance of a chain: init gives dict states, client side keeps shape, server side
    returns a delta of the right shape and float measurements."""
    states = init_states(chain, n_params)
    assert all(isinstance(s, dict) for s in states.values())
    packet, reason = client_side(chain, states, _packet(np.ones(n_params), 2))
    assert reason is None and packet["delta"].shape == (n_params,)
    total, new_states, measurements = server_side(chain, states, add_packets(packet, packet))
    assert total["delta"].shape == (n_params,) and set(new_states) == set(states)
    assert all(isinstance(v, float) for v in measurements.values())


def test_default_chain_conforms():
    check_stage_chain(default_chain())


def test_weighted_mean_is_n_weighted_average():
    deltas = [[1.0, 2.0, 3.0], [0.0, 0.0, 6.0], [-1.0, 4.0, 0.0]]
    ns = [10, 30, 60]
    total, _, measurements = _aggregate(default_chain(), [_packet(d, n) for d, n in zip(deltas, ns, strict=True)])
    np.testing.assert_allclose(total["delta"], np.average(deltas, axis=0, weights=ns))
    assert measurements == {"weighted_mean/weight": 100.0, "validate/accepted": 3.0}


@pytest.mark.parametrize("bad", [[np.nan, 0, 0], [0, np.inf, 0], [1.0, 2.0]])
def test_validate_rejects_non_finite_and_wrong_shape(bad):
    chain = default_chain()
    packet, reason = client_side(chain, init_states(chain, 3), _packet(bad, 5))
    assert packet is None and reason.startswith("validate: update has")


def test_rejected_updates_are_left_out_of_the_sum():
    reports = [client_report("0", _packet([1, 1, 1], 1), {"n": 1.0}),
               client_report("1", None, {"n": 1.0}, "validate: bad"),
               client_report("2", _packet([3, 3, 3], 1), {"n": 1.0})]
    merged = add_reports(*reports)
    np.testing.assert_array_equal(merged["packet"]["delta"], [4, 4, 4])
    assert merged["clients"]["1"]["rejected"] == "validate: bad"
    assert add_reports(reports[1])["packet"] is None


def test_stages_run_in_order_around_the_sum():
    calls = []

    def stage(name):
        def before(p, s):
            calls.append(f"{name}.before")
            return p

        def after(t, s):
            calls.append(f"{name}.after")
            return t, s, {}
        return Stage(name, lambda n: {}, before, after)

    _aggregate((stage("a"), stage("b")), [_packet([1, 2, 3], 1)])
    assert calls == ["a.before", "b.before", "b.after", "a.after"]


def test_a_stage_with_state_and_measurements_needs_no_loop_change():
    # A clipping stage written only against the Stage contract: state = threshold, counter summed.
    def before(p, s):
        norm = np.linalg.norm(p["delta"])
        scale = min(1.0, float(s["clip"]) / norm) if norm else 1.0
        return {**p, "delta": p["delta"] * scale, "clip/clipped": np.asarray(float(scale < 1))}

    def after(t, s):
        t = dict(t)
        return t, s, {"clipped": t.pop("clip/clipped")}

    clip = Stage("clip", lambda n: {"clip": np.asarray(1.0)}, before, after)
    chain = (aggregate.validate(), clip, aggregate.weighted_mean())
    check_stage_chain(chain)
    total, _, measurements = _aggregate(chain, [_packet([3, 4, 0], 1), _packet([0.1, 0, 0], 1)])
    np.testing.assert_allclose(total["delta"], [(0.6 + 0.1) / 2, 0.4, 0])
    assert measurements["clip/clipped"] == 1.0


def test_rejection_from_any_stage():
    def refuse(p, s):
        raise RejectedUpdate("no")

    chain = (Stage("refuse", lambda n: {}, refuse, lambda t, s: (t, s, {})),)
    assert client_side(chain, init_states(chain, 3), _packet([1, 2, 3], 1)) == (None, "refuse: no")


def test_fedavg_server_step_adds_the_mean_delta():
    strategy = aggregate.fedavg()
    p, delta = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    new, _ = aggregate.server_step(strategy.server, p,
                                   strategy.server.init(p), delta)
    np.testing.assert_allclose(new, p + delta)


@pytest.mark.parametrize(("strategy", "optimizer"), [
    (aggregate.fedadam(0.1), optimizers.adam(0.1, eps=1e-3)),
    (aggregate.fedyogi(0.1), optimizers.yogi(0.1, eps=1e-3)),
    (aggregate.fedadagrad(0.1), optimizers.adagrad(0.1, eps=1e-3)),
    (aggregate.fedavgm(1.0, 0.9), optimizers.momentum(1.0, 0.9)),
])
def test_adaptive_servers_are_the_optimizers_on_minus_delta(strategy, optimizer):
    p = np.array([1.0, -1.0, 0.5])
    s1, s2 = strategy.server.init(p), optimizer.init(p)
    q1 = q2 = p
    for delta in (np.array([0.1, 0.2, -0.3]), np.array([0.0, -0.1, 0.2])):
        q1, s1 = aggregate.server_step(strategy.server, q1, s1, delta)
        updates, s2 = optimizer.update(-delta, s2, q2)
        q2 = q2 + updates
    np.testing.assert_array_equal(q1, q2)


def test_strategy_options():
    prox, = aggregate.fedprox(0.3).client_transforms
    assert optimizers.describe(prox) == {"kind": "add_proximal", "mu": 0.3}
    assert aggregate.server_control(aggregate.scaffold().client_transforms)
    assert not aggregate.server_control(aggregate.fedprox(0.3).client_transforms)
    with pytest.raises(ValueError):
        aggregate.fedprox(-1.0)


def test_scaffold_server_control_is_mean_over_all_clients():
    c = aggregate.scaffold_control(np.zeros(2), np.array([2.0, 4.0]), 4)
    np.testing.assert_array_equal(c, [0.5, 1.0])


def test_weighted_average_of_client_metrics():
    records = {"a": {"train_loss": 1.0, "n": 1.0}, "b": {"train_loss": 3.0, "n": 3.0}, "c": {}}
    assert aggregate.weighted_average(records, "train_loss") == 2.5
    assert aggregate.weighted_average({}, "train_loss") is None
