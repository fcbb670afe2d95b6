"""Results from a study's records, the recommendation, report.md / report.html / results.json, best/."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tansuo.explore.report import render_html, write_report
from tansuo.explore.results import collect, copy_best
from tests.explore.helpers import fake_study, spec_for


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text("{}")
    (bundle / "model.safetensors").write_bytes(b"weights")
    return bundle


def test_collect_front_and_recommendation(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    results = collect(fake_study(spec, _bundle(tmp_path)), spec, "memory")
    assert results["counts"] == {"complete": 2, "fail": 1, "running": 0}
    # (quality, latency): 0/plain (.90, 2) 0/int8 (.89, 1) 1/plain (.95, 3) 1/int8 (.80, 2.5, dominated)
    assert sorted(results["pareto"]) == ["0/int8", "0/plain", "1/plain"]
    assert results["recommended"] == "1/plain"  # nothing else is within 1 point of 95%
    assert "within 1 quality points" in results["why"]
    failed = [t for t in results["trials"] if t["state"] == "fail"]
    assert failed[0]["reason"].startswith("NaN loss")


def test_constraints_change_the_front_and_the_pick(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, constraints=["latency <= 2"], recommend={"max_drop": 2.0})
    results = collect(fake_study(spec, _bundle(tmp_path)), spec, "memory")
    infeasible = {r["id"] for r in results["variants"] if not r["feasible"]}
    assert infeasible == {"1/plain", "1/int8"}
    assert sorted(results["pareto"]) == ["0/int8", "0/plain"]
    assert results["recommended"] == "0/int8"  # within 2 points of 90% and faster
    spec = spec_for(tmp_path, constraints=["quality >= 0.99"])
    results = collect(fake_study(spec, _bundle(tmp_path)), spec, "memory")
    assert results["recommended"] is None and "constraints" in results["why"]


def test_report_files_and_best_bundle(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    bundle = _bundle(tmp_path)
    results = collect(fake_study(spec, bundle), spec, "memory")
    paths = write_report(results, tmp_path / "study")
    assert json.loads(paths["json"].read_text())["recommended"] == "1/plain"
    md = paths["md"].read_text()
    assert "## Pareto front" in md and "**1/plain**" in md and "trial 2 (vit_test): NaN loss" in md
    best = copy_best(results, tmp_path / "study")
    assert best == tmp_path / "study" / "best"
    assert (best / "model.safetensors").read_bytes() == b"weights"


def test_html_is_self_contained_with_plots_and_every_variant(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    page = render_html(collect(fake_study(spec, _bundle(tmp_path)), spec, "memory"))
    for plot in (
        "plot-quality-latency",
        "plot-quality-size",
        "plot-curves-train_loss",
        "plot-curves-val_accuracy",
    ):
        assert f'id="{plot}"' in page
    assert page.count('class="point') == 2 * 4  # every measured variant in both scatter plots
    assert page.count('class="point pareto"') == 2 * 3
    # nothing is fetched: no src/href attributes, and the only URL is the SVG namespace
    assert not re.search(r"\b(src|href)=", page)
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    rows = re.findall(r"<tr class=", page)
    assert len(rows) == 4 + 1  # four variants and the failed trial
