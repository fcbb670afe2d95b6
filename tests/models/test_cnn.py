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
