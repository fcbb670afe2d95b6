"""FCOS's training targets, loss and decoding (Tian et al. 2019), for the detectors of ``models/det_head.py``.

Targets: a point is a positive for a ground-truth box when it lies inside the box, within ``radius`` strides
of the box centre (FCOS's centre sampling) and the box's largest side distance from it falls in the point
level's size range (``[4 s, 8 s]`` for stride ``s``, the finest level from 0, the coarsest to infinity: FCOS's
``[0, 64], [64, 128], ...`` on strides 8, 16, ...). A point that several boxes claim takes the smallest.
Loss: sigmoid focal loss over every point and class (kornia's ``binary_focal_loss_with_logits``, alpha
0.25, gamma 2) over the number of positives, GIoU loss of the positives' boxes weighted by their centre-ness
target, and the centre-ness BCE. Decoding: score ``sqrt(sigmoid(class) * sigmoid(centre-ness))``, the best
``pre_nms`` candidates above a threshold, class-wise NMS, at most ``max_detections`` per image.

Shapes: B batch, A points, M ground-truth boxes per image (padded, label -1), K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tansuo.data.boxes import batched_nms, generalized_box_iou_pairs

IGNORE = -100  # target of a background point in ``logits`` (as cross-entropy's ignore_index)


def size_ranges(point_strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bound ``(A,)`` of the largest side distance a point's level takes."""
    levels = torch.unique(point_strides)
    low = torch.where(point_strides == levels[0], 0.0, 4 * point_strides)
    high = torch.where(point_strides == levels[-1], float("inf"), 8 * point_strides)
    return low, high


@dataclass
class Targets:
    """Per point: ``labels`` ``(B, A)`` class index or -1, ``boxes`` ``(B, A, 4)`` its box (xyxy),
    ``centerness`` ``(B, A)`` its centre-ness target (0 for background)."""

    labels: torch.Tensor
    boxes: torch.Tensor
    centerness: torch.Tensor


def assign(
    points: torch.Tensor,
    point_strides: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    radius: float,
) -> Targets:
    """FCOS targets of every point for ground-truth ``boxes`` ``(B, M, 4)`` and ``labels`` ``(B, M)``."""
    B, M = labels.shape
    A = len(points)
    if M == 0:
        return Targets(labels.new_full((B, A), -1), boxes.new_zeros(B, A, 4), boxes.new_zeros(B, A))
    px, py = points[:, 0][None, :, None], points[:, 1][None, :, None]  # (1, A, 1)
    x1, y1, x2, y2 = (boxes[..., i][:, None, :] for i in range(4))  # (B, 1, M)
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1)  # (B, A, M, 4)
    inside = ltrb.min(-1).values > 0
    r = (point_strides * radius)[None, :, None]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    near = (
        (px > torch.maximum(cx - r, x1))
        & (px < torch.minimum(cx + r, x2))
        & (py > torch.maximum(cy - r, y1))
        & (py < torch.minimum(cy + r, y2))
    )
    low, high = size_ranges(point_strides)
    reach = ltrb.max(-1).values
    in_range = (reach >= low[None, :, None]) & (reach <= high[None, :, None])
    ok = inside & near & in_range & (labels[:, None, :] >= 0)  # (B, A, M)
    area = ((x2 - x1) * (y2 - y1)).expand(B, A, M)
    area = torch.where(ok, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(-1)  # (B, A)
    positive = torch.isfinite(best_area)
    target_labels = torch.where(positive, labels.gather(1, best), -1)
    target_boxes = boxes.gather(1, best[..., None].expand(B, A, 4))  # (B, A, 4)
    d = ltrb.gather(2, best[:, :, None, None].expand(B, A, 1, 4))[:, :, 0]  # (B, A, 4)
    lr, tb = d[..., [0, 2]].clamp(min=0), d[..., [1, 3]].clamp(min=0)
    ctr = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)) * (
        tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    )
    ctr = torch.where(positive, ctr.clamp(min=0).sqrt(), 0.0)
    return Targets(target_labels, target_boxes, ctr)


def fcos_loss(
    out: torch.Tensor,
    points: torch.Tensor,
    point_strides: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    radius: float = 1.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FCOS loss of the head's output ``(B, A, 5 + K)`` against padded ground truth; also its parts."""
    from kornia.losses import binary_focal_loss_with_logits

    out = out.float()
    K = out.shape[-1] - 5
    t = assign(points, point_strides, boxes.float(), labels, radius)
    positive = t.labels >= 0
    num_pos = positive.sum().clamp(min=1).float()
    one_hot = F.one_hot(t.labels.clamp(min=0), K).float() * positive[..., None]
    cls = binary_focal_loss_with_logits(out[..., 5:], one_hot, alpha=0.25, gamma=2.0, reduction="sum")
    cls = cls / num_pos
    if positive.any():
        weight = t.centerness[positive]
        giou = generalized_box_iou_pairs(out[..., :4][positive], t.boxes[positive])
        box = ((1 - giou) * weight).sum() / weight.sum().clamp(min=1e-6)
        ctr = F.binary_cross_entropy_with_logits(
            out[..., 4][positive], t.centerness[positive], reduction="sum"
        )
        ctr = ctr / num_pos
    else:
        box = ctr = out[..., :5].sum() * 0.0
    return cls + box + ctr, {"cls": cls.detach(), "box": box.detach(), "centerness": ctr.detach()}


def class_logits(
    out: torch.Tensor,
    points: torch.Tensor,
    point_strides: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every point's class logits ``(B * A, K)`` and its assigned class ``(B * A,)`` (:data:`IGNORE` for
    background)."""
    t = assign(points, point_strides, boxes.float(), labels, 1.5)
    targets = torch.where(t.labels >= 0, t.labels, IGNORE)
    return out[..., 5:].reshape(-1, out.shape[-1] - 5), targets.reshape(-1)


@dataclass
class Detections:
    """One image's detections on the model input: ``boxes`` ``(N, 4)`` xyxy, ``scores`` ``(N,)``,
    ``labels`` ``(N,)``, best first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def decode(
    out: torch.Tensor,
    *,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
    pre_nms: int = 1000,
    image_size: int | None = None,
) -> list[Detections]:
    """The head's output ``(B, A, 5 + K)`` to each image's detections (boxes clipped to the input)."""
    out = out.detach().float()
    K = out.shape[-1] - 5
    scores = (torch.sigmoid(out[..., 5:]) * torch.sigmoid(out[..., 4:5])).sqrt()  # (B, A, K)
    results = []
    for b in range(out.shape[0]):
        flat = scores[b].flatten()
        candidates = (flat > score_threshold).nonzero().squeeze(1)
        if len(candidates) > pre_nms:
            candidates = candidates[flat[candidates].topk(pre_nms).indices]
        point, label = candidates // K, candidates % K
        boxes = out[b, point, :4]
        if image_size is not None:
            boxes = boxes.clamp(0, image_size)
        keep = batched_nms(boxes, flat[candidates], label, iou_threshold)[:max_detections]
        results.append(Detections(boxes[keep], flat[candidates][keep], label[keep]))
    return results
