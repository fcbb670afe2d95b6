"""A study's trials as the points a scaling law is fitted to, read from its results.json.

``tansuo explore`` records ``scaling`` for every trial (:func:`tansuo.measure.flops.training_record`): N,
D, FLOPs, MFU, seconds and the validation figures; the trial's plain variant adds its measured batch-1
latency. Only finished trials with a scaling record and the chosen metric count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tansuo.errors import TansuoError

#: the fewest trials, sizes and token counts a fit of the law's five parameters is attempted with
MIN_TRIALS, MIN_SIZES, MIN_BUDGETS = 6, 3, 2


class PlanError(TansuoError):
    """A study cannot be planned from as asked (no results, too few trials, an unknown metric or machine)."""


@dataclass(frozen=True)
class Point:
    """One trial of the study, as the planner uses it."""

    trial: int
    candidate: str
    params: int  # N: non-embedding parameters
    tokens: int  # D: units trained on
    value: float  # the fitted metric on the validation split
    record: dict[str, Any]  # the trial's whole scaling record
    latency_ms: float | None  # the plain variant's batch-1 latency p50
    latency_threads: int | None


def read_results(study: Path) -> dict[str, Any]:
    """``STUDY/results.json`` (or the file itself), with a clear error where there is none."""
    path = Path(study)
    path = path if path.suffix == ".json" else path / "results.json"
    if not path.is_file():
        raise PlanError(
            f"{path} not found: give a study folder of `tansuo explore` (for example "
            "runs/explore-shakespeare-scaling); `tansuo report STUDY` writes results.json for a study "
            "still running or stopped early"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON ({e}); rewrite it with `tansuo report STUDY`") from None


def _latencies(results: dict[str, Any]) -> dict[int, tuple[float, int]]:
    """Per trial, the batch-1 latency p50 and threads of its uncompressed variant."""
    out = {}
    for row in results.get("variants", []):
        f = row.get("figures") or {}
        if row.get("status") == "ok" and not row.get("steps") and "latency_ms_p50" in f:
            out.setdefault(row["trial"], (float(f["latency_ms_p50"]), int(f.get("threads", 1))))
    return out


def study_points(results: dict[str, Any], metric: str = "loss") -> list[Point]:
    """Every finished trial with a scaling record and ``metric``.

    Raises:
        PlanError: No trial recorded scaling figures, or none recorded ``metric`` (naming those recorded).
    """
    latency = _latencies(results)
    points, recorded = [], set()
    scaled = [t for t in results.get("trials", []) if t.get("state") == "complete" and t.get("scaling")]
    if not scaled:
        raise PlanError(
            "no finished trial of this study recorded scaling figures (N, D, FLOPs): run it with this "
            "tansuo's `tansuo explore` (see recipes/shakespeare-scaling.yaml)"
        )
    for t in scaled:
        s = t["scaling"]
        recorded.update(s.get("val", {}))
        if metric not in s.get("val", {}) or not s.get("tokens"):
            continue
        lat = latency.get(t["number"])
        points.append(
            Point(
                trial=t["number"],
                candidate=t.get("candidate") or s.get("model", "?"),
                params=int(s["params"]),
                tokens=int(s["tokens"]),
                value=float(s["val"][metric]),
                record=s,
                latency_ms=None if lat is None else lat[0],
                latency_threads=None if lat is None else lat[1],
            )
        )
    if not points:
        raise PlanError(
            f"no trial recorded the metric {metric!r}; choose --metric from {sorted(recorded) or 'none'}"
        )
    return points


def check_enough(points: list[Point], what: str = "the study") -> None:
    """Enough trials, sizes and token counts to fit five parameters, or a PlanError saying what is short."""
    sizes, budgets = {p.params for p in points}, {p.tokens for p in points}
    if len(points) < MIN_TRIALS or len(sizes) < MIN_SIZES or len(budgets) < MIN_BUDGETS:
        raise PlanError(
            f"too few trials to fit L(N, D) = E + A/N^alpha + B/D^beta: {what} has {len(points)} trials over "
            f"{len(sizes)} model sizes and {len(budgets)} token counts; the fit needs at least {MIN_TRIALS} "
            f"trials over {MIN_SIZES} sizes and {MIN_BUDGETS} token counts (a grid of sizes x budgets, as "
            "recipes/shakespeare-scaling.yaml runs)"
        )
