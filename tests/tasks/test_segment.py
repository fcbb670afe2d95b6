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
@pytest.mark.parametrize("model", ["unet_test", "segmenter_test"])
def test_a_model_overfits_a_handful_of_canvases(tmp_path, model) -> None:
    from tansuo.models import create_model

    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)  # brightness 130, 190, 250
    raw = segment_recipe(csv, tmp_path / "run", model=model)
    raw["data"]["canvases"] = [8, 2, 2]
    task = task_from(raw)
    torch.manual_seed(0)
    overrides = {"width": 8} if model == "unet_test" else {"embed_dim": 32, "num_heads": 4}
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
