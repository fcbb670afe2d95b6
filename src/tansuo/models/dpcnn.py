"""A small convolutional network made for differentially private training (DP-SGD).

Papernot et al. 2020 ("Tempered Sigmoid Activations for Deep Learning with Differential Privacy") and Tramèr &
Boneh 2021 ("Differentially Private Learning Needs Better Features") train MNIST under DP-SGD with this
shape, also the Opacus MNIST example's: an 8x8 convolution of stride 2 (16 channels), a 2x2 max-pool of stride
1, a 4x4 convolution of stride 2 (32 channels), the same pool, then a 32-unit hidden layer and the classifier.
DP-SGD adds noise to every parameter, so few parameters (26k for 28x28 digits) and a bounded activation
(``tanh``: clipped gradients lose less signal when activations cannot grow) do better under it than a larger
network; ``norm: group`` puts GroupNorm after each convolution (per example, as DP-SGD needs).

Shapes: B batch, C channels, H x W spatial size.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.models._registry import check_choice, check_positive, check_types, register_model


@dataclass(kw_only=True)
class DPCNNConfig:
    image_size: int  # height = width (the hidden layer's input size depends on it)
    in_channels: int = 1
    num_classes: int = 10  # 0: no head, forward returns the hidden layer's features
    width: int = 16  # channels of the first convolution; the second has twice as many
    hidden: int = 32  # units of the layer before the classifier
    activation: str = "tanh"  # "tanh" (tempered sigmoid) or "relu"
    norm: str = "none"  # "none" or "group": GroupNorm after each convolution
    norm_groups: int = 4

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "in_channels", "width", "hidden", "norm_groups"])
        check_positive(self, ["num_classes"], minimum=0)
        check_choice(self, "activation", ("tanh", "relu"))
        check_choice(self, "norm", ("none", "group"))
        if self.norm == "group" and self.width % self.norm_groups:
            raise ValueError(f"norm_groups ({self.norm_groups}) must divide width ({self.width})")
        if _feature_side(self.image_size) < 1:
            raise ValueError(f"image_size {self.image_size} is too small for two strided convolutions (14+)")


def _feature_side(size: int) -> int:
    """Side of the second pool's output for ``size x size`` images."""
    size = (size + 2 * 3 - 8) // 2 + 1 - 1  # conv 8x8 stride 2 padding 3, pool 2x2 stride 1
    return (size - 4) // 2 + 1 - 1  # conv 4x4 stride 2, pool 2x2 stride 1


class DPCNN(nn.Module):
    """The DP-SGD CNN; build it with a preset (``dpcnn_mnist``) or ``DPCNN(DPCNNConfig(...))``.

    Args:
        config: The architecture.
    """

    family = "dpcnn"
    config_class = DPCNNConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: DPCNNConfig) -> None:
        super().__init__()
        self.config = config
        act = nn.Tanh if config.activation == "tanh" else nn.ReLU
        c1, c2 = config.width, 2 * config.width

        def norm(c: int) -> nn.Module:
            return nn.GroupNorm(config.norm_groups, c) if config.norm == "group" else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, 8, stride=2, padding=3),
            norm(c1),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(c1, c2, 4, stride=2),
            norm(c2),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(c2 * _feature_side(config.image_size) ** 2, config.hidden),
            act(),
        )
        self.head = nn.Linear(config.hidden, config.num_classes) if config.num_classes else nn.Identity()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (no embeddings, so the flag changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.features[0].weight.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a new, freshly initialised one (0: no head); updates ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.features[0].weight
        head = nn.Linear(self.config.hidden, num_classes) if num_classes else nn.Identity()
        self.head = head.to(device=weight.device, dtype=weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, image_size, image_size)`` to the hidden layer ``(B, hidden)``."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden features ``(B, hidden)`` to logits ``(B, num_classes)``."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, image_size, image_size)`` to class logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


@register_model
def dpcnn_test(**overrides) -> DPCNN:
    """Tiny DP-SGD CNN for tests: 16x16 grey images, 4 and 8 channels, 8 hidden units."""
    return DPCNN(DPCNNConfig(**{"image_size": 16, "width": 4, "hidden": 8, **overrides}))


@register_model
def dpcnn_mnist(**overrides) -> DPCNN:
    """The DP-SGD CNN for 28x28 digits (Papernot et al. 2020; Opacus' MNIST example): 16 and 32 channels,
    32 hidden units, tanh; 26k parameters."""
    return DPCNN(DPCNNConfig(**{"image_size": 28, **overrides}))
