"""A small U-Net: the convolutional baseline for semantic segmentation.

Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation": an encoder of
double 3x3 convolutions that halves the resolution and doubles the width at each level, and a decoder that
doubles the resolution back (a 2x2 transposed convolution), concatenates the encoder's features of the same
level (the skip connection) and convolves them again. As in most modern versions each convolution is followed
by BatchNorm and padding keeps the size, so the output has the input's size (any multiple of
``2**(depth-1)``).

Shapes: B batch, C channels, K classes, H x W image.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.models._registry import check_dropout, check_positive, check_types, register_model


@dataclass(kw_only=True)
class UNetConfig:
    image_size: int = 64  # height = width of example_input (the network takes any multiple of 2^(depth-1))
    in_channels: int = 3
    num_classes: int = 11  # K, background included
    width: int = 16  # channels of the first level; each deeper level doubles them
    depth: int = 4  # levels, the deepest at 1 / 2^(depth-1) of the resolution
    dropout: float = 0.0  # before the classifier

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "in_channels", "width", "depth"])
        check_positive(self, ["num_classes"], minimum=2)
        check_dropout(self)
        if self.image_size % 2 ** (self.depth - 1):
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by 2^(depth-1) = {2 ** (self.depth - 1)}"
            )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolution-BatchNorm-ReLU, the size kept: ``(B, in, H, W)`` to ``(B, out, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class Up(nn.Module):
    """Double the resolution of the deeper features, join the skip, convolve: the decoder's step."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = double_conv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, in, H/2, W/2)`` and skip ``(B, out, H, W)`` to ``(B, out, H, W)``."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net segmenter; build it with :func:`unet` or a preset.

    Args:
        config: The architecture.
    """

    family = "unet"
    config_class = UNetConfig
    prunable: frozenset[str] = frozenset()  # no attention heads or FFN neurons to remove
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**level for level in range(config.depth)]
        self.down = nn.ModuleList([double_conv(config.in_channels, widths[0])])
        self.down.extend(double_conv(widths[i - 1], widths[i]) for i in range(1, config.depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(Up(widths[i], widths[i - 1]) for i in reversed(range(1, config.depth)))
        self.dropout = nn.Dropout2d(config.dropout)
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a U-Net has no embeddings, so the flag changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.head.weight.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the 1x1 classifier by a fresh one for ``num_classes``; updates ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.head.weight
        self.head = nn.Conv2d(self.config.width, num_classes, 1).to(device=weight.device, dtype=weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, H, W)`` to full-resolution features ``(B, width, H, W)``."""
        step = 2 ** (self.config.depth - 1)
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(
                f"this U-Net takes images whose sides are multiples of {step}, got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize or pad them"
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))  # (B, width * 2^i, H / 2^i, W / 2^i)
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())  # one level up: twice the resolution, half the channels
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, width, H, W)`` to class scores ``(B, K, H, W)``."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, H, W)`` to per-pixel class scores ``(B, K, H, W)``."""
        return self.forward_head(self.forward_features(x))


def unet(
    *,
    image_size: int = 64,
    in_channels: int = 3,
    num_classes: int = 11,
    width: int = 16,
    depth: int = 4,
    dropout: float = 0.0,
) -> UNet:
    """Builds a U-Net from every hyperparameter (see :class:`UNetConfig` for what each means)."""
    config = UNetConfig(
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        width=width,
        depth=depth,
        dropout=dropout,
    )
    return UNet(config)


@register_model
def unet_test(**overrides) -> UNet:
    """Tiny U-Net for tests: 16x16 RGB images, 2 levels of width 4 and 8."""
    return unet(**{**dict(image_size=16, width=4, depth=2), **overrides})


@register_model
def unet_canvas(**overrides) -> UNet:
    """U-Net for 64x64 digit canvases: 4 levels of width 16 to 128 (the original has 5, from 64)."""
    return unet(**{**dict(image_size=64, width=16, depth=4), **overrides})


@register_model
def unet_small(**overrides) -> UNet:
    """U-Net for 256x256 photographs: 5 levels of width 16 to 256."""
    return unet(**{**dict(image_size=256, width=16, depth=5), **overrides})
