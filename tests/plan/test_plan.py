"""``tansuo plan`` on a made-up study whose losses follow a known law: the backtest, the projections (budget,
target, size), time, money, inference, the report files, and the errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tansuo.plan import PlanError, PlanOptions, make_plan, parse_count, plan_study
from tansuo.plan.hardware import load_hardware
from tests.helpers import run
from tests.plan.helpers import SIZES, TRUE, synthetic_results, write_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("plan") / "study", synthetic_results())


def test_a_plan_of_a_size_a_budget_and_a_target(study: Path) -> None:
    options = PlanOptions(
        size=1e7, budget=1e17, target=1.6, holdout="largest", bootstrap=20, accelerators=["H100-SXM", "L4"]
    )
    plan = make_plan(study, options)
    law = plan["fit"]["law"]
    assert law["alpha"] == pytest.approx(TRUE.alpha, abs=0.05) and plan["fit"]["good"]
    assert len(plan["points"]) == len(SIZES) * 4

    h = plan["holdout"]  # fitted without the largest size, asked about it
    largest = [p for p in plan["points"] if p["params"] == h["held_out"]]
    assert h["held_out"] == max(p["params"] for p in plan["points"]) and len(h["trials"]) == len(largest)
    for r in h["trials"]:
        assert r["error"] == pytest.approx(r["value"] / r["measured"] - 1)
        assert abs(r["error"]) < 0.02 and r["covered"] == (r["pi_low"] <= r["measured"] <= r["pi_high"])
    assert h["headline"]["tokens"] == max(r["tokens"] for r in h["trials"])
    assert h["fit"]["law"] != plan["fit"]["law"]  # a fit of its own, without those trials

    opt = plan["optimal"]
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(1e17)
    lo, hi = opt["params_interval"]
    assert lo <= opt["params"] <= hi

    target = plan["target"]
    assert target["flops"] > 0 and 6 * target["params"] * target["tokens"] == pytest.approx(target["flops"])

    names = [s["name"] for s in plan["scenarios"]]
    assert names == ["asked", "budget", "target"]
    asked = plan["scenarios"][0]
    assert asked["params"] == 1e7 and asked["why"].startswith("tokens: compute-optimal")
    assert asked["shape"]["params"] == pytest.approx(1e7, rel=0.15)
    accs = {a.name: a for a in load_hardware()}
    for row in asked["hardware"]:  # time and money from FLOPs, the peak, the study's MFU (0.4) and the price
        acc = accs[row["name"]]
        assert row["mfu"] == pytest.approx(0.4) and row["precision"] == "bf16"
        hours = asked["flops"] / (acc.peak_bf16_tflops * 1e12 * 0.4 * 8) / 3600
        assert row["hours"] == pytest.approx(hours) and row["cost"] == pytest.approx(
            hours * 8 * acc.price_per_hour
        )
        assert [(m["strategy"], m["checkpointing"]) for m in row["memory"]] == [
            ("ddp", False),
            ("ddp", True),
            ("fsdp", False),
            ("fsdp", True),
        ]
        inf = row["inference"]
        assert inf["efficiency"] == pytest.approx(0.05)  # the share of peak the synthetic latencies imply
        assert inf["cost_per_1000"] == pytest.approx(
            1000 * inf["seconds_per_request"] / 3600 * acc.price_per_hour
        )


def test_the_mfu_can_be_given_and_no_request_gives_the_studys_largest_trial(study: Path) -> None:
    plan = make_plan(study, PlanOptions(mfu=0.5, bootstrap=0, accelerators=["A100-80GB"], precision="fp32"))
    assert plan["mfu"]["value"] == 0.5 and plan["mfu"]["measured"] == pytest.approx(0.4)
    (s,) = plan["scenarios"]
    top = max(plan["points"], key=lambda p: (p["params"], p["tokens"]))
    assert s["name"] == "study" and (s["params"], s["tokens"]) == (top["params"], top["tokens"])
    assert s["flops"] == pytest.approx(top["flops"])  # the same shape as the trial: the same FLOPs
    assert s["hardware"][0]["precision"] == "fp32"


def test_report_files(study: Path, tmp_path: Path) -> None:
    plan, paths = plan_study(
        study, PlanOptions(budget=1e16, holdout="largest", bootstrap=5), tmp_path / "out"
    )
    assert json.loads(paths["json"].read_text())["optimal"]["budget"] == 1e16
    md = paths["md"].read_text()
    assert "## The law" in md and "## Backtest" in md and "Chinchilla" in md
    page = paths["html"].read_text()
    for plot in ("plot-tokens", "plot-parity", "plot-frontier", "plot-holdout"):
        assert f'id="{plot}"' in page
    svg = re.search(r'<svg id="plot-tokens".*?</svg>', page).group(0)
    assert svg.count('class="point"') == len(plan["points"]) and svg.count('class="fit"') == len(SIZES)
    assert "<script" not in page and "http" not in page.split("</style>")[1].split("xmlns")[0]


def test_an_accuracy_study_takes_the_saturating_form(tmp_path: Path) -> None:
    from tansuo.plan.fit import Law

    err = Law(E=0.05, A=4.0, B=9.0, alpha=0.3, beta=0.35)
    folder = write_study(
        tmp_path / "acc", synthetic_results(err, metric="accuracy", transform=lambda e: 1 - e)
    )
    plan = make_plan(folder, PlanOptions(metric="accuracy", target=0.99, bootstrap=0, accelerators=["L4"]))
    assert plan["direction"] == "maximize" and plan["fit"]["form"] == "saturating"
    assert plan["target"]["flops"] is None and "levels off" in plan["target"]["why"]  # above 1 - E


def test_bad_input_is_a_clear_error(study: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="results.json not found"):
        make_plan(tmp_path / "nothing", PlanOptions())
    with pytest.raises(PlanError, match="choose --metric from.*loss"):
        make_plan(study, PlanOptions(metric="accuracy"))
    small = write_study(tmp_path / "small", synthetic_results(sizes=SIZES[:2]))
    with pytest.raises(PlanError, match="too few trials.*2 model sizes"):
        make_plan(small, PlanOptions())
    three = write_study(tmp_path / "three", synthetic_results(sizes=SIZES[:3]))
    with pytest.raises(PlanError, match="without its largest size"):
        make_plan(three, PlanOptions(holdout="largest", bootstrap=0))
    assert parse_count("10M", "--size") == 1e7 and parse_count("1.5b", "--size") == 1.5e9
    assert parse_count("2T", "--tokens") == 2e12 and parse_count("1e18", "--budget") == 1e18
    with pytest.raises(PlanError, match="--size 'ten'"):
        parse_count("ten", "--size")


def test_cli_exit_codes(study: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = run(
        ["plan", str(study), "--size", "10M", "--holdout", "largest", "--bootstrap", "5", "--accelerator",
         "L4", "--out", str(tmp_path / "p")],
        monkeypatch,
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert (
        "backtest without N = 1.55M" in out and "L4 (bf16)" in out and (tmp_path / "p" / "plan.md").is_file()
    )
    for args, message in (
        (["--accelerator", "B200"], "no accelerator named 'B200'"),
        (["--size", "ten"], "expected a positive number"),
        (["--holdout", "smallest"], "the one backtest is 'largest'"),
        (["--metric", "bleu"], "choose --metric"),
    ):
        code, _, err = run(["plan", str(study), "--bootstrap", "0", *args], monkeypatch, capsys)
        assert code == 2 and message in " ".join(err.split()), (args, err)
    code, _, err = run(["plan", str(tmp_path / "none")], monkeypatch, capsys)
    assert code == 2 and "results.json not found" in " ".join(err.split())


def test_a_law_without_an_optimum_refuses_what_needs_one() -> None:
    from types import SimpleNamespace

    from tansuo.plan.fit import Law
    from tansuo.plan.project import _scenarios

    flat = SimpleNamespace(law=Law(E=1.0, A=10.0, B=5.0, alpha=0.3, beta=0.0), form="loss", ceiling=0.0)
    with pytest.raises(PlanError, match="flat exponent.*give both --size and --tokens"):
        _scenarios(flat, [], PlanOptions(budget=1e18))
    (asked,) = _scenarios(flat, [], PlanOptions(size=1e7, tokens=1e9))  # both given: no optimum needed
    assert (asked["params"], asked["tokens"]) == (1e7, 1e9)
