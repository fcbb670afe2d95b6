"""ViT: pooling, conv stem, classifier reset, input checks."""

import dataclasses

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.vit import ViTConfig


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("stem_channels", [0, 4])
def test_pooling_and_stem(pooling, stem_channels):
    torch.manual_seed(0)
    model = create_model("vit_test", pooling=pooling, stem_channels=stem_channels)
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
