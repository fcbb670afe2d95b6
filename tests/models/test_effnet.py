"""The EfficientNet-Lite0 classifier: ImageNet checkpoints loaded whole (classifier included at 1,000
classes), grey and small inputs, and a frozen backbone that never learns or updates its BatchNorm
statistics, in plain and in private (DP-SGD) training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.init import load_initial_weights
from tests.helpers import image_recipe, make_trainer
from tests.models.test_effnet_det import lite0_state_dict


def test_an_imagenet_checkpoint_loads_whole_and_the_classifier_only_at_1000_classes(tmp_path: Path) -> None:
    source = lite0_state_dict(seed=1)
    torch.save(source, tmp_path / "lite0.pth")
    full = create_model("effnet_lite0")
    report = load_initial_weights(full, tmp_path / "lite0.pth")
    assert len(report.loaded) == 296 and not report.skipped and not report.missing
    mine = full.state_dict()
    for theirs, ours in [
        ("_conv_head.weight", "head_conv.0.weight"),
        ("_bn1.running_mean", "head_conv.1.running_mean"),
        ("_fc.weight", "classifier.weight"),
        ("_blocks.15._project_conv.weight", "blocks.15.project.0.weight"),
    ]:
        torch.testing.assert_close(mine[ours], source[theirs], atol=0, rtol=0)
    # ten classes: the ImageNet classifier has no place; "blocks" features: nor has the head convolution
    probe = create_model("effnet_lite0_probe", image_size=28, in_channels=1, num_classes=10)
    report = load_initial_weights(probe, tmp_path / "lite0.pth")
    assert len(report.loaded) == 288 and sorted(report.missing) == ["classifier.bias", "classifier.weight"]


def test_grey_small_images_are_resized_and_repeated_into_rgb() -> None:
    torch.manual_seed(0)
    model = create_model("effnet_lite0_probe", image_size=28, in_channels=1, num_classes=4).eval()
    grey = torch.randn(2, 1, 28, 28)
    rgb = torch.nn.functional.interpolate(grey, size=(128, 128), mode="bilinear").expand(-1, 3, -1, -1)
    torch.testing.assert_close(model(grey), model.classifier(model.feature_norm(model.forward_features(rgb))))
    assert model.forward_features(grey).shape == (2, 320)
    with pytest.raises(ValueError, match="set resize"):
        create_model("effnet_lite0_probe", image_size=28, in_channels=1, resize=0)
    with pytest.raises(ValueError, match="must be 3 .RGB. or 1"):
        create_model("effnet_lite0", in_channels=4)


def test_a_frozen_backbone_stays_in_eval_mode_and_only_the_classifier_trains() -> None:
    model = create_model("effnet_lite0_test")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    model.train()
    assert model.classifier.training and not model.stem.training
    assert not any(m.training for m in model.blocks.modules())
    stats = model.stem[1].running_mean.clone()
    model(torch.randn(4, 1, 32, 32) * 5 + 3)
    torch.testing.assert_close(model.stem[1].running_mean, stats, atol=0, rtol=0)
    unfrozen = create_model("effnet_lite0_test", freeze_backbone=False).train()
    assert unfrozen.stem.training and all(p.requires_grad for p in unfrozen.parameters())


@pytest.mark.parametrize("private", [False, True])
def test_a_linear_probe_trains_with_and_without_privacy_leaving_the_backbone_as_loaded(
    image_npz: Path, tmp_path: Path, private: bool
) -> None:
    torch.save(lite0_state_dict(seed=2), tmp_path / "lite0.pth")
    extra = {"threads": 1, "max_steps": 3, "eval_every": 3, "grad_clip": 0.0}
    if private:
        extra["privacy"] = {"target_epsilon": 2.0, "delta": 1e-3, "max_grad_norm": 1.0, "accountant": "rdp"}
    raw = image_recipe(image_npz, tmp_path / "run", **extra)
    raw["data"].update(max_shift=0, mean=[3.0], std=[4.0])  # public statistics, as a private run needs
    raw["model"] = {
        "name": "effnet_lite0_test",
        "overrides": {"num_classes": 4},
        "init_from": str(tmp_path / "lite0.pth"),
    }
    trainer = make_trainer(raw)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    after = trainer.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["classifier.bias", "classifier.weight"]  # BatchNorm statistics included
    if private:
        assert 0 < result["privacy"]["epsilon"] <= 2.0
