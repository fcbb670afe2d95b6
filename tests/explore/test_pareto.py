"""Pareto fronts, constraints and the recommendation: property tests with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tansuo.explore.pareto import dominates, feasible, pareto_front, recommend, violations
from tansuo.explore.schema import METRICS, parse_constraint
from tests.explore.helpers import figures

DIRS = st.lists(st.sampled_from(["maximize", "minimize"]), min_size=1, max_size=3)


@st.composite
def clouds(draw: st.DrawFn) -> tuple[list[list[float]], list[str]]:
    directions = draw(DIRS)
    # small integers: many ties and duplicates, the cases a front computation gets wrong
    point = st.lists(st.integers(0, 5).map(float), min_size=len(directions), max_size=len(directions))
    return draw(st.lists(point, min_size=0, max_size=25)), directions


@settings(max_examples=300, deadline=None)
@given(clouds())
def test_front_is_exactly_the_non_dominated_points(cloud: tuple[list[list[float]], list[str]]) -> None:
    points, directions = cloud
    front = set(pareto_front(points, directions))
    for i in front:  # no point on the front is dominated by any point
        assert not any(dominates(q, points[i], directions) for q in points)
    for i in set(range(len(points))) - front:  # every point off it is dominated, by a point on the front
        assert any(dominates(points[j], points[i], directions) for j in front)
    if points:
        assert front


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=4), DIRS)
def test_a_point_never_dominates_itself(point: list[float], directions: list[str]) -> None:
    d = (directions * 4)[: len(point)]
    assert not dominates(point, point, d)


def test_dominance_follows_the_directions() -> None:
    assert dominates([0.9, 1.0], [0.8, 2.0], ["maximize", "minimize"])
    assert not dominates([0.9, 3.0], [0.8, 2.0], ["maximize", "minimize"])  # a trade-off
    assert dominates([0.8, 2.0], [0.9, 3.0], ["minimize", "minimize"])
    assert pareto_front([[1, 1], [1, 1], [0, 0]], ["maximize", "maximize"]) == [0, 1]  # ties stay together


def test_constraints_filter_by_metric_units() -> None:
    f = figures(0.96, 4.0, 12.0)  # 96%, 4 ms, 12 MB
    cons = [parse_constraint(c, "x") for c in ("latency <= 5", "size <= 10", "quality >= 0.97")]
    assert violations(f, cons) == pytest.approx([0.0, 2.0, 0.01])
    assert not feasible(f, cons)
    assert feasible(f, cons[:1])
    assert feasible(figures(0.98, 5.0, 10.0), cons)  # bounds are inclusive
    assert str(cons[1]) == "size <= 10 MB"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(80, 100), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=20),
    st.sampled_from([0.0, 1.0, 5.0]),
)
def test_recommendation_is_on_the_front_and_within_the_drop(
    raw: list[tuple[int, int, int]], drop: float
) -> None:
    points = [figures(q / 100, lat, size) for q, lat, size in raw]
    objectives = ["quality", "latency", "size"]
    index, why = recommend(points, objectives, drop)
    values = [[p["quality"], p["latency_ms_p50"], p["size_bytes"]] for p in points]
    directions = [METRICS[o].direction for o in objectives]
    assert index in pareto_front(values, directions)
    best = max(p["quality"] for p in points)
    assert 100 * (best - points[index]["quality"]) <= drop + 1e-9
    # nothing within the drop is faster
    within = [p for p in points if 100 * (best - p["quality"]) <= drop + 1e-9]
    assert points[index]["latency_ms_p50"] == min(p["latency_ms_p50"] for p in within)
    assert "quality points" in why


def test_recommendation_trades_quality_for_speed_only_within_max_drop() -> None:
    points = [figures(0.98, 10.0, 1.0), figures(0.975, 2.0, 1.0), figures(0.95, 0.5, 0.1)]
    assert recommend(points, ["quality", "latency"], 1.0)[0] == 1
    assert recommend(points, ["quality", "latency"], 0.1)[0] == 0
    assert recommend(points, ["quality", "latency"], 5.0)[0] == 2
    assert recommend(points, ["quality"], 5.0)[0] == 0
    assert recommend(points, ["size", "latency"], 0.0)[0] == 2
    assert recommend([], ["quality"], 1.0) is None


def test_a_loss_quality_is_minimised_and_its_drop_is_in_its_own_units() -> None:
    def loss(value: float, latency: float) -> dict:
        return {**figures(0.0, latency, 1.0), "quality": value}

    points = [loss(1.20, 9.0), loss(1.45, 2.0), loss(2.50, 0.5)]
    assert recommend(points, ["quality", "latency"], 0.3, "minimize")[0] == 1  # 0.25 worse, 4.5x faster
    assert recommend(points, ["quality", "latency"], 0.1, "minimize")[0] == 0
    assert recommend(points, ["quality"], 5.0, "minimize")[0] == 0
    index, why = recommend(points, ["quality", "latency"], 0.3, "minimize")
    assert "best (1.2)" in why and "within 0.3 in quality" in why


def test_language_model_studies_minimise_their_loss(tmp_path) -> None:
    from tansuo.explore.schema import load_explore

    raw = {
        "task": "lm",
        "data": {"path": str(tmp_path / "corpus.txt"), "block_size": 16},
        "train": {"max_steps": 5},
        "explore": {
            "candidates": [{"model": "gpt_test"}],
            "objectives": ["quality", "latency"],
            "budget": {"trials": 2},
        },
    }
    spec = load_explore(raw, "lm.yaml")
    assert spec.quality == "minimize" and spec.directions == ["minimize", "minimize"]
