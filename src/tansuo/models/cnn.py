"""A small ResNet: the non-Transformer baseline for image classification.

He et al. 2016, "Deep Residual Learning for Image Recognition", with basic blocks (two 3x3 convolutions with
BatchNorm and an identity or 1x1 projection shortcut; ``norm: group`` puts GroupNorm (Wu & He 2018) in
BatchNorm's place, which normalises each example on its own, as DP-SGD needs: De et al. 2022 train their
private ResNets so) and the CIFAR-style stem of its section 4.2 (one 3x3
convolution, no max-pool) since the images here are small. Each stage after the first halves the resolution
and doubles the width; global average pooling and a linear layer make the head.

Shapes: B batch, C channels, H x W spatial size.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.models._registry import check_choice, check_dropout, check_positive, check_types, register_model


@dataclass(kw_only=True)
class ResNetConfig:
    image_size: int  # height = width; used by example_input (the network itself accepts any size)
    in_channels: int = 1
    num_classes: int = 10  # 0: no head, forward returns the pooled features
    width: int = 32  # channels of the first stage; each later stage doubles them
    num_stages: int = 2  # each stage after the first halves the resolution
    blocks_per_stage: int = 2  # basic blocks per stage (ResNet-18 has 4 stages of 2)
    dropout: float = 0.0  # before the linear head
    norm: str = "batch"  # "batch": BatchNorm; "group": GroupNorm, per example (what DP-SGD can train)
    norm_groups: int = 8  # GroupNorm's groups; must divide width

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "in_channels", "width", "num_stages", "blocks_per_stage"])
        check_positive(self, ["num_classes"], minimum=0)
        check_positive(self, ["norm_groups"])
        check_dropout(self)
        check_choice(self, "norm", ("batch", "group"))
        if self.norm == "group" and self.width % self.norm_groups:
            raise ValueError(
                f"norm_groups ({self.norm_groups}) must divide width ({self.width}) for norm 'group'; "
                "choose a divisor of width"
            )


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 0
) -> list[nn.Module]:
    """A convolution and its norm: BatchNorm, or GroupNorm of ``groups`` groups when above 0."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
    norm = nn.GroupNorm(groups, out_channels) if groups else nn.BatchNorm2d(out_channels)
    return [conv, norm]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the first conv carries the stride.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: 2 to halve the resolution.
        groups: 0 for BatchNorm; else GroupNorm with this many groups.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3, stride, groups),
            nn.ReLU(),
            *_conv_bn(out_channels, out_channels, 3, 1, groups),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride, groups))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` to ``(B, out_channels, H / stride, W / stride)``."""
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet classifier; build it with :func:`resnet` or a preset.

    Args:
        config: The architecture.
    """

    family = "resnet"
    config_class = ResNetConfig
    prunable: frozenset[str] = frozenset()  # what structured pruning may remove
    onnx_inputs: tuple[str, ...] = ("pixels",)  # its ONNX export's inputs; () = no export

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        groups = config.norm_groups if config.norm == "group" else 0
        self.stem = nn.Sequential(*_conv_bn(config.in_channels, config.width, 3, 1, groups), nn.ReLU())
        blocks, channels = [], config.width
        for stage in range(config.num_stages):
            out_channels = config.width * 2**stage
            for i in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, groups))
                channels = out_channels
        self.stages = nn.Sequential(*blocks)
        self.num_features = channels
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(channels, config.num_classes) if config.num_classes else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a ResNet has no embeddings, so the flag changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.stem[0].weight.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a new, freshly initialised one (0: no head); updates ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.stem[0].weight
        head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.head = head.to(device=weight.device, dtype=weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, H, W)`` to feature maps ``(B, C, H / 2^(num_stages-1), ...)``."""
        return self.stages(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature maps ``(B, C, H', W')`` to logits ``(B, num_classes)``."""
        return self.head(self.dropout(features.mean(dim=(2, 3))))  # global average pool: (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, H, W)`` to class logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def resnet(
    *,
    image_size: int,
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 32,
    num_stages: int = 2,
    blocks_per_stage: int = 2,
    dropout: float = 0.0,
    norm: str = "batch",
    norm_groups: int = 8,
) -> ResNet:
    """Builds a ResNet from every hyperparameter (see :class:`ResNetConfig` for what each means)."""
    config = ResNetConfig(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        width=width,
        num_stages=num_stages,
        blocks_per_stage=blocks_per_stage,
        dropout=dropout,
        norm=norm,
        norm_groups=norm_groups,
    )
    return ResNet(config)


_RESNET_TEST = dict(image_size=8, width=8, num_stages=2, blocks_per_stage=1)
_RESNET_DIGITS = dict(image_size=8, width=32, num_stages=2, blocks_per_stage=2)
_RESNET_MNIST = dict(image_size=28, width=32, num_stages=3, blocks_per_stage=2)


@register_model
def resnet_test(**overrides) -> ResNet:
    """Tiny ResNet for tests: 8x8 grey images, 2 stages of 1 block, width 8."""
    return resnet(**{**_RESNET_TEST, **overrides})


@register_model
def resnet_digits(**overrides) -> ResNet:
    """ResNet for scikit-learn's 8x8 digits: 2 stages of 2 blocks, widths 32 and 64."""
    return resnet(**{**_RESNET_DIGITS, **overrides})


@register_model
def resnet_mnist(**overrides) -> ResNet:
    """ResNet for 28x28 MNIST-like images: 3 stages of 2 blocks, widths 32, 64, 128."""
    return resnet(**{**_RESNET_MNIST, **overrides})
