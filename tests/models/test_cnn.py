"""ResNet baseline: stages halve the resolution and double the width; classifier reset."""

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.cnn import ResNetConfig


def test_stages_halve_resolution_and_double_width():
    model = create_model("resnet_test", num_stages=3, image_size=16)
    features = model.forward_features(model.example_input())
    assert features.shape == (2, 8 * 4, 4, 4)
    assert model(model.example_input()).shape == (2, 10)


def test_reset_classifier():
    model = create_model("resnet_test")
    model.reset_classifier(4)
    assert model.config.num_classes == 4
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_config_errors():
    with pytest.raises(ValueError, match="width must be at least 1"):
        ResNetConfig(image_size=8, width=0)


def test_group_norm_normalises_each_example_on_its_own():
    torch.manual_seed(0)
    model = create_model("resnet_test", norm="group", norm_groups=4).train()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    x = torch.randn(3, 1, 8, 8)
    alone = model(x[:1])
    other = torch.cat([x[:1], 10 * torch.randn(2, 1, 8, 8)])  # the rest of the batch changes
    torch.testing.assert_close(model(other)[:1], alone)
    batch_norm = create_model("resnet_test").train()  # the default mixes a batch's examples
    assert not torch.allclose(batch_norm(other)[:1], batch_norm(x[:1]))


def test_group_norm_config_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        ResNetConfig(image_size=8, norm="layer")
    with pytest.raises(ValueError, match=r"norm_groups \(3\) must divide width \(8\)"):
        ResNetConfig(image_size=8, width=8, norm="group", norm_groups=3)
