"""The dense-vision data layer: every loader on hand-made tiny files, the bad-input errors, the digit canvas,
class subsets, letterboxing and augmentation that keeps boxes and masks on their pixels."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tansuo.data import (
    IGNORE_INDEX,
    DenseSample,
    Placement,
    augment_batch,
    boxes_from_masks,
    keep_classes,
    mnist_canvas,
    read_coco_instances,
    read_image,
    read_instance_pngs,
    read_names,
    read_semantic_pngs,
    read_yolo,
    resize_sample,
    semantic_from_instances,
)
from tansuo.data.dense import check_sample
from tansuo.errors import DataError


def _picture(path, height, width, grey=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if grey:
        Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


# ------------------------------------------------------------------ COCO
def _coco(tmp_path, annotations, categories=None, images=None):
    _picture(tmp_path / "img" / "a.png", 10, 12)
    coco = {
        "images": images or [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_polygon_and_rle(tmp_path) -> None:
    from pycocotools import mask as mask_utils

    square = np.zeros((10, 12), np.uint8, order="F")
    square[2:5, 6:10] = 1  # rows 2..4, cols 6..9
    rle = mask_utils.encode(square)
    rle["counts"] = rle["counts"].decode("ascii")
    anns = [
        # a polygon covering pixels x 1..4, y 1..3 (x2, y2 exclusive: 1..5, 1..4)
        {
            "id": 1,
            "image_id": 1,
            "category_id": 7,
            "bbox": [1, 1, 4, 3],
            "iscrowd": 0,
            "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]],
        },
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [6, 2, 4, 3], "iscrowd": 1, "segmentation": rle},
    ]
    data = read_coco_instances(_coco(tmp_path, anns), tmp_path / "img")
    assert data.names == ["cat", "dog"]
    sample = data[0]
    assert sample.image.shape == (10, 12, 3) and sample.image.dtype == np.uint8
    np.testing.assert_array_equal(sample.labels, [1, 0])
    np.testing.assert_allclose(sample.boxes, [[1, 1, 5, 4], [6, 2, 10, 5]])
    np.testing.assert_array_equal(sample.crowd, [False, True])
    assert sample.masks.shape == (2, 10, 12)
    np.testing.assert_array_equal(sample.masks[1], square.astype(bool))
    np.testing.assert_array_equal(boxes_from_masks(sample.masks), sample.boxes)  # polygon fills its box
    # uncompressed RLE (counts as a list) gives the same mask
    anns[1]["segmentation"] = {"size": [10, 12], "counts": _uncompressed(square)}
    again = read_coco_instances(_coco(tmp_path, anns), tmp_path / "img", lazy=True)
    assert again.samples[0].image is None
    np.testing.assert_array_equal(again[0].masks[1], square.astype(bool))


def _uncompressed(mask):
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def test_coco_bad_inputs_name_the_file(tmp_path) -> None:
    ann = {"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}
    with pytest.raises(DataError, match=r"instances.json.*category_id 9"):
        read_coco_instances(_coco(tmp_path, [ann]), tmp_path / "img")
    ann = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [8, 1, 9, 2]}
    with pytest.raises(DataError, match=r"a.png.*outside the 12x10 image"):
        read_coco_instances(_coco(tmp_path, [ann]), tmp_path / "img")
    ann = {
        "id": 1,
        "image_id": 1,
        "category_id": 3,
        "bbox": [1, 1, 2, 2],
        "segmentation": {"size": [20, 12], "counts": [5, 5, 230]},
    }
    with pytest.raises(DataError, match=r"RLE mask is 20x12 but the image is 10x12"):
        read_coco_instances(_coco(tmp_path, [ann]), tmp_path / "img")
    images = [{"id": 1, "file_name": "a.png", "height": 11, "width": 12}]
    with pytest.raises(DataError, match=r"listed as 12x11 but is 12x10"):
        read_coco_instances(_coco(tmp_path, [], images=images), tmp_path / "img")
    images = [{"id": 1, "file_name": "gone.png"}]
    with pytest.raises(DataError, match="gone.png"):
        read_coco_instances(_coco(tmp_path, [], images=images), tmp_path / "img")


# ------------------------------------------------------------------ YOLO
def test_yolo_boxes_polygons_and_a_missing_label_file(tmp_path) -> None:
    _picture(tmp_path / "images" / "a.jpg", 20, 40)
    _picture(tmp_path / "images" / "b.jpg", 20, 40, grey=True)  # no label file: a background image
    _picture(tmp_path / "images" / "c.jpg", 20, 40)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("5 0.5 0.5 0.5 0.5\n\n")
    # a triangle polygon in YOLO-seg form: class 1, points normalised
    (tmp_path / "labels" / "c.txt").write_text("1 0.1 0.1 0.4 0.1 0.1 0.6\n")
    (tmp_path / "labels" / "orphan.txt").write_text("1 0.5 0.5 0.1 0.1\n")  # no image: ignored
    data = read_yolo(tmp_path / "images", tmp_path / "labels", {1: "person", 5: "bus"})
    assert data.names == ["person", "bus"] and len(data) == 3
    a, b, c = data[0], data[1], data[2]
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 15]])
    np.testing.assert_array_equal(a.labels, [1])
    assert b.image.shape == (20, 40, 3) and len(b.labels) == 0 and b.masks.shape == (0, 20, 40)
    np.testing.assert_allclose(c.boxes, [[4, 2, 16, 12]])
    np.testing.assert_array_equal(c.labels, [0])
    assert c.masks.shape == (1, 20, 40) and 40 < c.masks.sum() < 12 * 10  # about half the box
    assert a.masks[0].sum() == 20 * 10  # a box-only object gets its filled box
    boxes_only = read_yolo(tmp_path / "images", tmp_path / "labels", ["x", "person", "a", "b", "c", "bus"])
    assert boxes_only.names[5] == "bus"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("7 0.5 0.5 0.1 0.1", r"a.txt, line 1: class 7 is not among the 2 names"),
        ("0 0.5 0.5 0.1", r"a.txt, line 1: expected 'class cx cy w h'"),
        ("0 0.5 zero 0.1 0.1", r"a.txt, line 1: .* is not a list of numbers"),
        ("0 12 8 4 4", r"a.txt, line 1: coordinates must be normalised"),
        ("0 0.99 0.5 0.5 0.5", r"a.txt: box 0 .* outside the 40x20 image"),
    ],
)
def test_yolo_bad_lines(tmp_path, line, match) -> None:
    _picture(tmp_path / "images" / "a.jpg", 20, 40)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=match):
        read_yolo(tmp_path / "images", tmp_path / "labels", ["a", "b"])


def test_read_names(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("classes:\n  0: unlabeled\n  1: person\n  3: car\n")
    assert read_names(tmp_path / "c.yaml") == {0: "unlabeled", 1: "person", 3: "car"}
    (tmp_path / "d.yaml").write_text("names: [cat, dog]\n")
    assert read_names(tmp_path / "d.yaml") == {0: "cat", 1: "dog"}
    (tmp_path / "n.txt").write_text("cat\ndog\n")
    assert read_names(tmp_path / "n.txt") == {0: "cat", 1: "dog"}
    (tmp_path / "e.yaml").write_text("train: x\n")
    with pytest.raises(DataError, match="no 'names:'"):
        read_names(tmp_path / "e.yaml")


# ------------------------------------------------------------------ mask PNGs
def test_semantic_pngs(tmp_path) -> None:
    _picture(tmp_path / "images" / "a.jpg", 6, 8)
    _picture(tmp_path / "images" / "b.jpg", 6, 8)  # no mask: left out
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:4] = 17  # cat
    mask[4:, 5:] = 1  # person
    mask[0, 0] = 255  # ignored
    _png(tmp_path / "masks" / "a.png", mask)
    names = {0: "unlabeled", 1: "person", 17: "cat"}
    data = read_semantic_pngs(tmp_path / "images", tmp_path / "masks", names)
    assert data.names == ["person", "cat"] and len(data) == 1
    semantic = data[0].semantic
    assert semantic[1, 1] == 2 and semantic[5, 7] == 1 and semantic[0, 0] == IGNORE_INDEX
    assert semantic[0, 1] == 0
    person = keep_classes(data, ["person"])
    assert person.names == ["person"]
    assert person[0].semantic[1, 1] == 0 and person[0].semantic[5, 7] == 1
    assert person[0].semantic[0, 0] == IGNORE_INDEX


def test_semantic_pngs_bad_inputs(tmp_path) -> None:
    _picture(tmp_path / "images" / "a.jpg", 6, 8)
    _png(tmp_path / "masks" / "a.png", np.full((6, 8), 9))
    with pytest.raises(DataError, match=r"a.png: class id 9 is not among the names"):
        read_semantic_pngs(tmp_path / "images", tmp_path / "masks", ["background", "a"])
    _png(tmp_path / "masks" / "a.png", np.zeros((5, 8)))
    with pytest.raises(DataError, match=r"a.png: the class mask is 5x8 but the image is 6x8"):
        read_semantic_pngs(tmp_path / "images", tmp_path / "masks", ["background", "a"])
    _png(tmp_path / "masks" / "a.png", np.zeros((6, 8, 3)), mode="RGB")
    with pytest.raises(DataError, match=r"a.png is a colour"):
        read_semantic_pngs(tmp_path / "images", tmp_path / "masks", ["background", "a"])


def test_instance_pngs(tmp_path) -> None:
    _picture(tmp_path / "images" / "a.png", 6, 8)
    ids = np.zeros((6, 8), np.uint8)
    ids[0:2, 0:3] = 1
    ids[3:6, 4:8] = 2
    _png(tmp_path / "masks" / "a.png", ids)
    data = read_instance_pngs(tmp_path / "images", tmp_path / "masks", ["person"])
    sample = data[0]
    np.testing.assert_allclose(sample.boxes, [[0, 0, 3, 2], [4, 3, 8, 6]])
    np.testing.assert_array_equal(sample.labels, [0, 0])
    np.testing.assert_array_equal(sample.masks[1], ids == 2)
    assert semantic_from_instances(sample)[4, 5] == 1
    # Cityscapes-style ids: class * divisor + object
    ids16 = np.where(ids == 2, 21, np.where(ids == 1, 10, 0))
    _png(tmp_path / "masks" / "a.png", ids16)
    data = read_instance_pngs(tmp_path / "images", tmp_path / "masks", ["a", "b", "c"], label_divisor=10)
    np.testing.assert_array_equal(data[0].labels, [1, 2])
    with pytest.raises(DataError, match=r"a.png: class 2 is outside the 2 class names"):
        read_instance_pngs(tmp_path / "images", tmp_path / "masks", ["a", "b"], label_divisor=10)
    _png(tmp_path / "masks" / "a.png", np.ones((7, 8)))
    with pytest.raises(DataError, match=r"a.png: masks have shape \(7, 8\)"):
        read_instance_pngs(tmp_path / "images", tmp_path / "masks", ["person"])


# ------------------------------------------------------------------ pictures
def test_truncated_and_oversized_images(tmp_path, monkeypatch) -> None:
    good = _picture(tmp_path / "a.jpg", 30, 30)
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"t.jpg.*(truncated|damaged)"):
        read_image(truncated)
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) * 2 // 3])  # header intact, data cut
    with pytest.raises(DataError, match=r"t.jpg.*truncated"):
        read_image(truncated)
    (tmp_path / "x.jpg").write_text("not a picture")
    with pytest.raises(DataError, match=r"x.jpg as an image"):
        read_image(tmp_path / "x.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"a.jpg .*decompression bomb"):  # Pillow's own refusal (> 2x)
        read_image(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.raises(DataError, match=r"a.jpg is 30x30 pixels.*decompression bomb"):  # ours (> 1x)
        read_image(good)


def test_check_sample_clips_within_tolerance() -> None:
    sample = DenseSample("s", image=np.zeros((10, 10, 3), np.uint8), boxes=[[-0.5, 0, 10.5, 5]], labels=[0])
    np.testing.assert_allclose(check_sample(sample, 1).boxes, [[0, 0, 10, 5]])
    sample = DenseSample("s", image=np.zeros((10, 10, 3), np.uint8), boxes=[[5, 5, 3, 8]], labels=[0])
    with pytest.raises(DataError, match="x2 < x1"):
        check_sample(sample, 1)


# ------------------------------------------------------------------ the digit canvas
def _digits():
    rng = np.random.default_rng(1)
    images = np.zeros((20, 8, 8), np.uint8)
    images[:, 2:6, 2:6] = rng.integers(150, 255, (20, 4, 4))
    return images, np.arange(20) % 10


def test_mnist_canvas() -> None:
    data = mnist_canvas(_digits(), 12, size=32, seed=3, digits_per_image=(1, 3), scale=(1.0, 2.0))
    again = mnist_canvas(_digits(), 12, size=32, seed=3, digits_per_image=(1, 3), scale=(1.0, 2.0))
    assert data.names == [str(d) for d in range(10)] and len(data) == 12
    for s, t in zip(data.samples, again.samples, strict=True):
        np.testing.assert_array_equal(s.image, t.image)
        np.testing.assert_array_equal(s.boxes, t.boxes)
        assert 1 <= len(s.labels) <= 3 and s.image.shape == (32, 32, 3)
        np.testing.assert_array_equal(boxes_from_masks(s.masks), s.boxes)  # tight boxes
        np.testing.assert_array_equal(semantic_from_instances(s), s.semantic)  # class = digit + 1
        assert np.all(s.image[..., 0][s.semantic > 0] > 128)  # masks are bright digit pixels
        for i in range(len(s.boxes)):  # boxes never overlap
            for j in range(i):
                a, b = s.boxes[i], s.boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    other = mnist_canvas(_digits(), 12, size=32, seed=4, scale=(1.0, 2.0))
    assert any(not np.array_equal(s.image, t.image) for s, t in zip(data.samples, other.samples, strict=True))
    with pytest.raises(DataError, match="do not fit"):
        mnist_canvas(_digits(), 1, size=8, scale=(2.0, 3.0))


# ------------------------------------------------------------------ resizing and augmentation
def test_letterbox_round_trip() -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[4:10, 8:20] = 255
    semantic = np.zeros((20, 40), np.int64)
    semantic[4:10, 8:20] = 1
    sample = DenseSample("s", image=image, boxes=[[8, 4, 20, 10]], labels=[0], semantic=semantic)
    resized, placement = resize_sample(sample, 20)
    assert placement == Placement(20, 40, 20, 0.5, 0.5, 0, 5)
    np.testing.assert_allclose(resized.boxes, [[4, 7, 10, 10]])
    assert resized.semantic[0, 0] == IGNORE_INDEX and resized.semantic[8, 6] == 1  # padding not scored
    assert resized.image[8, 6, 0] == 255 and resized.image[12, 2, 0] == 0
    np.testing.assert_allclose(placement.boxes_to_original(resized.boxes), sample.boxes)
    scores = torch.zeros(2, 20, 20)
    scores[1] = torch.from_numpy(resized.semantic == 1).float()
    scores[0] = 1 - scores[1]
    back = placement.scores_to_original(scores).argmax(0).numpy()
    assert back.shape == (20, 40) and (back == semantic).mean() > 0.97


def test_augmentation_keeps_boxes_and_masks_on_their_pixels() -> None:
    size, batch = 32, 6
    images = torch.zeros(batch, 3, size, size)
    semantic = torch.zeros(batch, size, size, dtype=torch.long)
    boxes, masks = [], []
    for i in range(batch):
        y, x, h, w = 3 + i, 4 + 2 * i, 6 + i % 3, 9
        images[i, :, y : y + h, x : x + w] = 1.0
        semantic[i, y : y + h, x : x + w] = 1 + i % 3
        boxes.append(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
        masks.append(images[i, :1, :, :] > 0.5)
    flips = 0
    for seed in range(4):
        a, s, b, _ = augment_batch(images, seed, semantic=semantic, boxes=boxes)
        a2, s2, b2, m2 = augment_batch(images, seed, semantic=semantic, boxes=boxes, masks=masks)
        torch.testing.assert_close(a, a2)  # a pure function of the seed
        torch.testing.assert_close(s, s2)
        for i in range(batch):
            white = (a[i, 0] > 0.5).numpy()
            drawn = boxes_from_masks(white[None])[0]
            np.testing.assert_allclose(b[i][0].numpy(), drawn, atol=1.0)  # boxes follow the pixels
            np.testing.assert_array_equal(b2[i][0].numpy(), boxes_from_masks(m2[i].numpy())[0])
            labelled = (s[i] != 0) & (s[i] != IGNORE_INDEX)
            agree = (labelled.numpy() == white).mean()
            assert agree > 0.97  # the class map moved with the image (edges may differ by a pixel)
            assert set(np.unique(s[i].numpy())) <= {0, 1 + i % 3, IGNORE_INDEX}  # nearest, no blends
            flips += int(drawn[0] > size / 2)
    assert 0 < flips < 4 * batch  # some but not all images flipped
