"""Client sampling: a pure function of (seed, round)."""

import pytest
from fedpipe.tasks.sampling import sample_clients, sample_size

CLIENTS = [str(i) for i in range(100)]


def test_same_seed_and_round_same_sample_any_input_order():
    a = sample_clients(CLIENTS, 3, seed=7, fraction=0.1)
    b = sample_clients(list(reversed(CLIENTS)), 3, seed=7, fraction=0.1)
    assert a == b and len(a) == 10 and len(set(a)) == 10 and set(a) <= set(CLIENTS)


def test_rounds_and_seeds_change_the_sample():
    samples = {tuple(sample_clients(CLIENTS, r, seed=0, count=5)) for r in range(20)}
    assert len(samples) > 15
    assert sample_clients(CLIENTS, 0, 0, count=5) != sample_clients(CLIENTS, 0, 1, count=5)


def test_every_client_when_nothing_given_or_fraction_one():
    assert sample_clients(CLIENTS, 0, 0) == sorted(CLIENTS)
    assert sample_clients(CLIENTS, 5, 0, fraction=1.0) == sorted(CLIENTS)


@pytest.mark.parametrize(("fraction", "count", "expected"),
                         [(0.001, None, 1), (0.25, None, 25), (None, 500, 100), (None, 3, 3)])
def test_sample_size(fraction, count, expected):
    assert sample_size(100, fraction=fraction, count=count) == expected


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}, {"count": 0},
                                    {"fraction": 0.5, "count": 2}])
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_size(10, **kwargs)
