"""ViT detector: the project's ViT as a plain backbone, a simple feature pyramid, and the FCOS head.

Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet): the ViT keeps
one token map at stride ``patch_size``; the pyramid is built from that last map alone, upsampling it with
transposed convolutions for finer strides and max-pooling it for coarser ones, each level then projected by
a 1x1 and a 3x3 convolution with GroupNorm. The head is the anchor-free FCOS head shared with the CNN
detector (``det_head.py``), so the two families differ only in their backbone. The ViT is built by
``vit.py`` (mean pooling, no class token, no classifier), so its attention heads and feed-forward
neurons prune as a classifier's do.

Shapes: B batch, N tokens, C embedding width, A points, K classes.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.models._registry import check_dropout, check_positive, check_types, register_model
from tansuo.models.det_head import FCOSHead
from tansuo.models.vit import ViT, ViTConfig


@dataclass(kw_only=True)
class ViTDetConfig:
    embed_dim: int
    num_layers: int
    num_heads: int
    image_size: int = 128  # height = width; inputs of another size are rejected (positions are per patch)
    in_channels: int = 3
    num_classes: int = 10  # object classes (no background class)
    patch_size: int = 8  # the token map's stride
    mlp_ratio: int = 2
    dropout: float = 0.0
    stem_channels: int = 32  # 3x3 conv stem before patchifying (0: none); helps on small data
    stem: str = "single"  # "single": one 3x3 conv; "strided": Xiao et al.'s stride-2 stack (vit.py)
    fpn_channels: int = 64  # channels of every pyramid level and of the head
    num_levels: int = 3  # pyramid levels at strides finest_stride, 2 * finest_stride, ...
    finest_stride: int = 4  # below patch_size: upsampled by transposed convolutions (ViTDet's 1/4 level)
    head_convs: int = 2  # conv layers in each of the head's two towers

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["embed_dim", "num_layers", "num_heads", "image_size", "in_channels"])
        check_positive(self, ["num_classes", "patch_size", "mlp_ratio", "fpn_channels", "num_levels"])
        check_positive(self, ["stem_channels", "head_convs"], minimum=0)
        check_dropout(self)
        for name in ("patch_size", "finest_stride"):
            value = getattr(self, name)
            if value < 2 or value & (value - 1):
                raise ValueError(f"{name} ({value}) must be a power of two of at least 2")
        if self.image_size % max(self.strides[-1], self.patch_size):
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by the coarsest stride "
                f"{self.strides[-1]} and by patch_size; change image_size, finest_stride or num_levels"
            )
        if self.fpn_channels % 4:
            raise ValueError(f"fpn_channels ({self.fpn_channels}) must be divisible by 4 (GroupNorm)")

    @property
    def strides(self) -> list[int]:
        """Stride of each pyramid level, finest first."""
        return [self.finest_stride * 2**i for i in range(self.num_levels)]


def _project(in_channels: int, out_channels: int) -> list[nn.Module]:
    groups = min(32, out_channels // 4)
    return [
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
    ]


class ViTDet(nn.Module):
    """ViT backbone + simple feature pyramid + FCOS head; build it with :func:`vit_det` or a preset.

    Args:
        config: The architecture.
    """

    family = "vit_det"
    config_class = ViTDetConfig
    prunable: frozenset[str] = frozenset({"heads", "ffn"})  # the ViT backbone's
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: ViTDetConfig) -> None:
        super().__init__()
        self.config = config
        C, F = config.embed_dim, config.fpn_channels
        self.backbone = ViT(
            ViTConfig(
                embed_dim=C,
                num_layers=config.num_layers,
                num_heads=config.num_heads,
                image_size=config.image_size,
                in_channels=config.in_channels,
                num_classes=0,
                patch_size=config.patch_size,
                mlp_ratio=config.mlp_ratio,
                dropout=config.dropout,
                stem_channels=config.stem_channels,
                stem=config.stem,
                pooling="mean",
            )
        )
        levels = []
        for stride in config.strides:
            if stride < config.patch_size:  # finer: transposed convolutions, x2 each
                ups: list[nn.Module] = []
                for _ in range(int(math.log2(config.patch_size // stride))):
                    ups += [
                        nn.ConvTranspose2d(C, C, 2, stride=2),
                        nn.GroupNorm(min(32, C // 4), C),
                        nn.GELU(),
                    ]
                pre = ups
            elif stride > config.patch_size:  # coarser: max-pool
                pre = [nn.MaxPool2d(stride // config.patch_size, ceil_mode=True)]
            else:
                pre = []
            levels.append(nn.Sequential(*pre, *_project(C, F)))
        self.pyramid = nn.ModuleList(levels)
        self.head = FCOSHead(F, config.num_classes, config.strides, config.image_size, config.head_convs)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; ``exclude_embeddings`` leaves out the ViT's position embeddings."""
        return self.backbone.num_params(exclude_embeddings) + sum(
            p.numel() for n, p in self.named_parameters() if not n.startswith("backbone.")
        )

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        return self.backbone.example_input(batch_size)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images ``(B, in_channels, S, S)`` to levels ``(B, fpn_channels, S / stride, S / stride)``."""
        tokens = self.backbone.forward_features(x)  # (B, N, C)
        side = self.config.image_size // self.config.patch_size
        grid = tokens.transpose(1, 2).reshape(x.shape[0], self.config.embed_dim, side, side)  # (B, C, h, w)
        return [level(grid) for level in self.pyramid]

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid levels to ``(B, A, 4 + 1 + K)``: ``xyxy`` box, centre-ness logit, class logits."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, S, S)`` to per-point detections ``(B, A, 4 + 1 + num_classes)``."""
        return self.forward_head(self.forward_features(x))


def vit_det(
    *,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    image_size: int = 128,
    in_channels: int = 3,
    num_classes: int = 10,
    patch_size: int = 8,
    mlp_ratio: int = 2,
    dropout: float = 0.0,
    stem_channels: int = 32,
    stem: str = "single",
    fpn_channels: int = 64,
    num_levels: int = 3,
    finest_stride: int = 4,
    head_convs: int = 2,
) -> ViTDet:
    """Builds a ViT detector from every hyperparameter (see :class:`ViTDetConfig` for what each means)."""
    config = ViTDetConfig(
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_size=patch_size,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        stem_channels=stem_channels,
        stem=stem,
        fpn_channels=fpn_channels,
        num_levels=num_levels,
        finest_stride=finest_stride,
        head_convs=head_convs,
    )
    return ViTDet(config)


_TEST = dict(
    image_size=32, patch_size=8, embed_dim=16, num_layers=1, num_heads=2, stem_channels=4, fpn_channels=8,
    num_levels=2, head_convs=1, num_classes=3,
)  # fmt: skip
# 128x128 canvases: 16x16 tokens; levels at strides 8 and 16 (digits of 15-45 pixels all fall on stride 8)
_CANVAS = dict(
    image_size=128, patch_size=8, embed_dim=128, num_layers=4, num_heads=4, fpn_channels=64, finest_stride=8,
    num_levels=2,
)  # fmt: skip
# photographs letterboxed to 320x320: 20x20 tokens at patch 16; levels at strides 8, 16, 32
_SMALL = dict(
    image_size=320, patch_size=16, embed_dim=192, num_layers=6, num_heads=3, fpn_channels=96, finest_stride=8
)  # fmt: skip


@register_model
def vit_det_test(**overrides) -> ViTDet:
    """Tiny ViT detector for tests: 32x32 RGB, 8x8 patches, 1 layer of width 16, 2 levels."""
    return vit_det(**{**_TEST, **overrides})


@register_model
def vit_det_canvas(**overrides) -> ViTDet:
    """ViT detector for 128x128 digit canvases: 8x8 patches, 4 layers of width 128, strides 8/16."""
    return vit_det(**{**_CANVAS, **overrides})


@register_model
def vit_det_small(**overrides) -> ViTDet:
    """ViT detector for 320x320 photographs: 16x16 patches, 6 layers of width 192, strides 8/16/32."""
    return vit_det(**{**_SMALL, **overrides})
