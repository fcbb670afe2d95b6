import json
import os
from pathlib import Path

import pytest
import torch

from tansuo.atomic import atomic_write_dir
from tansuo.bundle import load_bundle, save_bundle
from tansuo.errors import BundleError
from tansuo.integrity import write_manifest
from tansuo.models import create_model
from tests.helpers import image_recipe, lm_recipe, recipe_and_task


@pytest.mark.parametrize("kind", ["lm", "image"])
def test_round_trip_gives_identical_outputs(
    kind: str, tmp_path: Path, text_file: Path, image_npz: Path
) -> None:  # noqa: E501
    raw = lm_recipe(text_file, tmp_path) if kind == "lm" else image_recipe(image_npz, tmp_path)
    recipe, task = recipe_and_task(raw)
    model = create_model(recipe.model.name, **{**task.model_overrides(), **recipe.model.overrides}).eval()
    save_bundle(tmp_path / "b", model, task, {"val": {"loss": 1.0}}, recipe.model_dump())
    b = load_bundle(tmp_path / "b")
    x = model.example_input(3)
    assert torch.equal(model(x), b.model(x))
    assert b.metrics == {"val": {"loss": 1.0}}
    assert b.task.model_overrides() == task.model_overrides()
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["task"] == kind
    if kind == "lm":  # the bundle's tokenizer is the one the model was trained with
        assert b.task.tokenizer.get_vocab() == task.tokenizer.get_vocab()
    assert (
        b.task.evaluate(b.model, b.task.heldout_split, 8, torch.device("cpu")).keys()
        == task.evaluate(model, task.heldout_split, 8, torch.device("cpu")).keys()
    )


def test_replacing_a_bundle_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "bundle"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("old"))

    def fail(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise OSError("killed")

    with pytest.raises(OSError):
        atomic_write_dir(target, fail)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_interrupted_swap_points_to_the_old_copy(tmp_path: Path) -> None:
    (tmp_path / "bundle.old").mkdir()
    with pytest.raises(BundleError, match="bundle.old"):
        load_bundle(tmp_path / "bundle")


def test_unknown_task_and_format(tmp_path: Path, image_npz: Path) -> None:
    recipe, task = recipe_and_task(image_recipe(image_npz, tmp_path))
    model = create_model("vit_test", **task.model_overrides())
    save_bundle(tmp_path / "b", model, task)
    info = json.loads((tmp_path / "b" / "task.json").read_text())
    (tmp_path / "b" / "task.json").write_text(json.dumps({**info, "task": "poetry"}))
    write_manifest(tmp_path / "b")  # as another tansuo (or a plugin's task) would have written it
    with pytest.raises(BundleError, match="unknown task 'poetry'"):
        load_bundle(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "format": 99}))
    write_manifest(tmp_path / "b")
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize(
    ("field", "value"),
    [("embed_dim", "wide"), ("num_layers", -1), ("no_such_field", 1)],
    ids=["type", "value", "name"],
)
def test_a_config_the_model_cannot_be_built_from_names_config_json(
    field: str, value: object, tmp_path: Path, image_npz: Path
) -> None:
    _, task = recipe_and_task(image_recipe(image_npz, tmp_path))
    save_bundle(tmp_path / "b", create_model("vit_test", **task.model_overrides()), task)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["config"][field] = value
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    write_manifest(tmp_path / "b")
    with pytest.raises(BundleError, match="config.json does not describe a model"):
        load_bundle(tmp_path / "b")


def test_bundle_files_are_not_pickles(tmp_path: Path, image_npz: Path) -> None:
    _, task = recipe_and_task(image_recipe(image_npz, tmp_path))
    save_bundle(tmp_path / "b", create_model("vit_test", **task.model_overrides()), task)
    for f in (tmp_path / "b").iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK", f  # neither a pickle nor a torch.save zip
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
