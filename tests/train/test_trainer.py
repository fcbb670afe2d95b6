import json
from pathlib import Path

import pytest
import torch

from tansuo.bundle import load_bundle
from tansuo.errors import RecipeError, TrainingDiverged
from tansuo.train.checkpoint import load_checkpoint
from tests.helpers import Interrupted, image_recipe, interrupt_after, lm_recipe, make_trainer


def test_overfits_a_tiny_image_set(image_npz: Path, tmp_path: Path) -> None:
    raw = image_recipe(image_npz, tmp_path / "run", max_steps=60, eval_every=20)
    raw["model"]["name"] = "resnet_test"
    result = make_trainer(raw).fit()
    assert result["val"]["accuracy"] == 1.0
    assert result["test"]["accuracy"] >= 0.9
    bundle = load_bundle(result["bundle"])
    assert bundle.metrics["test"]["accuracy"] == result["test"]["accuracy"]
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"event": "eval"' in line for line in log) and '"event": "end"' in log[-1]


def test_lm_loss_falls_and_best_bundle_is_kept(text_file: Path, tmp_path: Path) -> None:
    raw = lm_recipe(text_file, tmp_path / "run", max_steps=40, eval_every=10)
    trainer = make_trainer(raw)
    before = trainer.task.evaluate(trainer.model, "val", 4, trainer.device)["loss"]
    result = trainer.fit()
    assert result["val"]["loss"] < 0.75 * before
    assert result["step"] in (10, 20, 30, 40)


@pytest.mark.parametrize("kind", ["lm", "image"])
def test_resume_equals_uninterrupted_bit_for_bit(
    kind: str, text_file: Path, image_npz: Path, tmp_path: Path
) -> None:
    def raw(out: Path) -> dict:
        if kind == "lm":  # dropout 0.1 makes the RNG state matter; grad_accum 2 the micro-batch position
            return lm_recipe(text_file, out, max_steps=12, eval_every=6, checkpoint_every=3, grad_accum=2)
        return image_recipe(image_npz, out, max_steps=12, eval_every=6, checkpoint_every=3)

    full = make_trainer(raw(tmp_path / "a"))
    full.fit()

    interrupted = make_trainer(raw(tmp_path / "b"))
    interrupt_after(interrupted, 16 if kind == "lm" else 8)  # stops inside step 9 (lm) / 9 (image)
    with pytest.raises(Interrupted):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")["trainer"]["step"] in (6, 3)

    torch.manual_seed(999)  # a fresh process would have different RNG state: resume must restore it
    resumed = make_trainer(raw(tmp_path / "b"))
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # the units trained on (a scaling law's D) carry over the checkpoint: every step counted once
    assert resumed.units_trained == full.units_trained > 0
    assert resumed.step_seconds > 0 and full.step_seconds > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(text_file: Path, tmp_path: Path) -> None:
    trainer = make_trainer(lm_recipe(text_file, tmp_path / "run", max_steps=10, checkpoint_every=2))
    original = trainer.task.loss
    calls = {"n": 0}

    def loss(model, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        value = original(model, batch)
        return value * float("nan") if calls["n"] == 6 else value

    trainer.task.loss = loss  # type: ignore[method-assign]
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*checkpoint") as err:
        trainer.fit()
    assert "lower train.lr" in str(err.value).lower()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["trainer"]["step"] == 4


def test_early_stopping(image_npz: Path, tmp_path: Path) -> None:
    raw = image_recipe(
        image_npz, tmp_path / "run", max_steps=200, eval_every=5, early_stop_patience=2, lr=1e-9
    )
    raw["train"]["min_lr"] = 0
    result = make_trainer(raw).fit()
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert log.count('"event": "eval"') < 40  # stopped long before 200 steps
    assert result["step"] == 5


def test_threads_setting_applies(image_npz: Path, tmp_path: Path) -> None:
    make_trainer(image_recipe(image_npz, tmp_path / "run", threads=1))
    assert torch.get_num_threads() == 1


def test_best_metric_direction_follows_its_name(image_npz: Path, tmp_path: Path) -> None:
    trainer = make_trainer(image_recipe(image_npz, tmp_path / "run", best_metric="loss"))
    assert trainer.mode == "min"
    assert make_trainer(image_recipe(image_npz, tmp_path / "r2")).mode == "max"  # accuracy
    result = trainer.fit()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open() if '"eval"' in line]
    assert result["val"]["loss"] == min(e["loss"] for e in evals)


def test_unknown_best_metric_is_a_recipe_error(image_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="best_metric 'f2'"):
        make_trainer(image_recipe(image_npz, tmp_path / "run", best_metric="f2", max_steps=2)).fit()
