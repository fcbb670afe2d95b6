"""CNN detector baseline: the project's ResNet with a feature pyramid network and the FCOS head.

A strided conv-BatchNorm-ReLU stem takes the input down to ``stem_stride``; the project's ResNet
(``cnn.py``: basic blocks, each stage after the first halving the resolution and doubling the width) runs
on it, and the outputs of its last ``num_levels`` stages feed a feature pyramid network (Lin et al. 2017,
"Feature Pyramid Networks for Object Detection": lateral 1x1 convolutions, a top-down pathway of nearest
upsampling and sums, a 3x3 convolution per level). The anchor-free FCOS head (``det_head.py``) is the one
the ViT detector uses, so the two families differ only in their backbone.

Shapes: B batch, C channels, A points, K classes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.models._registry import check_dropout, check_positive, check_types, register_model
from tansuo.models.cnn import ResNet, ResNetConfig
from tansuo.models.det_head import FCOSHead


@dataclass(kw_only=True)
class ResNetDetConfig:
    image_size: int = 128  # height = width: fixes the head's points
    in_channels: int = 3
    num_classes: int = 10  # object classes (no background class)
    stem_stride: int = 2  # the stem's stride (1, 2 or 4); the ResNet's first stage runs at it
    width: int = 32  # channels of the ResNet's first stage; each later stage doubles them
    num_stages: int = 4  # ResNet stages; stage i runs at stride stem_stride * 2^i
    blocks_per_stage: int = 1
    fpn_channels: int = 64  # channels of every pyramid level and of the head
    num_levels: int = 3  # the last num_levels stages feed the pyramid
    head_convs: int = 2  # conv layers in each of the head's two towers
    dropout: float = 0.0  # unused by the convolutions; kept so recipes may switch it off uniformly

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "in_channels", "num_classes", "width", "num_stages"])
        check_positive(self, ["blocks_per_stage", "fpn_channels", "num_levels"])
        check_positive(self, ["head_convs"], minimum=0)
        check_dropout(self)
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        if self.num_levels > self.num_stages:
            raise ValueError(
                f"num_levels ({self.num_levels}) cannot exceed num_stages ({self.num_stages}): each level "
                "is the output of one stage"
            )
        if self.fpn_channels % 4:
            raise ValueError(f"fpn_channels ({self.fpn_channels}) must be divisible by 4 (GroupNorm)")

    @property
    def strides(self) -> list[int]:
        """Stride of each pyramid level, finest first."""
        first = self.num_stages - self.num_levels
        return [self.stem_stride * 2 ** (first + i) for i in range(self.num_levels)]


def top_down(laterals: list[torch.Tensor]) -> list[torch.Tensor]:
    """FPN's top-down pathway: each level, coarse to fine, plus the coarser one upsampled (nearest)."""
    out = list(laterals)
    for i in range(len(out) - 2, -1, -1):
        out[i] = out[i] + F.interpolate(out[i + 1], size=out[i].shape[-2:], mode="nearest")
    return out


class ResNetDet(nn.Module):
    """ResNet + FPN + FCOS head; build it with :func:`resnet_det` or a preset.

    Args:
        config: The architecture.
    """

    family = "resnet_det"
    config_class = ResNetDetConfig
    prunable: frozenset[str] = frozenset()  # no attention heads or feed-forward blocks to remove
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: ResNetDetConfig) -> None:
        super().__init__()
        self.config = config
        W, Fc = config.width, config.fpn_channels
        stem: list[nn.Module] = []
        channels = config.in_channels
        for _ in range({1: 0, 2: 1, 4: 2}[config.stem_stride]):
            stem += [nn.Conv2d(channels, W, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(W), nn.ReLU()]
            channels = W
        self.stem = nn.Sequential(*stem)
        self.backbone = ResNet(
            ResNetConfig(
                image_size=config.image_size // config.stem_stride,
                in_channels=channels,
                num_classes=0,
                width=W,
                num_stages=config.num_stages,
                blocks_per_stage=config.blocks_per_stage,
            )
        )
        per_stage = config.blocks_per_stage
        self._stage_ends = [per_stage * (s + 1) for s in range(config.num_stages)]
        level_channels = [W * 2**s for s in range(config.num_stages)][-config.num_levels :]
        self.lateral = nn.ModuleList(nn.Conv2d(c, Fc, 1) for c in level_channels)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(Fc, Fc, 3, padding=1, bias=False), nn.GroupNorm(min(32, Fc // 4), Fc))
            for _ in level_channels
        )
        self.head = FCOSHead(Fc, config.num_classes, config.strides, config.image_size, config.head_convs)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (no embeddings, so the flag changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.head.scales.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, in_channels, S, S)`` to levels ``(B, fpn_channels, S / stride, S / stride)``."""
        x = self.backbone.stem(self.stem(x))
        stage_outputs = []
        for i, block in enumerate(self.backbone.stages, start=1):
            x = block(x)
            if i in self._stage_ends:
                stage_outputs.append(x)
        laterals = [
            lat(f) for lat, f in zip(self.lateral, stage_outputs[-self.config.num_levels :], strict=True)
        ]
        return [out(lat) for out, lat in zip(self.output, top_down(laterals), strict=True)]

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid levels to ``(B, A, 4 + 1 + K)``: ``xyxy`` box, centre-ness logit, class logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, S, S)`` to per-point detections ``(B, A, 4 + 1 + num_classes)``."""
        return self.forward_head(self.forward_features(x))


def resnet_det(
    *,
    image_size: int = 128,
    in_channels: int = 3,
    num_classes: int = 10,
    stem_stride: int = 2,
    width: int = 32,
    num_stages: int = 4,
    blocks_per_stage: int = 1,
    fpn_channels: int = 64,
    num_levels: int = 3,
    head_convs: int = 2,
    dropout: float = 0.0,
) -> ResNetDet:
    """Builds a ResNet detector from every hyperparameter (see :class:`ResNetDetConfig`)."""
    config = ResNetDetConfig(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        stem_stride=stem_stride,
        width=width,
        num_stages=num_stages,
        blocks_per_stage=blocks_per_stage,
        fpn_channels=fpn_channels,
        num_levels=num_levels,
        head_convs=head_convs,
        dropout=dropout,
    )
    return ResNetDet(config)


_TEST = dict(
    image_size=32, num_classes=3, width=4, num_stages=3, num_levels=2, fpn_channels=8, head_convs=1
)  # fmt: skip
# 128x128 canvases: stages at strides 4, 8, 16; levels 8/16 as the ViT detector's
_CANVAS = dict(
    image_size=128, stem_stride=4, width=32, num_stages=3, blocks_per_stage=2, num_levels=2, fpn_channels=64
)  # fmt: skip
# photographs letterboxed to 320x320: stem stride 4, stages at 4, 8, 16, 32; levels 8/16/32
_SMALL = dict(image_size=320, stem_stride=4, width=32, num_stages=4, blocks_per_stage=2, fpn_channels=96)


@register_model
def resnet_det_test(**overrides) -> ResNetDet:
    """Tiny ResNet detector for tests: 32x32 RGB, widths 4/8/16, 2 levels."""
    return resnet_det(**{**_TEST, **overrides})


@register_model
def resnet_det_canvas(**overrides) -> ResNetDet:
    """ResNet detector for 128x128 digit canvases: 3 stages of 2 blocks, widths 32-128, strides 8/16."""
    return resnet_det(**{**_CANVAS, **overrides})


@register_model
def resnet_det_small(**overrides) -> ResNetDet:
    """ResNet detector for 320x320 photographs: 4 stages of 2 blocks, widths 32-256, strides 8/16/32."""
    return resnet_det(**{**_SMALL, **overrides})
