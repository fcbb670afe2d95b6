"""``privacy`` (the membership-inference audit's AUC) as an explore objective and constraint, and epsilon in
the reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tansuo.errors import RecipeError
from tansuo.explore.schema import load_explore
from tests.explore.helpers import explore_raw
from tests.helpers import run


def _raw(npz: Path, study: Path) -> dict:
    raw = explore_raw(npz, study)
    private = {"target_epsilon": 1.0, "delta": 1e-3, "accountant": "rdp"}
    raw["train"].update(max_steps=6, grad_clip=0.0)
    raw["data"].update(mean=[3.0], std=[4.0])  # public statistics, as a private run needs
    raw["explore"].update(
        candidates=[
            {"model": "vit_test", "label": "vit"},
            {"model": "vit_test", "label": "vit-dp", "train": {"privacy": private}},
        ],
        variants=[{"name": "plain"}],
        objectives=["quality", "privacy"],
        constraints=["privacy <= 0.9"],
        audit={"examples": 40},
    )
    return raw


def test_privacy_is_an_objective_and_a_constraint(image_npz: Path, tmp_path: Path) -> None:
    spec = load_explore(_raw(image_npz, tmp_path / "study"), "r.yaml")
    assert spec.directions == ["maximize", "minimize"]
    assert str(spec.constraints[0]) == "privacy <= 0.9 AUC"
    raw = _raw(image_npz, tmp_path / "study")
    raw["explore"]["audit"] = {"reference_models": -1}
    with pytest.raises(RecipeError, match="explore.audit.reference_models"):
        load_explore(raw, "r.yaml")


def test_privacy_needs_a_task_with_single_examples(text_file: Path, tmp_path: Path) -> None:
    from tests.helpers import lm_recipe

    raw = lm_recipe(text_file, tmp_path / "run")
    raw["explore"] = {"candidates": [{"model": "gpt_test"}], "objectives": ["quality", "privacy"],
                      "budget": {"trials": 1}, "study": str(tmp_path / "study")}  # fmt: skip
    with pytest.raises(RecipeError, match="'lm' task does not address"):
        load_explore(raw, "r.yaml")


@pytest.mark.integration  # a whole study: two trainings, two measurements in fresh processes, two audits
def test_a_study_audits_each_model_and_reports_epsilon(image_npz, tmp_path, monkeypatch, capsys) -> None:
    study = tmp_path / "study"
    recipe = tmp_path / "explore.yaml"
    recipe.write_text(yaml.safe_dump(_raw(image_npz, study)))
    code, out, err = run(["explore", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study / "results.json").read_text())
    rows = {r["candidate"]: r for r in results["variants"]}
    assert set(rows) == {"vit", "vit-dp"}
    for r in rows.values():
        assert 0.0 <= r["values"]["privacy"] <= 1.0
        assert r["feasible"] == (r["values"]["privacy"] <= 0.9)
    assert "epsilon" not in rows["vit"]["values"]
    assert 0 < rows["vit-dp"]["values"]["epsilon"] <= 1.0
    md = (study / "report.md").read_text()
    assert "MIA AUC" in md and "epsilon" in md
