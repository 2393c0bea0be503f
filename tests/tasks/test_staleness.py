"""Bounded-staleness bookkeeping: the bound holds, S = 0 is synchronous, S > 0 waits less."""

import numpy as np
import pytest
from fedpipe.tasks import staleness


def test_groups_are_the_round_robin_of_blocks():
    assert staleness.group_blocks(5, 2) == [[0, 2, 4], [1, 3]]
    assert staleness.group_blocks(2, 4) == [[0], [1]]  # never an empty group
    with pytest.raises(ValueError):
        staleness.group_blocks(0, 1)


def test_may_step_needs_every_group_within_the_bound():
    assert not staleness.may_step(3, [3, staleness.NO_VERSION], 5)
    assert staleness.may_step(3, [3, 1], 2)
    assert not staleness.may_step(3, [3, 0], 2)
    assert staleness.may_step(3, [3, 3], 0) and not staleness.may_step(3, [3, 2], 0)
    assert staleness.staleness_stats(4, [4, 2]) == {"staleness_mean": 1.0, "staleness_max": 2}


def test_only_idle_groups_behind_the_version_are_dispatched():
    # group 0 is fresh and waits, 1 is behind and idle, 2 is still computing
    assert staleness.to_dispatch(4, [4, 3, 1], [False, False, True]) == [1]


def test_virtual_durations_are_reproducible_and_heterogeneous():
    a = [staleness.virtual_duration(7, g, 0) for g in range(8)]
    assert a == [staleness.virtual_duration(7, g, 0) for g in range(8)]
    assert max(a) / min(a) > 1.5
    assert staleness.next_arrival(np.array([3.0, 1.0, 1.0]), [True, True, True]) == 1
    assert staleness.next_arrival(np.array([3.0, 1.0, 1.0]), [True, False, False]) == 0


@pytest.mark.parametrize("bound", [0, 1, 2, 4])
def test_staleness_never_exceeds_the_bound(bound):
    for seed in range(5):
        run = staleness.simulate(seed, n_groups=4, max_staleness=bound, steps=60)
        assert run["staleness"].max() <= bound
        assert np.all(np.diff(run["time"]) >= 0)


def test_bound_zero_is_synchronous_and_a_bound_buys_time():
    sync = staleness.simulate(3, n_groups=4, max_staleness=0, steps=50)
    assert not sync["staleness"].any()  # every step adds every group at the current version
    times = [staleness.simulate(3, 4, s, 50)["time"][-1] for s in (0, 2, 4)]
    assert times[0] > times[1] > times[2]
    assert staleness.simulate(3, 4, 4, 50)["staleness"].max() > 0
