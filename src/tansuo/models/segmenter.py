"""A Vision Transformer for semantic segmentation: per-pixel class scores from a ViT encoder.

Encoder as in Strudel et al. 2021, "Segmenter: Transformer for Semantic Segmentation" (a plain ViT over
patches with learned positions, no class token), with the optional convolution stems of Xiao et al. 2021
that :mod:`tansuo.models.vit` also offers (one 3x3 conv, or a stack of stride-2 ones). Four decoders:

- ``linear``: Segmenter's linear decoder: each patch token gives K class scores, upsampled bilinearly to the
  image (a 16x16 patch is scored as one; coarse on small images).
- ``shuffle``: each patch token gives the K scores of every pixel of its patch (a linear layer to
  ``K * patch_size**2`` then a pixel shuffle, as SETR's naive head with the upsampling learned). Thin objects
  smaller than a patch (handwritten strokes) need this.
- ``skip``: each patch token gives ``decoder_channels`` features for every pixel of its patch (linear layer,
  pixel shuffle), joined with the conv stem's full-resolution features (a U-Net-style skip, as TransUNet
  and DPT's fusion do), then a 3x3 conv-GELU and a 1x1 classifier. The tokens say *what* is there, the stem
  says *where* its edges are: without it, every patch must learn the outline of every object in it.
- ``cascade``: TransUNet's cascaded upsampler (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders
  for Medical Image Segmentation"), with the ``strided`` stem as its CNN encoder: the token grid is doubled
  in resolution step by step, each step joined with the stem's features of that resolution (U-Net's
  up-convolution and skip, :class:`tansuo.models.unet.Up`), up to half the image; a last transposed
  convolution reaches full resolution, then a 1x1 classifier. A hybrid: convolutions find strokes and edges,
  the Transformer relates the patches.

Shapes: B batch, N patch tokens, C embedding width, K classes, H x W image, P patch side.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks import LearnedPositions
from tansuo.models._registry import check_choice, check_dropout, check_positive, check_types, register_model
from tansuo.models.unet import Up
from tansuo.models.vit import check_image_size, check_stem, init_linear, patch_embedding, vit_encoder


@dataclass(kw_only=True)
class SegmenterConfig:
    embed_dim: int
    num_layers: int
    num_heads: int
    image_size: int = 64  # height = width; inputs of another size are rejected (positions are per patch)
    in_channels: int = 3
    num_classes: int = 11  # K, background included
    patch_size: int = 4  # tokens = (image_size / patch_size)^2
    mlp_ratio: int = 4  # feed-forward hidden width = mlp_ratio * embed_dim
    dropout: float = 0.0
    stem_channels: int = 0  # 0: plain patch embedding; > 0: a conv stem of this width first
    stem: str = "single"  # "single": one 3x3 conv-GELU; "strided": Xiao's stride-2 stack (patch_embedding)
    decoder: str = "shuffle"  # "linear", "shuffle", "skip" or "cascade" (TransUNet): see the module docstring
    decoder_channels: int = 16  # the skip and cascade decoders' width at full resolution

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self,
            ["embed_dim", "num_layers", "num_heads", "image_size", "in_channels", "patch_size", "mlp_ratio"],
        )
        check_positive(self, ["num_classes"], minimum=2)
        check_positive(self, ["stem_channels"], minimum=0)
        check_positive(self, ["decoder_channels"])
        check_dropout(self)
        check_choice(self, "decoder", ("linear", "shuffle", "skip", "cascade"))
        if self.decoder == "cascade" and (not self.stem_channels or self.stem != "strided"):
            raise ValueError(
                "decoder 'cascade' joins the strided stem's features at each resolution; set "
                "stem_channels above 0 (e.g. model.overrides.stem_channels=32) and stem 'strided'"
            )
        if self.decoder == "skip" and (not self.stem_channels or self.stem != "single"):
            raise ValueError(
                "decoder 'skip' joins the full-resolution features of a single conv stem; set "
                "stem_channels above 0 (e.g. model.overrides.stem_channels=32) with stem 'single', or "
                "choose decoder 'shuffle'"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        check_stem(self)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}); "
                "choose a patch_size that divides it"
            )


class Segmenter(nn.Module):
    """ViT encoder + linear or pixel-shuffle decoder; build it with :func:`segmenter` or a preset.

    Args:
        config: The architecture.
    """

    family = "segmenter"
    config_class = SegmenterConfig
    prunable: frozenset[str] = frozenset({"heads", "ffn"})  # its encoder is MultiHeadAttention + FeedForward
    onnx_inputs: tuple[str, ...] = ("pixels",)

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.patch_embed = patch_embedding(
            config.in_channels, C, config.patch_size, config.stem_channels, config.stem
        )
        self.grid = config.image_size // config.patch_size
        self.pos_emb = LearnedPositions(self.grid**2, C)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = vit_encoder(C, config.num_layers, config.num_heads, config.mlp_ratio, config.dropout)
        if config.decoder == "skip":
            D, P = config.decoder_channels, config.patch_size
            self.upsample = nn.Linear(C, D * P * P)  # each token's features for every pixel of its patch
            self.fuse = nn.Sequential(nn.Conv2d(D + config.stem_channels, D, 3, padding=1), nn.GELU())
        if config.decoder == "cascade":
            # the stem's levels joined: stem_channels * 2^i at 1 / 2^(i + 1) of the image, all but the last
            widths = [config.stem_channels * 2**i for i in range(config.patch_size.bit_length() - 2)]
            ins = [C, *reversed(widths[1:])][: len(widths)]  # the token grid, then each step's output
            self.cascade = nn.ModuleList(Up(i, o) for i, o in zip(ins, reversed(widths), strict=True))
            D, last = config.decoder_channels, widths[0] if widths else C
            self.final = nn.Sequential(
                nn.ConvTranspose2d(last, D, 2, stride=2),
                nn.Conv2d(D, D, 3, padding=1, bias=False),
                nn.BatchNorm2d(D),
                nn.ReLU(),
            )
        self.head = self._new_head(config.num_classes)
        self.apply(init_linear)

    def _new_head(self, num_classes: int) -> nn.Module:
        if self.config.decoder in ("skip", "cascade"):
            return nn.Conv2d(self.config.decoder_channels, num_classes, 1)  # the classifier, per pixel
        per_token = num_classes * (self.config.patch_size**2 if self.config.decoder == "shuffle" else 1)
        return nn.Linear(self.config.embed_dim, per_token)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; ``exclude_embeddings`` leaves out the position embeddings."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.pos_emb.weight.numel() if exclude_embeddings else 0)

    def example_input(self, batch_size: int = 2) -> torch.Tensor:
        """Random images ``(batch_size, in_channels, image_size, image_size)`` on the model's device."""
        size = self.config.image_size
        device = self.pos_emb.weight.device
        return torch.randn(batch_size, self.config.in_channels, size, size, device=device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the decoder's classifier by a fresh one for ``num_classes``; updates ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.pos_emb.weight
        self.head = self._new_head(num_classes).to(device=weight.device, dtype=weight.dtype)
        self.head.apply(init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, image_size, image_size)`` to what the classifier reads: normalised patch
        tokens ``(B, N, C)``, or with the ``skip`` and ``cascade`` decoders pixel features
        ``(B, D, H, W)``."""
        check_image_size(x, self.config.image_size, "segmenter")
        levels = []  # the strided stem's features at 1/2, 1/4, ... of the image, for the cascade
        stem = x
        for module in self.patch_embed[:-1]:  # the conv stem; none: x as it is
            stem = module(stem)
            if isinstance(module, nn.ReLU):
                levels.append(stem)
        tokens = self.patch_embed[-1](stem).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.encoder(self.dropout(tokens + self.pos_emb(tokens.shape[1])))
        if self.config.decoder == "skip":
            up = F.pixel_shuffle(self._grid(self.upsample(tokens)), self.config.patch_size)  # (B, D, H, W)
            return self.fuse(torch.cat([up, stem], dim=1))  # (B, D, H, W)
        if self.config.decoder == "cascade":
            x = self._grid(tokens)  # (B, C, H / P, W / P)
            for up, skip in zip(self.cascade, reversed(levels[:-1]), strict=True):
                x = up(x, skip)  # twice the resolution, joined with the stem's features there
            return self.final(x)  # (B, D, H, W)
        return tokens

    def _grid(self, per_token: torch.Tensor) -> torch.Tensor:
        """Per-token values ``(B, N, F)`` laid out on the patch grid ``(B, F, H / P, W / P)``."""
        return per_token.transpose(1, 2).reshape(per_token.shape[0], -1, self.grid, self.grid)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features`' output to class scores ``(B, K, H, W)``."""
        if self.config.decoder in ("skip", "cascade"):
            return self.head(features)  # a 1x1 convolution: (B, K, H, W)
        scores = self._grid(self.head(features))  # (B, K or K * P * P, H / P, W / P)
        if self.config.decoder == "shuffle":
            return F.pixel_shuffle(scores, self.config.patch_size)  # (B, K, H, W)
        size = self.config.image_size
        return F.interpolate(scores, size=(size, size), mode="bilinear")  # (B, K, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_channels, H, W)`` to per-pixel class scores ``(B, K, H, W)``."""
        return self.forward_head(self.forward_features(x))


def segmenter(
    *,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    image_size: int = 64,
    in_channels: int = 3,
    num_classes: int = 11,
    patch_size: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    stem_channels: int = 0,
    stem: str = "single",
    decoder: str = "shuffle",
    decoder_channels: int = 16,
) -> Segmenter:
    """Builds a Segmenter from every hyperparameter (see :class:`SegmenterConfig` for what each means)."""
    config = SegmenterConfig(
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
        decoder=decoder,
        decoder_channels=decoder_channels,
    )
    return Segmenter(config)


_TEST = dict(
    image_size=16, patch_size=4, embed_dim=16, num_layers=2, num_heads=2, stem_channels=4, mlp_ratio=2
)
_CANVAS = dict(image_size=64, patch_size=4, embed_dim=128, num_layers=4, num_heads=4, stem_channels=32)
# ViT-Tiny's width and heads (192, 3) at 8 layers, 16x16 patches of a 256x256 letterboxed photograph
_SMALL = dict(image_size=256, patch_size=16, embed_dim=192, num_layers=8, num_heads=3, stem_channels=0)


@register_model
def segmenter_test(**overrides) -> Segmenter:
    """Tiny Segmenter for tests: 16x16 RGB images, 4x4 patches, conv stem, 2 layers of width 16."""
    return segmenter(**{**_TEST, **overrides})


@register_model
def segmenter_canvas(**overrides) -> Segmenter:
    """Segmenter for 64x64 digit canvases: 4x4 patches (256 tokens), conv stem, 4 layers of width 128."""
    return segmenter(**{**_CANVAS, **overrides})


@register_model
def segmenter_small(**overrides) -> Segmenter:
    """Segmenter for 256x256 photographs: 16x16 patches (256 tokens), 8 layers of width 192, 3 heads."""
    return segmenter(**{**_SMALL, **overrides})
