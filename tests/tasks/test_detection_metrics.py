"""The project's COCO metrics: hand-checked cases, and pycocotools run the usual way (JSON files on disk,
``COCO(path)``, ``loadRes(path)``, ``summarize``) on the same fixed predictions."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from tansuo.errors import DataError
from tansuo.tasks.detection_metrics import ImageBoxes, detection_metrics

NAMES = ["cat", "dog", "bird"]


def _gt(boxes, labels):
    return ImageBoxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4), torch.tensor(labels).long())


def _pred(boxes, labels, scores):
    return ImageBoxes(
        torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
        torch.tensor(labels).long(),
        torch.tensor(scores, dtype=torch.float32),
    )


def test_perfect_predictions_score_one():
    gt = [_gt([[10, 10, 50, 60], [60, 5, 90, 40]], [0, 1]), _gt([[0, 0, 30, 30]], [2])]
    pred = [_pred(g.boxes.tolist(), g.labels.tolist(), [0.9] * len(g.labels)) for g in gt]
    m = detection_metrics(pred, gt, NAMES)
    for key in ("map", "map_50", "map_75"):
        assert m[key] == pytest.approx(1.0, abs=1e-12)
    assert m["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0}, abs=1e-12)


def test_hand_checked_partial_cases():
    gt = [_gt([[10, 10, 50, 60], [60, 5, 90, 40]], [0, 0])]
    # one of two boxes found: precision 1 up to recall 0.5, so 51 of COCO's 101 recall points
    half = detection_metrics([_pred([[10, 10, 50, 60]], [0], [0.9])], gt, NAMES)
    assert half["map"] == pytest.approx(51 / 101)
    # a false positive scored above the one true positive: precision 0.5 at every recall up to 1
    one = [_gt([[10, 10, 50, 60]], [0])]
    fp = detection_metrics([_pred([[100, 100, 120, 120], [10, 10, 50, 60]], [0, 0], [0.9, 0.8])], one, NAMES)
    assert fp["map"] == pytest.approx(0.5)
    # the right box with the wrong class finds nothing; nothing predicted scores 0 too
    assert detection_metrics([_pred([[10, 10, 50, 60]], [1], [0.9])], one, NAMES)["map"] == 0.0
    assert detection_metrics([_pred([], [], [])], one, NAMES)["map"] == 0.0
    # IoU 2/3 counts at the thresholds 0.50 .. 0.65 only: 4 of the 10
    shifted = detection_metrics([_pred([[10, 10, 50, 85]], [0], [0.9])], one, NAMES)  # IoU 50/75 = 0.667
    assert shifted["map_50"] == pytest.approx(1.0) and shifted["map_75"] == 0.0
    assert shifted["map"] == pytest.approx(0.4)


def test_no_ground_truth_is_a_data_error():
    with pytest.raises(DataError, match="no ground-truth boxes"):
        detection_metrics([_pred([[0, 0, 5, 5]], [0], [0.5])], [_gt([], [])], NAMES)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(6):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, 3, n)
        gts.append(_gt(boxes.tolist(), labels.tolist()))
        jitter = boxes + rng.normal(0, 3, boxes.shape)
        extra = np.concatenate([rng.uniform(0, 60, (2, 2)), rng.uniform(70, 100, (2, 2))], 1)
        pb = np.concatenate([jitter, extra])
        relabelled = np.where(rng.uniform(size=n) < 0.8, labels, (labels + 1) % 3)
        pl = np.concatenate([relabelled, rng.integers(0, 3, 2)])
        preds.append(_pred(pb.tolist(), pl.tolist(), rng.uniform(0.05, 1, len(pl)).tolist()))
    return preds, gts


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pycocotools_run_on_json_files(tmp_path, seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, gts = _random_case(seed)
    images, anns, dets = [], [], []
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        images.append({"id": 100 + i, "width": 120, "height": 120, "file_name": f"{i}.jpg"})
        for b, label in zip(g.boxes.tolist(), g.labels.tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append(
                {
                    "id": len(anns) + 7,
                    "image_id": 100 + i,
                    "category_id": [3, 5, 9][label],
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, label, s in zip(p.boxes.tolist(), p.labels.tolist(), p.scores.tolist(), strict=True):
            dets.append(
                {
                    "image_id": 100 + i,
                    "category_id": [3, 5, 9][label],
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": s,
                }
            )
    cats = [{"id": c, "name": n} for c, n in zip([3, 5, 9], NAMES, strict=True)]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = detection_metrics(preds, gts, NAMES)
    assert 0.05 < ev.stats[0] < 0.95  # a case that is neither trivial nor hopeless
    got = [ours[k] for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")]
    np.testing.assert_allclose(got, ev.stats[:6], atol=1e-12)
    for k, name in enumerate(NAMES):  # per class: pycocotools run on that category alone
        ev_k = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev_k.params.catIds = [[3, 5, 9][k]]
        with contextlib.redirect_stdout(io.StringIO()):
            ev_k.evaluate()
            ev_k.accumulate()
            ev_k.summarize()
        assert ours["per_class"][name] == pytest.approx(ev_k.stats[0], abs=1e-12)
