"""Site-local math: statistics through the aggregation chain equal the pooled ones; schemas."""

from __future__ import annotations

import numpy as np
import pytest
from fedpipe.tasks import aggregate, sites, stats


def _sites(seed: int = 0, n_sites: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [rng.normal(1e3, 5.0, size=(int(rng.integers(1, 60)), 4)) for _ in range(n_sites)]
    parts[1][0, 2] = np.nan  # a missing value
    parts[2][:, 3] = np.nan  # a site without any value in a column
    return parts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_through_the_chain_equal_the_pooled_computation(seed):
    parts = _sites(seed)
    chain = (sites.stats_stage(),)
    states = aggregate.init_states(chain, 0)
    packets = [aggregate.client_side(chain, states, sites.stats_packet(X))[0] for X in parts]
    total, _, measured = aggregate.server_side(chain, states, aggregate.add_packets(*packets))
    got = sites.finish_stats(total)
    pooled = stats.chunk_stats(np.concatenate(parts))
    for key in ("sum", "sumsq", "min", "max"):
        np.testing.assert_allclose(got[key], pooled[key], rtol=1e-12)
    np.testing.assert_array_equal(got["count"], pooled["count"])
    np.testing.assert_array_equal(got["missing"], np.isnan(np.concatenate(parts)).sum(axis=0))
    mean, std = stats.mean_std(pooled)
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(got["var"]), std, rtol=1e-9)
    assert measured == {"stats/sites": len(parts)}


def test_a_non_finite_packet_is_refused_on_its_site():
    chain = (sites.stats_stage(),)
    packet = sites.stats_packet(np.array([[np.inf, 1.0]]))
    assert aggregate.client_side(chain, {"stats": {}}, packet) == (None, "stats: non-finite "
                                                                         "statistics")


def _schema(**changes):
    base = {"task": "binary", "dtype": "float64", "feature_names": ["a", "b", "c"],
            "input_dtypes": {"a": "float64", "b": "float64", "c": "float64"},
            "categorical": {}, "target": "y"}
    return base | changes


@pytest.mark.parametrize(("site", "why"), [
    (_schema(feature_names=["a", "b", "c", "d"]), "extra column(s) d"),
    (_schema(feature_names=["a", "c"]), "missing column(s) b"),
    (_schema(feature_names=["c", "b", "a"]), "the same columns in another order"),
    (_schema(dtype="float32"), "dtype 'float32' where the others have 'float64'"),
    (_schema(input_dtypes={"a": "float64", "b": "object", "c": "float64"}),
     "column b has dtype object where the others have float64"),
])
def test_schema_differences_are_named(site, why):
    assert sites.schema_difference(_schema(), site) == why
    assert sites.schema_digest(site) != sites.schema_digest(_schema())


def test_the_reference_schema_is_the_one_most_sites_share():
    odd = _schema(dtype="float32")
    schemas = {"0": odd, "1": _schema(), "2": _schema()}
    assert sites.reference_schema(schemas, ["0", "1", "2"]) == _schema()
    assert sites.reference_schema({"0": odd, "1": _schema()}, ["0", "1"]) == odd  # tie: first


def test_labels_are_the_union_in_a_fixed_order_and_map_to_it():
    union = sites.union_labels([[3, 1], [2, 1], None])
    assert union == [1, 2, 3] == sites.union_labels([[2, 1], [3, 1]])
    assert sites.union_labels([None, None]) is None
    np.testing.assert_array_equal(sites.label_map([1, 3], union), [0, 2])
    assert sites.union_labels([["b", "a"], ["c"]]) == ["a", "b", "c"]


def test_binary_and_multiclass_sites_agree_on_the_union_of_labels():
    assert sites.schema_difference(_schema(task="multiclass"), _schema()) is None
    assert sites.schema_difference(_schema(task="regression"), _schema()) == (
        "task 'binary' where the others have 'regression'")
    assert sites.agreed_task("binary", [0, 1, 2]) == "multiclass"
    assert sites.agreed_task("regression", None) == "regression"


def test_categories_are_agreed_as_a_union_and_sites_widen_into_it():
    def site(cats):
        return _schema(feature_names=["a", *[f"c={v}" for v in cats], "b"],
                       categorical={"c": cats})

    one, two = site(["x", 2]), site(["y", "x"])
    assert sites.schema_difference(one, two) is None
    assert sites.schema_digest(one) == sites.schema_digest(two)
    union = sites.union_categories([one["categorical"], two["categorical"]])
    assert union == {"c": [2, "x", "y"]}  # numbers first, as one ingest orders them
    features = sites.agreed_features(one, union)
    assert features == ["a", "c=2", "c=x", "c=y", "b"]
    index = sites.feature_map(two["feature_names"], features)
    wide = sites.widen(np.array([[1.0, 0.0, 1.0, 5.0]]), index, len(features))
    np.testing.assert_array_equal(wide, [[1.0, 0.0, 1.0, 0.0, 5.0]])
    assert sites.feature_map(features, features) is None
    other = _schema(feature_names=["a", "c=x", "b"], categorical={"a": ["x"]})
    assert sites.schema_difference(one, other) is not None  # another column is categorical
