"""Pareto fronts, constraints and the recommendation, on plain numbers (no Optuna, no torch).

A point is a tuple of objective values; ``directions`` says per objective whether larger ("maximize") or
smaller ("minimize") is better. ``a`` dominates ``b`` when it is at least as good in every objective and
strictly better in one. The front is the set of points no other point dominates; equal points do not
dominate each other, so duplicates stay on the front together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tansuo.explore.schema import METRICS, Constraint


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether ``a`` is no worse than ``b`` everywhere and strictly better somewhere."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order (O(n^2), fine for thousands of points)."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)
    ]


def value(figures: dict[str, Any], metric: str) -> float:
    """A variant's value of ``metric`` (a name of :data:`METRICS`) in that metric's unit."""
    m = METRICS[metric]
    return float(figures[m.key]) * m.scale


def violations(figures: dict[str, Any], constraints: Sequence[Constraint]) -> list[float]:
    """How far a variant is outside each constraint (0 where satisfied); feasible when all are 0."""
    return [c.violation(value(figures, c.metric)) for c in constraints]


def feasible(figures: dict[str, Any], constraints: Sequence[Constraint]) -> bool:
    return not any(violations(figures, constraints))


def quality_text(v: float, quality: str = "maximize") -> str:
    """A quality value as reports show it: x100 for metrics to maximise (accuracy), as is for losses."""
    return f"{100 * v:.2f}" if quality == "maximize" else f"{v:.4g}"


def quality_drop(best: float, v: float, quality: str = "maximize") -> float:
    """How much worse ``v`` is than ``best``: in points (x100) for metrics to maximise, in the metric's own
    units for losses (the unit of ``recommend.max_drop``)."""
    return 100 * (best - v) if quality == "maximize" else v - best


def recommend(
    points: Sequence[dict[str, Any]], objectives: Sequence[str], max_drop: float, quality: str = "maximize"
) -> tuple[int, str] | None:
    """The point to ship, and why, among ``points`` (figures dicts, already filtered to the feasible ones).

    ``quality`` is the quality metric's direction (the task's: accuracy is maximised, a loss minimised).
    With quality among the objectives: the points within ``max_drop`` of the best quality (points x100, or the
    loss's units) qualify; among them the best by the other objectives in the order listed, then by quality.
    Without quality: the best by the objectives in order. Either way the pick is on the Pareto front of
    ``points``. Returns (index, reason), or None when there are no points.
    """
    if not points:
        return None
    others = [o for o in objectives if o != "quality"]

    def key(i: int) -> tuple[float, ...]:
        out = []
        for o in [*others, "quality"] if "quality" in objectives else list(objectives):
            v = value(points[i], o)
            direction = quality if o == "quality" else METRICS[o].direction
            out.append(-v if direction == "maximize" else v)
        return tuple(out)

    indices = list(range(len(points)))
    if "quality" in objectives:
        qs = [value(p, "quality") for p in points]
        best_q = max(qs) if quality == "maximize" else min(qs)
        indices = [i for i in indices if quality_drop(best_q, qs[i], quality) <= max_drop + 1e-9]
    pick = min(indices, key=key)
    p = points[pick]
    units = "quality points" if quality == "maximize" else "in quality"
    if "quality" in objectives and others:
        drop = quality_drop(best_q, value(p, "quality"), quality)
        first = others[0]
        why = (
            f"{len(indices)} of {len(points)} feasible models are within {max_drop:g} {units} of the "
            f"best ({quality_text(best_q, quality)}); this one gives up {drop:.3g} and has the lowest "
            f"{METRICS[first].title} among them ({value(p, first):.3g} {METRICS[first].unit})"
        )
    elif "quality" in objectives:
        shown = quality_text(value(p, "quality"), quality)
        why = f"the best quality among {len(points)} feasible models ({shown})"
    else:
        first = objectives[0]
        why = (
            f"the lowest {METRICS[first].title} among {len(points)} feasible models "
            f"({value(p, first):.3g} {METRICS[first].unit})"
        )
    return pick, why
