"""Learning-rate schedules: values from their defining formulas and their shape properties."""

import json
import math

import numpy as np
import pytest
from fedpipe.tasks import schedules as sch

STEPS = np.arange(0, 200)


def test_constant():
    assert {sch.constant(0.3)(t) for t in STEPS} == {0.3}


def test_step_decay_halves_every_k_steps():
    s = sch.step_decay(1.0, every=10, factor=0.5)
    assert s(0) == s(9) == 1.0
    assert s(10) == s(19) == 0.5
    assert s(30) == 0.125


def test_exponential_is_geometric():
    s = sch.exponential(2.0, rate=0.9, decay_steps=5)
    assert s(0) == 2.0
    assert math.isclose(s(5), 1.8)
    ratios = [s(t + 1) / s(t) for t in range(20)]
    np.testing.assert_allclose(ratios, 0.9 ** (1 / 5))


def test_inverse_time():
    s = sch.inverse_time(1.0, decay=0.5, decay_steps=2)
    assert s(0) == 1.0
    assert math.isclose(s(4), 1.0 / 2.0)
    assert math.isclose(1 / s(100) - 1 / s(50), 0.5 * 50 / 2)  # 1/lr grows linearly


def test_cosine_endpoints_midpoint_and_monotone():
    s = sch.cosine(0.1, total_steps=100, final=0.01)
    assert s(0) == pytest.approx(0.1)
    assert s(50) == pytest.approx((0.1 + 0.01) / 2)
    assert s(100) == pytest.approx(0.01) and s(150) == pytest.approx(0.01)
    values = [s(t) for t in STEPS]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("make", [
    lambda: sch.step_decay(0.1, every=7, factor=0.3),
    lambda: sch.exponential(0.1, rate=0.97),
    lambda: sch.inverse_time(0.1, decay=0.2),
    lambda: sch.cosine(0.1, total_steps=150),
])
def test_decaying_schedules_start_at_lr_and_never_increase_or_go_negative(make):
    values = [make()(t) for t in STEPS]
    assert values[0] == pytest.approx(0.1)
    assert all(a >= b >= 0 for a, b in zip(values, values[1:], strict=False))


def test_as_schedule():
    s = sch.cosine(1.0, 10)
    assert sch.as_schedule(s) is s
    assert sch.as_schedule(0.5)(1000) == 0.5


@pytest.mark.parametrize("bad", [
    lambda: sch.constant(0), lambda: sch.constant(-0.1), lambda: sch.constant(float("inf")),
    lambda: sch.step_decay(0.1, every=0), lambda: sch.step_decay(0.1, factor=1.5),
    lambda: sch.exponential(0.1, rate=0), lambda: sch.inverse_time(0.1, decay=-1),
    lambda: sch.cosine(0.1, total_steps=0), lambda: sch.cosine(0.1, 10, final=0.2),
    lambda: sch.step_decay(0.1, every=2.5),
])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("schedule", [
    sch.constant(0.3), sch.step_decay(0.1, every=7, factor=0.3),
    sch.exponential(0.1, rate=0.97, decay_steps=3), sch.inverse_time(0.1, decay=0.2),
    sch.cosine(0.1, total_steps=150, final=0.001),
], ids=lambda s: s.spec["kind"])
def test_a_schedule_keeps_its_spec_and_is_rebuilt_from_it(schedule):
    spec = sch.describe(schedule)
    rebuilt = sch.from_spec(json.loads(json.dumps(spec)))
    assert sch.describe(rebuilt) == spec
    assert [rebuilt(t) for t in STEPS] == [schedule(t) for t in STEPS]


def test_describe_a_number_or_a_function_of_your_own():
    assert sch.describe(0.5) == 0.5 and sch.from_spec(0.5) == 0.5
    assert sch.describe(lambda step: 0.1) is None
    with pytest.raises(ValueError, match="unknown schedule kind"):
        sch.from_spec({"kind": "zigzag", "lr": 0.1})
