"""The detect task: FCOS targets by hand, bad input, predictions in original pixels, and a detector that
overfits a handful of images."""

from pathlib import Path

import pytest
import torch

from tansuo.errors import DataError, RecipeError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.tasks.base import predict_options
from tansuo.tasks.fcos import assign, decode, fcos_loss
from tests.helpers import detect_recipe, make_trainer, task_from, write_yolo_boxes


def test_fcos_assignment_by_hand():
    # four points at stride 8; one 20x20 box centred at (20, 20): centre sampling (1.5 strides = 12 pixels)
    points = torch.tensor([[20.0, 20.0], [12.0, 12.0], [36.0, 20.0], [4.0, 4.0]])
    strides = torch.full((4,), 8.0)
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 30.0]]])
    t = assign(points, strides, boxes, torch.tensor([[1]]), radius=1.5)
    assert t.labels.tolist() == [[1, 1, -1, -1]]  # inside and near; (36, 20) outside; (4, 4) outside
    # centre-ness: 1 at the centre; at (12, 12) l=2, r=18: sqrt((2/18) * (2/18)) = 1/9
    torch.testing.assert_close(t.centerness[0, :2], torch.tensor([1.0, 1 / 9]))
    # a point two boxes claim takes the smaller one
    two = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [14.0, 14.0, 26.0, 26.0]]])
    assert assign(points[:1], strides[:1], two, torch.tensor([[0, 1]]), 1.5).labels.tolist() == [[1]]
    # padding (label -1) is never assigned
    assert assign(points[:1], strides[:1], boxes, torch.tensor([[-1]]), 1.5).labels.tolist() == [[-1]]


def test_loss_of_a_perfect_box_is_its_classification_and_centerness_only():
    points = torch.tensor([[20.0, 20.0]])
    strides = torch.tensor([8.0])
    out = torch.tensor([[[10.0, 10.0, 30.0, 30.0, 9.0, 9.0, -9.0]]])  # the right box, class 0, confident
    loss, parts = fcos_loss(
        out, points, strides, torch.tensor([[[10.0, 10.0, 30.0, 30.0]]]), torch.tensor([[0]])
    )
    assert parts["box"] < 1e-5 and parts["cls"] < 1e-3
    found = decode(out, score_threshold=0.5)[0]
    assert found.labels.tolist() == [0] and found.boxes.tolist() == [[10.0, 10.0, 30.0, 30.0]]
    assert torch.isfinite(loss)


def test_a_class_outside_names_is_an_error_naming_the_file(tmp_path: Path):
    config = write_yolo_boxes(tmp_path / "d", train=2, val=1)
    (tmp_path / "d" / "labels" / "train" / "001.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="001.txt"):
        task_from(detect_recipe(config, tmp_path / "run"))


def test_recipe_checks():
    with pytest.raises(RecipeError, match="or path: an Ultralytics data YAML"):
        validate_recipe({"task": "detect", "data": {"source": "yolo"}, "model": {"name": "vit_det_test"}})
    with pytest.raises(RecipeError, match="train_labels"):
        validate_recipe({"task": "detect", "data": {"source": "coco"}, "model": {"name": "vit_det_test"}})


def test_classes_subset_and_predictions_in_original_pixels(tmp_path: Path):
    config = write_yolo_boxes(tmp_path / "d", train=4, val=2)
    raw = detect_recipe(config, tmp_path / "run")
    raw["data"]["classes"] = ["green"]
    task = task_from(raw)
    assert task.class_names == ["green"] and task.model_overrides()["num_classes"] == 1
    from tansuo.models import create_model

    model = create_model("resnet_det_test", **task.model_overrides())
    picture = str(tmp_path / "d" / "images" / "val" / "000.png")
    options = predict_options(task, ["score_threshold=0", "max_detections=3"])
    row = task.predict(model, [picture], torch.device("cpu"), **options)[0]
    assert (row["width"], row["height"]) == (48, 40) and len(row["detections"]) == 3
    for d in row["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 40 and d["label"] == "green"
    assert "green" in task.format_prediction(row, 3)
    drawn = tmp_path / "boxes.png"
    options = predict_options(task, ["score_threshold=0", "max_detections=2", f"draw={drawn}"])
    row = task.predict(model, [picture], torch.device("cpu"), **options)[0]
    assert row["drawn"] == str(drawn)
    from tansuo.data.dense import read_image

    before, after = read_image(Path(picture)), read_image(drawn)
    assert after.shape == before.shape and (after != before).any()  # the same picture, boxes drawn on it


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet_det_test", "vit_det_test"])
def test_a_detector_overfits_a_handful_of_images(tmp_path: Path, model: str):
    config = write_yolo_boxes(tmp_path / "d", train=6, val=2, seed=1)
    raw = detect_recipe(config, tmp_path / "run", model=model, max_steps=300, lr=3e-3, warmup_steps=20)
    raw["data"]["augment"] = False
    raw["model"]["overrides"] = {"fpn_channels": 16, "head_convs": 2}
    torch.manual_seed(0)
    trainer = make_trainer(raw)
    trainer.fit()
    metrics = trainer.task.evaluate(trainer.model, "train", 8, torch.device("cpu"))
    assert metrics["map_50"] > 0.9, metrics
    assert metrics["map"] > 0.5, metrics


def test_fresh_canvases_are_new_every_step_with_their_boxes(tmp_path: Path):
    from tests.helpers import write_digits_csv

    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)
    data = {"source": "mnist-canvas", "path": str(csv), "canvases": [8, 2], "canvas_size": 48}
    data.update(image_size=32, digit_scale=[0.6, 0.9], digits_per_image=[1, 2], augment=False)
    raw = detect_recipe(csv, tmp_path / "run", model="resnet_det_test")
    raw["data"] = {**data, "fresh_canvases": True}
    task = task_from(raw)
    assert task.steps_per_epoch(4) == 2
    batches = [b for _, b in zip(range(3), task.train_batches(4, 0), strict=False)]
    assert not torch.equal(batches[0]["x"], batches[1]["x"])
    again = next(task.train_batches(4, 1))
    for key in ("x", "boxes", "labels"):
        assert torch.equal(again[key], batches[1][key])
    for b in batches:
        real = b["labels"] >= 0
        assert real.any(dim=1).all() and set(b["labels"][real].tolist()) <= {0, 1, 2}
        boxes = b["boxes"][real]
        assert (boxes >= 0).all() and (boxes <= 32).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    model = create_model("resnet_det_test", **task.model_overrides())
    assert torch.isfinite(task.loss(model, batches[0]))
    raw["data"] = {"source": "yolo", "path": str(csv), "fresh_canvases": True}
    with pytest.raises(RecipeError, match="fresh_canvases needs source mnist-canvas"):
        validate_recipe(raw)


def test_mnist_canvas_test_split_holds_unseen_digits_and_is_held_back(tmp_path: Path):
    from tests.helpers import write_digits_csv

    csv = write_digits_csv(tmp_path / "digits.csv", 60, digits=3)
    data = {"source": "mnist-canvas", "path": str(csv), "canvas_size": 48, "image_size": 32}
    raw = detect_recipe(csv, tmp_path / "run", model="resnet_det_test")
    raw["data"] = {**data, "canvases": [6, 3]}
    two = task_from(raw)
    assert two.heldout_split == "val"
    with pytest.raises(DataError, match="no test split"):
        two._split("test")
    raw["data"] = {**data, "canvases": [6, 3, 4]}
    three = task_from(raw)
    assert three.heldout_split == "test" and type(three).heldout_split == "val"
    test, val = three._split("test"), three._split("val")
    assert len(test) == 4 and len(val) == 3
    assert not torch.equal(test.images[:3], val.images)  # other digits, other canvases
    model = create_model("resnet_det_test", **three.model_overrides())
    assert "map" in three.evaluate(model, "test", 4, torch.device("cpu"))
