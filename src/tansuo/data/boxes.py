"""Bounding-box geometry: format conversions, IoU, GIoU and non-maximum suppression.

Boxes are ``(..., 4)`` float tensors in pixels, exclusive coordinates as kornia and torchvision use them:
the area of ``(x1, y1, x2, y2)`` is ``(x2 - x1) * (y2 - y1)``. Formats, by the names torchvision's
``box_convert`` gives them: ``xyxy`` (corners), ``xywh`` (top-left corner and size, COCO's JSON) and
``cxcywh`` (centre and size, YOLO's label files once multiplied by the image size).

Pairwise IoU and NMS are kornia's (``kornia.metrics.mean_iou_bbox``, ``kornia.geometry.bbox.nms``);
kornia has no GIoU, so :func:`generalized_box_iou` follows Rezatofighi et al. 2019, "Generalized
Intersection over Union" (the same formula as torchvision's ``generalized_box_iou``), written here in the
element-wise form a loss needs as well as the pairwise one.
"""

from __future__ import annotations

import torch

FORMATS = ("xyxy", "xywh", "cxcywh")


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Boxes ``(..., 4)`` from one format to another (``xyxy``, ``xywh``, ``cxcywh``).

    Raises:
        ValueError: For a format not in :data:`FORMATS`.
    """
    for fmt in (in_fmt, out_fmt):
        if fmt not in FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; use one of {FORMATS}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    # now (a, b, c, d) = xyxy
    if out_fmt == "xyxy":
        return torch.stack([a, b, c, d], -1)
    if out_fmt == "xywh":
        return torch.stack([a, b, c - a, d - b], -1)
    return torch.stack([(a + c) / 2, (b + d) / 2, c - a, d - b], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(...)`` of ``xyxy`` boxes ``(..., 4)``; 0 for empty ones."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, ``(N, M)``, of ``xyxy`` boxes ``(N, 4)`` and ``(M, 4)`` (kornia's
    ``mean_iou_bbox``; it refuses boxes without area, which :func:`box_iou_pairs` scores 0)."""
    from kornia.metrics import mean_iou_bbox

    if len(boxes1) == 0 or len(boxes2) == 0:
        return boxes1.new_zeros(len(boxes1), len(boxes2))
    return mean_iou_bbox(boxes1.float(), boxes2.float())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcast ``xyxy`` boxes ``(..., 4)``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter, box_area(a) + box_area(b) - inter


def box_iou_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of matching rows, ``(...)``, of ``xyxy`` boxes ``(..., 4)`` (element-wise; differentiable)."""
    inter, union = _overlap(boxes1, boxes2)
    return inter / (union + eps)


def generalized_box_iou_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of matching rows, ``(...)``, in [-1, 1]: IoU minus the share of the smallest enclosing box
    that the union leaves empty (element-wise; differentiable, the GIoU loss is ``1 - giou``)."""
    inter, union = _overlap(boxes1, boxes2)
    iou = inter / (union + eps)
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / (enclosing + eps)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of every pair, ``(N, M)``, of ``xyxy`` boxes ``(N, 4)`` and ``(M, 4)``."""
    return generalized_box_iou_pairs(boxes1[:, None, :], boxes2[None, :, :])


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Indices of the boxes NMS keeps, each class on its own, by descending score.

    Boxes of different classes never suppress each other: each class is moved to its own region of the
    plane (torchvision's ``batched_nms`` offset trick) and kornia's ``nms`` runs once.

    Args:
        boxes: ``(N, 4)`` ``xyxy`` boxes.
        scores: ``(N,)`` scores.
        labels: ``(N,)`` class indices.
        iou_threshold: A box overlapping a kept box of its class by more than this is dropped.
    """
    from kornia.geometry.bbox import nms

    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    # kornia's nms refuses boxes without area; they cannot suppress anything, keep them out of its way
    valid = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
    if len(valid) == 0:
        return valid
    boxes, scores, labels = boxes[valid], scores[valid].float(), labels[valid]
    offsets = labels.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
    keep = nms(boxes + offsets[:, None], scores, iou_threshold)
    return valid[keep]
