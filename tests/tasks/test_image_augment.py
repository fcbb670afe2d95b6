"""The image task's augmentation switches (data.augment, mixup, cutmix) and label smoothing, in training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tansuo.errors import DataError, RecipeError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tests.helpers import (
    Interrupted,
    classify_recipe,
    image_recipe,
    interrupt_after,
    make_trainer,
    task_from,
)

AUGMENTED = {"augment": "randaugment", "mixup": 0.4, "cutmix": 0.4, "label_smoothing": 0.1}


def _raw(image_npz: Path, out: Path, **train: object) -> dict:
    raw = image_recipe(image_npz, out, **train)
    raw["data"].update(AUGMENTED)
    return raw


def test_augmented_batches_are_a_pure_function_of_seed_and_step(image_npz: Path, tmp_path: Path) -> None:
    task = task_from(_raw(image_npz, tmp_path))
    torch.manual_seed(0)
    first = [b for _, b in zip(range(12), task.train_batches(16, start=0), strict=False)]
    torch.manual_seed(1)
    later = [b for _, b in zip(range(4), task.train_batches(16, start=8), strict=False)]
    for a, b in zip(first[8:], later, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    plain = task_from(image_recipe(image_npz, tmp_path / "plain"))
    plain_batch = next(plain.train_batches(16, start=0))
    assert all(b["x"].shape == plain_batch["x"].shape for b in first)
    assert all(b["y"].shape == (16, 4) for b in first)  # soft targets on every batch
    for b in first:
        torch.testing.assert_close(b["y"].sum(-1), torch.ones(16))
    assert any((b["y"].max(-1).values < 1).any() for b in first)  # some batches were mixed
    assert not torch.equal(first[0]["x"], plain_batch["x"])


def test_augmented_training_resumes_bit_for_bit(image_npz: Path, tmp_path: Path) -> None:
    def raw(out: Path) -> dict:
        return _raw(image_npz, out, max_steps=6, eval_every=6, checkpoint_every=2)

    full = make_trainer(raw(tmp_path / "a"))
    full.fit()
    interrupted = make_trainer(raw(tmp_path / "b"))
    interrupt_after(interrupted, 3)  # inside step 4: the checkpoint of step 2 is the last
    with pytest.raises(Interrupted):
        interrupted.fit()
    torch.manual_seed(123)
    resumed = make_trainer(raw(tmp_path / "b"))
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_label_smoothing_is_the_mix_of_cross_entropy_and_the_uniform_loss(
    image_npz: Path, tmp_path: Path
) -> None:
    plain = task_from(image_recipe(image_npz, tmp_path / "a"))
    raw = image_recipe(image_npz, tmp_path / "b")
    raw["data"]["label_smoothing"] = 0.2
    smoothed = task_from(raw)
    torch.manual_seed(0)
    model = create_model("vit_test", num_classes=4).eval()
    batch = next(plain.train_batches(16, start=0))
    logp = F.log_softmax(model(batch["x"]), -1)
    uniform = -logp.mean(-1).mean()  # cross-entropy against 1/K everywhere
    ce = plain.loss(model, batch)
    torch.testing.assert_close(ce, F.nll_loss(logp, batch["y"]))
    torch.testing.assert_close(smoothed.loss(model, batch), 0.8 * ce + 0.2 * uniform)
    # evaluation reports the plain loss either way
    assert smoothed.evaluate(model, "val", 16, torch.device("cpu"))["loss"] == pytest.approx(
        plain.evaluate(model, "val", 16, torch.device("cpu"))["loss"]
    )


def test_classify_label_smoothing(sentiment_tsv: Path, tmp_path: Path) -> None:
    plain = task_from(classify_recipe(sentiment_tsv, tmp_path / "a"))
    raw = classify_recipe(sentiment_tsv, tmp_path / "b")
    raw["data"]["label_smoothing"] = 0.3
    smoothed = task_from(raw)
    torch.manual_seed(0)
    model = create_model("bert_test", **plain.model_overrides()).eval()
    batch = next(plain.train_batches(8, start=0))
    logits = plain.logits(model, batch)[0].float()
    logp = F.log_softmax(logits, -1)
    expected = 0.7 * F.nll_loss(logp, batch["y"]) + 0.3 * (-logp.mean(-1).mean())
    torch.testing.assert_close(smoothed.loss(model, batch), expected)
    assert not torch.allclose(smoothed.loss(model, batch), plain.loss(model, batch))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"mixup": 0.7, "cutmix": 0.6},
            "data: Value error, mixup \\(0.7\\) \\+ cutmix \\(0.6\\) must not exceed 1",
        ),
        ({"mixup": 1.5}, "data.mixup: Input should be less than or equal to 1"),
        ({"label_smoothing": 1.0}, "data.label_smoothing: Input should be less than 1"),
        ({"augment": "autoaugment"}, "data.augment: must be one of"),
    ],
)
def test_bad_augmentation_settings_are_recipe_errors(
    data: dict, message: str, image_npz: Path, tmp_path: Path
) -> None:
    raw = image_recipe(image_npz, tmp_path)
    raw["data"].update(data)
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


def test_policies_need_grey_or_rgb_images(tmp_path: Path) -> None:
    path = tmp_path / "two.npz"
    np.savez(
        path, x=np.random.default_rng(0).uniform(0, 1, (40, 4, 8, 8)).astype(np.float32), y=np.arange(40) % 2
    )
    raw = image_recipe(path, tmp_path / "run")
    raw["data"]["augment"] = "trivialaugment"
    with pytest.raises(DataError, match="needs grey or RGB images; these have 4 channels"):
        task_from(raw)
