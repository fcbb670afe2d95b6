"""ViT: pooling, conv stem, classifier reset, input checks."""

import dataclasses

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.vit import ViTConfig


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("stem_channels,stem", [(0, "single"), (4, "single"), (4, "strided")])
def test_pooling_and_stem(pooling, stem_channels, stem):
    torch.manual_seed(0)
    model = create_model("vit_test", pooling=pooling, stem_channels=stem_channels, stem=stem)
    x = model.example_input(3)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 4 + (pooling == "cls"), 16)  # 8x8 image, 4x4 patches
    assert (model.cls_token is not None) == (pooling == "cls")
    assert model(x).shape == (3, 10)


def test_reset_classifier_updates_config():
    model = create_model("vit_test")
    model.reset_classifier(3)
    assert model(model.example_input()).shape == (2, 3)
    assert model.config.num_classes == 3
    rebuilt = create_model("vit_test", **dataclasses.asdict(model.config))
    assert rebuilt.head.out_features == 3
    model.reset_classifier(0)
    assert model(model.example_input()).shape == (2, 16)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="8x8"):
        create_model("vit_test")(torch.zeros(1, 1, 12, 12))


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match=r"image_size \(8\) must be divisible by patch_size \(3\)"):
        ViTConfig(embed_dim=8, num_layers=1, num_heads=2, patch_size=3)


def test_the_strided_stem_halves_log2_patch_times_and_keeps_each_patch_apart():
    """Xiao et al.'s stem: 3x3 stride-2 conv-BN-ReLU layers (4x4 patches: two, 4 then 8 channels) and a 1x1
    convolution; its receptive field (3 + 2 * 2 = 7 pixels) reaches into the neighbouring patches."""
    model = create_model("vit_test", stem_channels=4, stem="strided").eval()
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0], c.kernel_size[0]) for c in convs] == [
        (4, 2, 3),
        (8, 2, 3),
        (16, 1, 1),
    ]

    def changed(row: int, col: int) -> list[list[bool]]:
        x = torch.randn(1, 1, 8, 8)
        y = x.clone()
        y[0, 0, row, col] += 5.0
        with torch.no_grad():
            return ((model.patch_embed(x) - model.patch_embed(y)).abs().amax(dim=(0, 1)) > 1e-6).tolist()

    assert changed(0, 0) == [[True, False], [False, False]]  # a corner pixel: its own patch only
    assert changed(3, 3) == [[True, True], [True, True]]  # at the patches' meeting point: all four


@pytest.mark.parametrize("patch_size", [1, 3, 6])
def test_the_strided_stem_needs_a_power_of_two_patch(patch_size):
    with pytest.raises(ValueError, match=f"patch_size {patch_size} is not a power of 2"):
        ViTConfig(
            embed_dim=8,
            num_layers=1,
            num_heads=2,
            image_size=12,
            patch_size=patch_size,
            stem_channels=4,
            stem="strided",
        )
    with pytest.raises(ValueError, match="stem"):
        ViTConfig(embed_dim=8, num_layers=1, num_heads=2, stem="deep")


def test_the_vit_detector_takes_the_strided_stem_to_its_backbone():
    plain = create_model("vit_det_test")
    strided = create_model("vit_det_test", stem="strided")  # 8x8 patches: three stride-2 layers of 4, 8, 16
    convs = [m for m in strided.backbone.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(4, 2), (8, 2), (16, 2), (16, 1)]
    x = torch.randn(2, 3, 32, 32)
    assert strided(x).shape == plain(x).shape
    with pytest.raises(ValueError, match="stem"):
        create_model("vit_det_test", stem="deep")
