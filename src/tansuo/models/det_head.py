"""The anchor-free detection head both detector families share: FCOS (Tian et al. 2019, "FCOS: Fully
Convolutional One-Stage Object Detection").

Every location of every pyramid level is a point that may predict one object: class logits, the distances
from the point to the four sides of its box (``exp(scale * x) * stride``, a learned scale per level) and a
centre-ness logit. Two towers of 3x3 conv-GroupNorm-ReLU (one for classification, one for the box) are
shared by all levels. The forward returns, per point, the decoded ``xyxy`` box in input pixels, so the
output alone (and an ONNX export of it) is enough to draw detections; the task assigns training targets
from the points (:attr:`FCOSHead.points`) and decodes scores and NMS (``tasks/fcos.py``).

Shapes: B batch, C channels, A points over all levels, K classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(32, channels // 4), channels),
        ]
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FCOS's head over feature maps of the given strides, all with ``channels`` channels.

    Args:
        channels: Channels of every pyramid level.
        num_classes: Object classes (no background class: scores are sigmoids).
        strides: Stride of each level, finest first.
        image_size: Side of the square input; fixes the points.
        num_convs: Conv layers in each tower.
    """

    def __init__(
        self, channels: int, num_classes: int, strides: list[int], image_size: int, num_convs: int = 2
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs)
        self.box_tower = _tower(channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log(99.0))  # prior 0.01: focal loss starts stable
        points, point_strides = head_points(image_size, self.strides)
        # not weights: rebuilt from the config, so left out of the state dict
        self.register_buffer("points", points, persistent=False)  # (A, 2) x, y in pixels
        self.register_buffer("point_strides", point_strides, persistent=False)  # (A,)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Feature maps ``(B, C, H_l, W_l)`` per level to ``(B, A, 4 + 1 + K)``: ``xyxy`` box, centre-ness
        logit, class logits."""
        outs = []
        for level, (f, s) in enumerate(zip(features, self.strides, strict=True)):
            cls = self.cls_logits(self.cls_tower(f))  # (B, K, H_l, W_l)
            box_features = self.box_tower(f)
            ltrb = torch.exp((self.scales[level] * self.box_pred(box_features)).clamp(max=10.0)) * s
            ctr = self.centerness(box_features)  # (B, 1, H_l, W_l)
            outs.append(torch.cat([ltrb, ctr, cls], 1).flatten(2))  # (B, 5 + K, H_l * W_l)
        out = torch.cat(outs, 2).transpose(1, 2)  # (B, A, 5 + K)
        p = self.points.to(out.dtype)
        boxes = torch.cat([p - out[..., 0:2], p + out[..., 2:4]], -1)  # (B, A, 4) xyxy
        return torch.cat([boxes, out[..., 4:]], -1)


def head_points(image_size: int, strides: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's points, level by level, finest first, each level row by row: their ``(A, 2)`` ``x, y``
    pixel centres and ``(A,)`` strides. A function of the config alone, so a task can find them for a
    model it only calls (an ONNX Runtime session) from ``model.config``'s ``image_size`` and ``strides``."""
    points, point_strides = [], []
    for s in strides:
        n = math.ceil(image_size / s)
        c = torch.arange(n, dtype=torch.float32) * s + s // 2
        y, x = torch.meshgrid(c, c, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], 1))
        point_strides.append(torch.full((n * n,), float(s)))
    return torch.cat(points), torch.cat(point_strides)


def num_points(image_size: int, strides: list[int]) -> int:
    """Points over all levels for a square input of ``image_size``."""
    return sum(math.ceil(image_size / s) ** 2 for s in strides)
