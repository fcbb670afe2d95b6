from pathlib import Path

import pytest
import yaml

from tansuo.errors import RecipeError
from tansuo.models import create_model
from tansuo.recipe import apply_overrides, load_recipe, validate_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"digits-vit.yaml", "digits-cnn.yaml", "shakespeare-char.yaml"} <= names
    assert {"sst2-minilm.yaml", "sst2-scratch.yaml", "sst2-mlm.yaml", "mlm-pretrain.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_instantiates(path: Path) -> None:
    if path.read_text().startswith("# tansuo explore "):
        return _check_explore_recipe(path)
    recipe, data = load_recipe(path)
    model = create_model(recipe.model.name, **recipe.model.overrides)
    assert model.num_params() > 0
    # each recipe is headed by the command that runs it
    assert path.read_text().startswith("# tansuo train " + "recipes/" + path.name)


def _check_explore_recipe(path: Path) -> None:
    """An explore recipe: headed by `tansuo explore`, valid, and every candidate builds at every grid point
    (or, for a sampled search, with the first choice / low end of each searched field)."""
    from tansuo.explore.schema import Range, load_explore_recipe

    assert path.read_text().startswith("# tansuo explore " + "recipes/" + path.name)
    spec = load_explore_recipe(path)
    for c in spec.explore.candidates:
        if spec.sampler == "grid":
            points = [p for p in spec.grid() if p["candidate"] == c.name]
            fields = [
                {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(c.name + ".")} for p in points
            ]
        else:
            fields = [
                {
                    k: v[0] if isinstance(v, list) else v.low if isinstance(v, Range) else v
                    for k, v in c.space.items()
                }
            ]
        for f in fields:
            assert create_model(c.model, **{**c.overrides, **f}).num_params() > 0


def test_set_overrides_nested_field_with_yaml_value() -> None:
    raw = {"train": {"lr": 1e-3}}
    out = apply_overrides(raw, ["train.lr=3e-4", "train.device=cpu", "data.splits=[0.5, 0.25, 0.25]"])
    assert out["train"]["lr"] == 3e-4 and out["train"]["device"] == "cpu"
    assert out["data"]["splits"] == [0.5, 0.25, 0.25]
    assert raw["train"]["lr"] == 1e-3  # the input is not changed


def test_set_without_equals_is_an_error() -> None:
    with pytest.raises(RecipeError, match="FIELD=VALUE"):
        apply_overrides({}, ["train.lr"])


def _raw() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "recipes/digits-vit.yaml").read_text())


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["train.lr=-1"], ["train.lr", "greater than 0", "-1"]),
        (["train.lrr=1"], ["train.lrr", "unknown field"]),
        (["train.schedule=linear"], ["train.schedule", "cosine", "'linear'"]),
        (["data.max_shift=-2"], ["data.max_shift", "-2"]),
        (["data.source=png"], ["data.source", "digits"]),
        (["data.splits=[0.5, 0.5, 0.5]"], ["data.splits", "sum to 1"]),
        (["task=poetry"], ["task", "image", "lm", "'poetry'"]),
    ],
)
def test_bad_field_names_path_value_and_allowed(sets: list[str], expected: list[str]) -> None:
    with pytest.raises(RecipeError) as err:
        validate_recipe(apply_overrides(_raw(), sets))
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_recipe_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_needs_steps_or_epochs() -> None:
    raw = _raw()
    del raw["train"]["epochs"]
    with pytest.raises(RecipeError, match="max_steps or train.epochs"):
        validate_recipe(raw)


def test_data_dir_resolves_relative_data_files(tmp_path: Path) -> None:
    from tansuo.recipe import apply_data_dir

    raw = {
        "task": "classify",
        "data": {"train": "train.tsv", "test": "/abs/dev.tsv", "tokenizer": "vocab.txt"},
    }
    out = apply_data_dir(raw, tmp_path)
    assert out["data"]["train"] == str(tmp_path / "train.tsv")
    assert out["data"]["test"] == "/abs/dev.tsv"  # absolute paths are kept
    assert out["data"]["tokenizer"] == "vocab.txt"  # not a data file
    assert raw["data"]["train"] == "train.tsv"  # the input is not changed
    lm = apply_data_dir({"task": "lm", "data": {"path": "input.txt"}}, tmp_path)
    assert lm["data"]["path"] == str(tmp_path / "input.txt")


def test_data_dir_errors_name_the_fix(tmp_path: Path) -> None:
    from tansuo.recipe import apply_data_dir

    with pytest.raises(RecipeError, match="not a folder"):
        apply_data_dir({"task": "lm", "data": {"path": "x.txt"}}, tmp_path / "missing")
    with pytest.raises(RecipeError, match="names no data file.*--data"):
        apply_data_dir({"task": "lm", "data": {}}, tmp_path)
    with pytest.raises(RecipeError, match="task"):
        apply_data_dir({"task": "nope", "data": {}}, tmp_path)


def test_sst2_recipes_read_their_files_from_data_dir(tmp_path: Path) -> None:
    for name in ("sst2-minilm.yaml", "sst2-scratch.yaml", "sst2-mlm.yaml"):
        _, data = load_recipe(Path("recipes") / name, data_dir=tmp_path)
        assert data.train == str(tmp_path / "train.tsv") and data.test == str(tmp_path / "dev.tsv")
    _, data = load_recipe("recipes/mlm-pretrain.yaml", data_dir=tmp_path)
    assert data.path == str(tmp_path / "train.tsv")
