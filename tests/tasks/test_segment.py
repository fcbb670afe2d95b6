"""The segment task: its metrics against hand computations and scikit-learn, the file sources, predict with
a drawn overlay through the command line, and models that overfit a handful of canvases."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from tansuo.data import IGNORE_INDEX
from tansuo.errors import TansuoError
from tansuo.models import create_model
from tansuo.tasks.metrics import pixel_confusion, segmentation_metrics
from tests.helpers import run, segment_recipe, task_from, write_digits_csv, write_recipe


def test_metrics_by_hand() -> None:
    # 2x4 image, classes 0 (background), 1, 2; one ignored pixel
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 0, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    confusion = pixel_confusion(pred, target, 3, IGNORE_INDEX)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = segmentation_metrics(confusion, ["background", "a", "b"])
    # IoU: background 2 / (2+1+1) = 0.5; a 2 / (2+1) = 2/3; b 1 / (1+1) = 0.5
    assert m["per_class_iou"] == pytest.approx({"background": 0.5, "a": 2 / 3, "b": 0.5})
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m["miou_objects"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    # Dice: background 4/6, a 4/5, b 2/3
    assert m["dice"] == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)


def test_metrics_match_scikit_learn_and_skip_absent_classes() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 500)  # class 4 never occurs
    pred = np.where(rng.random(500) < 0.7, target, rng.integers(0, 4, 500))
    m = segmentation_metrics(
        pixel_confusion(torch.from_numpy(pred), torch.from_numpy(target), 5, IGNORE_INDEX), list("abcde")
    )
    labels = [0, 1, 2, 3]
    assert m["miou"] == pytest.approx(jaccard_score(target, pred, labels=labels, average="macro"))
    assert m["dice"] == pytest.approx(f1_score(target, pred, labels=labels, average="macro"))
    assert m["pixel_accuracy"] == pytest.approx((pred == target).mean())
    assert m["per_class_iou"]["e"] is None


def _semantic_folder(root, n, size=(12, 16)):
    """Images with a bright square of class 1 (value 5 in the masks) or 2 (value 9)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        y, x = rng.integers(0, 6), rng.integers(0, 8)
        mask[y : y + 5, x : x + 6] = 5 if i % 2 else 9
        image[mask > 0] = 220
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    (root / "names.yaml").write_text("classes:\n  0: unlabeled\n  5: cat\n  9: dog\n")


def test_semantic_png_source_with_a_class_subset(tmp_path) -> None:
    _semantic_folder(tmp_path, 10)
    raw = segment_recipe(tmp_path / "unused.csv", tmp_path / "run")
    raw["data"] = {
        "source": "semantic-png",
        "train_images": str(tmp_path / "images"),
        "train_labels": str(tmp_path / "masks"),
        "names": str(tmp_path / "names.yaml"),
        "image_size": 16,
        "val_fraction": 0.2,
    }
    task = task_from(raw)
    assert task.class_names == ["background", "cat", "dog"]
    assert len(task._split("train")[0]) == 8 and len(task._split("val")[0]) == 2
    _, maps = task._split("train")
    assert set(torch.unique(maps).tolist()) == {0, 1, 2, IGNORE_INDEX}  # letterbox rows not scored
    raw["data"]["classes"] = ["dog"]
    dog = task_from(raw)
    assert dog.class_names == ["background", "dog"]
    assert set(torch.unique(dog._split("train")[1]).tolist()) == {0, 1, IGNORE_INDEX}
    raw["data"]["classes"] = ["dgo"]
    with pytest.raises(TansuoError, match="Did you mean 'dog'"):
        task_from(raw)


def test_train_predict_and_draw_through_the_command_line(monkeypatch, capsys, tmp_path) -> None:
    csv = write_digits_csv(tmp_path / "digits.csv", 40)
    recipe = write_recipe(tmp_path / "r.yaml", segment_recipe(csv, tmp_path / "run", model="unet_test"))
    code, out, err = run(["train", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert "test miou" in out
    bundle = tmp_path / "run" / "bundle"
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(photo)
    drawn = tmp_path / "out.png"
    args = ["predict", str(bundle), str(photo), "--draw", str(drawn), "--json"]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert (row["height"], row["width"]) == (30, 50)
    assert sum(row["areas"].values()) == pytest.approx(1.0)
    assert row["drawn"] == str(drawn)
    with Image.open(drawn) as picture:
        assert picture.size == (50, 30)
    code, out, _ = run(["predict", str(bundle), str(photo)], monkeypatch, capsys)
    assert code == 0 and "photo.png  ->" in out and "%" in out
    code, _, err = run(["predict", str(bundle), str(tmp_path / "digits.csv")], monkeypatch, capsys)
    assert code == 2 and "digits.csv" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,decoder",
    [
        ("unet_test", None),
        ("segmenter_test", None),
        ("segmenter_test", "skip"),
        ("segmenter_test", "cascade"),
    ],
)
def test_a_model_overfits_a_handful_of_canvases(tmp_path, model, decoder) -> None:
    from tansuo.models import create_model

    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)  # brightness 130, 190, 250
    raw = segment_recipe(csv, tmp_path / "run", model=model)
    raw["data"]["canvases"] = [8, 2, 2]
    task = task_from(raw)
    torch.manual_seed(0)
    overrides = {"width": 8} if model == "unet_test" else {"embed_dim": 32, "num_heads": 4}
    if decoder:
        overrides["decoder"] = decoder
    if decoder == "cascade":
        overrides["stem"] = "strided"  # its CNN encoder
    model = create_model(model, **overrides, **task.model_overrides())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2 if "unet" in raw["model"]["name"] else 3e-3)
    batches = task.train_batches(8, 0)
    model.train()
    for _ in range(150):
        loss = task.loss(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # evaluate on the training canvases themselves: memorised
    task._splits["val"] = task._splits["train"]
    metrics = task.evaluate(model, "val", 8, torch.device("cpu"))
    assert metrics["miou"] > 0.9, metrics


def _macro_dice_by_hand(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Dice per sample and class present in its scored pixels, averaged over those classes, then over
    the batch: kornia's ``average="macro"``, written out."""
    probs = scores.softmax(1)
    losses = []
    for p, t in zip(probs, target, strict=True):
        scored = t != IGNORE_INDEX
        per_class = []
        for c in t[scored].unique().tolist():
            pc, yc = p[c][scored], (t[scored] == c).float()
            per_class.append(1 - 2 * (pc * yc).sum() / (pc.sum() + yc.sum()))
        losses.append(torch.stack(per_class).mean())
    return torch.stack(losses).mean()


def test_dice_weight_adds_the_macro_dice_loss_to_the_cross_entropy(tmp_path) -> None:
    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)
    raw = segment_recipe(csv, tmp_path / "run", model="unet_test")
    raw["data"]["canvases"] = [8, 2, 2]
    plain = task_from(raw)
    raw["data"]["dice_weight"] = 0.7
    dice = task_from(raw)
    torch.manual_seed(0)
    model = create_model("unet_test", **plain.model_overrides())
    batch = next(plain.train_batches(4, 0))
    batch["y"][0, :3, :5] = IGNORE_INDEX  # ignored pixels leave both the cross-entropy and the Dice
    with torch.no_grad():
        scores = model(batch["x"])
        expected = torch.nn.functional.cross_entropy(scores, batch["y"], ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(plain.loss(model, batch), expected)
        hand = _macro_dice_by_hand(scores, batch["y"])
        assert 0 < hand < 1
        torch.testing.assert_close(dice.loss(model, batch), expected + 0.7 * hand, atol=1e-5, rtol=1e-5)
    loss = dice.loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fresh_canvases_are_new_every_step_and_a_function_of_the_step(tmp_path) -> None:
    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)
    raw = segment_recipe(csv, tmp_path / "run")
    raw["data"]["canvases"] = [8, 2, 2]
    made_once = task_from(raw)
    raw["data"]["fresh_canvases"] = True
    fresh = task_from(raw)
    assert fresh.steps_per_epoch(4) == made_once.steps_per_epoch(4) == 2  # canvases[0] sets the epoch
    once = [b["x"] for _, b in zip(range(4), made_once.train_batches(4, 0), strict=False)]

    def canvases(xs: list[torch.Tensor]) -> set[tuple[float, ...]]:
        return {tuple(x.flatten().tolist()) for x in torch.cat(xs)}

    assert canvases(once[:2]) == canvases(once[2:])  # made once: the second epoch shows the same 8
    new = [b for _, b in zip(range(4), fresh.train_batches(4, 0), strict=False)]
    seen = canvases([b["x"] for b in new])
    assert len(seen) == 16  # 4 steps x 4 canvases, all different
    assert not seen & canvases(once)
    again = next(fresh.train_batches(4, 2))  # resuming at step 2 gives step 2's canvases
    assert torch.equal(again["x"], new[2]["x"]) and torch.equal(again["y"], new[2]["y"])
    assert set(new[0]["y"].unique().tolist()) <= {0, 1, 2, 3} and (new[0]["y"] > 0).any()
    raw["data"].update(source="semantic-png", train_images="a", train_labels="b", names=["x"])
    with pytest.raises(TansuoError, match="fresh_canvases needs source mnist-canvas"):
        task_from(raw)
