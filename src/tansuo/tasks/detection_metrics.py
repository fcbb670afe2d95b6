"""COCO detection metrics through pycocotools (the reference implementation, used directly).

Predictions and ground truth are turned into COCO's in-memory structures (boxes as ``xywh``, category id =
class index + 1, every box ``iscrowd: 0`` and its area ``w * h``), then ``COCOeval`` with ``iouType="bbox"``
runs ``evaluate`` and ``accumulate``. The figures are those ``COCOeval.summarize`` prints (its ``stats``),
computed from ``eval["precision"]`` the same way without printing: mAP@[.5:.95] (``map``), AP50, AP75,
AP for small / medium / large boxes, and AP@[.5:.95] per class (classes without ground truth left out).
pycocotools is imported only here, when a detection split is evaluated.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tansuo.errors import DataError


@dataclass
class ImageBoxes:
    """Boxes of one image: ``boxes`` ``(N, 4)`` ``xyxy`` pixels, ``labels`` ``(N,)`` class indices and, for
    predictions, ``scores`` ``(N,)``."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor | None = None


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


def coco_structures(
    predictions: list[ImageBoxes], targets: list[ImageBoxes], num_classes: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO's ground-truth dataset dict and results list for the same images, in order (image ids 1..N)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predicted images against {len(targets)} ground-truth images")
    images, annotations, results = [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, targets, strict=True), start=1):
        images.append({"id": i})
        for box, label in zip(_xywh(gt.boxes), gt.labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(label) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        assert pred.scores is not None, "predictions need scores"
        for box, label, score in zip(
            _xywh(pred.boxes), pred.labels.tolist(), pred.scores.tolist(), strict=True
        ):
            results.append({"image_id": i, "category_id": int(label) + 1, "bbox": box, "score": float(score)})
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
    }
    return dataset, results


def _mean_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def detection_metrics(
    predictions: list[ImageBoxes], targets: list[ImageBoxes], class_names: list[str]
) -> dict[str, Any]:
    """COCO box metrics of predictions against ground truth, image by image.

    Returns:
        ``map`` (mAP@[.5:.95], 100 detections per image), ``map_50``, ``map_75``, ``map_small``,
        ``map_medium``, ``map_large`` (-1 where no ground-truth box has that size, as pycocotools
        reports it), ``per_class`` (class name -> AP@[.5:.95], for classes with ground truth) and
        ``boxes`` (ground-truth boxes counted).

    Raises:
        DataError: When no image has a ground-truth box (every AP would be undefined).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = coco_structures(predictions, targets, len(class_names))
    if not dataset["annotations"]:
        raise DataError(
            f"no ground-truth boxes in the {len(targets)} evaluated images: COCO AP is undefined; evaluate "
            "on a split that holds objects of the classes kept"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:  # loadRes refuses an empty list: an empty result set scores 0
            dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K classes, A areas, M max dets)
    iou = ev.params.iouThrs
    last = len(ev.params.maxDets) - 1  # 100 detections

    def ap(area: int = 0, t: int | None = None, k: int | None = None) -> float:
        p = precision[:, :, :, area, last]
        if t is not None:
            p = p[[t]]
        if k is not None:
            p = p[:, :, [k]]
        return _mean_valid(p)

    metrics: dict[str, Any] = {
        "map": max(ap(), 0.0),
        "map_50": max(ap(t=int(np.argmin(np.abs(iou - 0.5)))), 0.0),
        "map_75": max(ap(t=int(np.argmin(np.abs(iou - 0.75)))), 0.0),
        "map_small": ap(area=1),
        "map_medium": ap(area=2),
        "map_large": ap(area=3),
    }
    present = {a["category_id"] - 1 for a in dataset["annotations"]}
    metrics["per_class"] = {name: max(ap(k=k), 0.0) for k, name in enumerate(class_names) if k in present}
    metrics["boxes"] = float(len(dataset["annotations"]))
    return metrics
