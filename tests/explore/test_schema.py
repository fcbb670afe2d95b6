"""The explore: section: bad search spaces are refused with the field named; grids are enumerated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tansuo.errors import RecipeError
from tansuo.explore.schema import Range, load_explore, load_explore_recipe
from tests.explore.helpers import explore_raw


def _raw(tmp_path: Path, **explore: Any) -> dict[str, Any]:
    return explore_raw(tmp_path / "bars.npz", tmp_path / "study", **explore)


def _set(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    node = raw["explore"]
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("candidates.0.model", "vit_huge", ["explore.candidates.0.model", "vit_huge"]),
        (
            "candidates.0.space",
            {"embed_dimm": [8, 16]},
            ["explore.candidates.0.space.embed_dimm", "embed_dim"],
        ),
        (
            "candidates.0.space",
            {"embed_dim": {"low": 16, "high": 8}},
            ["explore.candidates.0.space.embed_dim"],
        ),
        ("candidates.0.space", {"embed_dim": []}, ["explore.candidates.0.space.embed_dim", "empty"]),
        ("candidates.1.overrides", {"heads": 2}, ["explore.candidates.1.overrides.heads", "resnet_test"]),
        ("candidates.1.train", {"lrr": 1e-3}, ["explore.candidates.1.train.lrr", "not a train field"]),
        ("candidates.1.colour", "red", ["explore.candidates.1.colour", "unknown field"]),
        ("train", {"out_dir": ["a", "b"]}, ["explore.train.out_dir", "not a field"]),
        ("train", {"lr": {"low": -1, "high": 1, "log": True}}, ["explore.train", "log range needs low > 0"]),
        ("objectives", ["quality", "speed"], ["explore.objectives.1", "speed", "latency"]),
        ("objectives", ["quality", "quality"], ["explore.objectives.1", "twice"]),
        ("constraints", ["latency < 5"], ["explore.constraints.0", "METRIC <= NUMBER"]),
        ("constraints", ["speed <= 5"], ["explore.constraints.0", "unknown metric 'speed'"]),
        ("sampler", "cmaes", ["explore.sampler", "cmaes"]),
        ("variants.1.steps", [{"step": "prune", "heads": 1.5}], ["explore.variants.1.steps.0.prune.heads"]),
        (
            "variants.1.steps",
            [{"step": "quantize"}, {"step": "prune", "heads": 0.5}],
            ["explore.variants.1", "last"],
        ),
        ("variants.1.name", "plain", ["explore.variants.1.name", "twice"]),
        ("variants.1.families", ["gpt"], ["explore.variants.1.families", "'gpt'"]),
        ("budget", {"trials": 0}, ["explore.budget.trials"]),
    ],
)
def test_bad_search_spaces_name_the_field(tmp_path: Path, path: str, value: Any, expected: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        load_explore(_set(_raw(tmp_path), path, value), "r.yaml")
    for fragment in expected:
        assert fragment in str(err.value)


def test_sampled_searches_need_a_budget_and_grids_need_discrete_values(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="explore.budget: give trials and/or minutes"):
        load_explore(_raw(tmp_path, sampler="tpe"), "r.yaml")
    assert load_explore(_raw(tmp_path, sampler="tpe", budget={"minutes": 1}), "r.yaml").sampler == "tpe"
    raw = _raw(tmp_path, train={"lr": {"low": 1e-3, "high": 1e-2, "log": True}})
    with pytest.raises(RecipeError, match="explore.train.lr: a grid needs"):
        load_explore(raw, "r.yaml")
    with pytest.raises(RecipeError, match="explore: r.yaml has no explore"):
        load_explore({k: v for k, v in raw.items() if k != "explore"}, "r.yaml")


def test_base_recipe_errors_keep_their_field_names(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["train"]["lr"] = -1
    with pytest.raises(RecipeError, match="train.lr"):
        load_explore(raw, "r.yaml")


def test_shared_names_only_for_disjoint_families_and_default_sampler(tmp_path: Path) -> None:
    variants = [
        {
            "name": "distilled",
            "families": ["vit"],
            "steps": [{"step": "distill", "overrides": {"num_layers": 1}}],
        },
        {
            "name": "distilled",
            "families": ["resnet"],
            "steps": [{"step": "distill", "overrides": {"width": 4}}],
        },
    ]
    spec = load_explore(_raw(tmp_path, variants=variants, sampler="auto", budget={"trials": 3}), "r.yaml")
    assert spec.sampler == "nsga2"  # two objectives
    assert spec.families == {"vit_test": "vit", "resnet_test": "resnet"}
    assert spec.study_dir == tmp_path / "study"
    one = load_explore(_raw(tmp_path, objectives=["latency"], sampler="auto", budget={"trials": 3}), "r.yaml")
    assert one.sampler == "tpe"


def test_grid_enumerates_every_candidate_combination(tmp_path: Path) -> None:
    raw = _raw(
        tmp_path,
        candidates=[
            {"model": "vit_test", "space": {"embed_dim": [8, 16], "num_layers": {"low": 1, "high": 3}}},
            {"model": "resnet_test", "label": "cnn", "overrides": {"width": 4}},
        ],
        train={"lr": {"low": 0.001, "high": 0.003, "step": 0.001}, "batch_size": 8},
    )
    spec = load_explore(raw, "r.yaml")
    grid = spec.grid()
    assert len(grid) == 2 * 3 * 3 + 3
    assert {"candidate": "cnn", "train.lr": 0.002} in grid
    assert {
        "candidate": "vit_test",
        "vit_test.embed_dim": 16,
        "vit_test.num_layers": 3,
        "train.lr": 0.001,
    } in grid
    assert Range(low=1, high=7, step=3).grid() == [1, 4, 7]


def test_quickstart_recipe_is_valid(tmp_path: Path) -> None:
    spec = load_explore_recipe(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
    assert spec.sampler == "grid" and len(spec.grid()) >= 3
    assert {"plain", "int8", "pruned", "distilled"} <= {v.name for v in spec.explore.variants}
    assert set(spec.families.values()) == {"vit", "resnet"}
