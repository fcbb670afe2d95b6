"""train_recipe: a recipe file to a bundle as ``tansuo train`` does it; its hooks, its errors, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tansuo.bundle import load_bundle
from tansuo.errors import RecipeError
from tansuo.recipe import load_recipe, validate_recipe
from tansuo.train.checkpoint import load_checkpoint
from tansuo.train.setup import RunSetup, TrainResult, train_recipe
from tansuo.train.trainer import Trainer
from tests.helpers import Interrupted, image_recipe, interrupt_after, lm_recipe, write_recipe


def test_trains_a_recipe_file_into_a_bundle(image_npz: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", image_recipe(image_npz, tmp_path / "unused", eval_every=10))
    rec, data = load_recipe(path, [f"train.out_dir={tmp_path / 'run'}", "train.max_steps=20"])
    calls: list[tuple[str, object]] = []

    def built(run: RunSetup) -> None:
        assert run.init is None and run.model.num_params() > 0
        calls.append(("built", run))

    def start(trainer: Trainer) -> None:
        assert trainer.step == 0 and trainer.plan.total_steps == 20 and trainer.plan.eval_every == 10
        calls.append(("start", trainer))

    done = train_recipe(rec, data, on_built=built, on_start=start)

    assert isinstance(done, TrainResult)
    assert [name for name, _ in calls] == ["built", "start"]
    assert calls[0][1].task is done.task and calls[0][1].model is done.model and calls[1][1] is done.trainer
    assert done.trainer.step == 20 and done.result["step"] in (10, 20)
    assert done.bundle == tmp_path / "run" / "bundle" and Path(done.result["bundle"]) == done.bundle
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    b = load_bundle(done.bundle)
    assert b.metrics["test"] == done.result["test"]  # the held-back split, measured on the best model
    assert b.task.name == "image"
    recorded = json.loads((done.bundle / "recipe.json").read_text())  # the recipe as trained
    assert recorded["train"]["out_dir"] == str(tmp_path / "run") and recorded["train"]["max_steps"] == 20


def test_data_root_is_where_the_task_prepares_its_files(text_file: Path, tmp_path: Path) -> None:
    rec, data = validate_recipe(lm_recipe(text_file, tmp_path / "run", max_steps=2))
    train_recipe(rec, data, data_root=tmp_path / "shared")
    assert (tmp_path / "shared" / "tokens.bin").is_file()  # a study's trials share one prepared copy
    assert not (tmp_path / "run" / "data").exists()


def test_an_invalid_override_fails_before_any_data_is_prepared(text_file: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", lm_recipe(text_file, tmp_path / "run"))
    with pytest.raises(RecipeError, match="depthh"):
        rec, data = load_recipe(path, ["model.overrides.depthh=3"])
        train_recipe(rec, data)
    assert not (tmp_path / "run").exists()


def test_an_override_the_model_refuses_is_a_recipe_error(text_file: Path, tmp_path: Path) -> None:
    rec, data = validate_recipe(lm_recipe(text_file, tmp_path / "run"))
    rec.model.overrides["depthh"] = 3  # past validation: build_run still refuses it, naming the field
    started: list[Trainer] = []
    with pytest.raises(RecipeError, match="depthh"):
        train_recipe(rec, data, on_start=started.append)
    assert not started and not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_resume_finishes_an_interrupted_run_as_if_uninterrupted(image_npz: Path, tmp_path: Path) -> None:
    def recipe(out: Path) -> tuple:
        return validate_recipe(image_recipe(image_npz, out, max_steps=12, eval_every=6, checkpoint_every=3))

    full = train_recipe(*recipe(tmp_path / "a"))

    with pytest.raises(Interrupted):  # stops inside step 9: the last checkpoint is step 6's
        train_recipe(*recipe(tmp_path / "b"), on_start=lambda trainer: interrupt_after(trainer, 8))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")["trainer"]["step"] == 6

    torch.manual_seed(999)  # a fresh process would have different RNG state: resume must restore it
    resumed = train_recipe(*recipe(tmp_path / "b"), resume=True)
    assert resumed.trainer.step == 12 and resumed.result["step"] == full.result["step"]
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    log = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "end"' in line for line in log) == 1  # the resumed run appended to the log
