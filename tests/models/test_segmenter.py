"""The Segmenter's decoders: the skip decoder reads the conv stem at full resolution, the shuffle decoder
only per patch; the skip decoder's config errors, classifier reset and ONNX export; the strided stem."""

from pathlib import Path

import pytest
import torch

from tansuo.models import create_model


def _changed_pixels(model: torch.nn.Module, row: int, col: int) -> torch.Tensor:
    """Which output pixels ``(H, W)`` change when the input pixel at ``(row, col)`` changes."""
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[0, :, row, col] += 5.0
    with torch.no_grad():
        return (model(x) - model(y)).abs().amax(dim=(0, 1)) > 1e-6


def test_the_skip_decoder_sees_each_pixel_through_the_stem() -> None:
    torch.manual_seed(0)
    model = create_model("segmenter_test", decoder="skip", decoder_channels=4).eval()
    with torch.no_grad():
        model.upsample.weight.zero_()  # the tokens say nothing: only the stem's path is left
    changed = _changed_pixels(model, 6, 9)
    # stem 3x3 then fuse 3x3: a pixel reaches the outputs within 2 pixels of it, and only those
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:9, 7:12] = True
    assert torch.equal(changed, expected)

    shuffle = create_model("segmenter_test").eval()  # the patch tokens only: no pixel path of its own
    with torch.no_grad():
        shuffle.head.weight.zero_()
    assert not _changed_pixels(shuffle, 6, 9).any()


def test_the_skip_decoder_needs_a_stem_and_a_positive_width() -> None:
    with pytest.raises(ValueError, match="stem_channels above 0"):
        create_model("segmenter_test", decoder="skip", stem_channels=0)
    with pytest.raises(ValueError, match="decoder_channels"):
        create_model("segmenter_test", decoder="skip", decoder_channels=0)
    with pytest.raises(ValueError, match="decoder"):
        create_model("segmenter_test", decoder="fpn")


def test_the_strided_stem_feeds_the_shuffle_decoder_and_not_the_skip_one() -> None:
    torch.manual_seed(0)
    model = create_model("segmenter_test", stem="strided").eval()  # 4x4 patches: two stride-2 layers
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.patch_embed) == 2
    assert model(model.example_input()).shape == (2, 11, 16, 16)
    with pytest.raises(ValueError, match="16x16 images, got 8x8"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="stem 'single'"):
        create_model("segmenter_test", stem="strided", decoder="skip")


def test_the_cascade_decoder_joins_each_stem_level_and_reaches_full_resolution() -> None:
    """TransUNet's cascade on the strided stem: with 8x8 patches the token grid is doubled twice, joined with
    the stem's features at 1/4 then 1/2 of the image, and a transposed convolution gives full resolution;
    the stem's levels carry pixels to the output that the tokens do not."""
    torch.manual_seed(0)
    model = create_model(
        "segmenter_test", image_size=32, patch_size=8, stem="strided", decoder="cascade"
    ).eval()
    assert [(up.up.in_channels, up.up.out_channels) for up in model.cascade] == [(16, 8), (8, 4)]
    assert model(model.example_input()).shape == (2, 11, 32, 32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, 16, 32, 32)
        model.pos_emb.weight.zero_()
        model.encoder = torch.nn.Identity()  # the tokens as the stem made them; then silence them
        model.patch_embed[-1].weight.zero_()
        model.patch_embed[-1].bias.zero_()
        y = x.clone()
        y[0, :, 5, 9] += 5.0
        changed = (model(x) - model(y)).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[5, 9] and changed.sum() < 32 * 32  # a pixel still reaches the output near it, not all


def test_the_cascade_decoder_needs_the_strided_stem() -> None:
    with pytest.raises(ValueError, match="stem 'strided'"):
        create_model("segmenter_test", decoder="cascade")  # the single stem
    with pytest.raises(ValueError, match="stem_channels above 0"):
        create_model("segmenter_test", decoder="cascade", stem="strided", stem_channels=0)


def test_reset_classifier_keeps_the_skip_decoder() -> None:
    torch.manual_seed(0)
    model = create_model("segmenter_test", decoder="skip")
    fuse = model.fuse[0].weight.clone()
    model.reset_classifier(5)
    assert model.config.num_classes == 5
    assert model(model.example_input()).shape == (2, 5, 16, 16)
    assert torch.equal(model.fuse[0].weight, fuse)  # only the classifier is new


@pytest.mark.parametrize(
    "variant", [{"decoder": "skip"}, {"stem": "strided"}, {"stem": "strided", "decoder": "cascade"}]
)
def test_a_segmenter_exports_to_onnx(variant: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tansuo.export.onnx import OnnxModel, export_onnx

    torch.manual_seed(0)
    model = create_model("segmenter_test", num_classes=3, **variant).eval()
    model.model_name = "segmenter_test"
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", model)(x), ref, atol=1e-4, rtol=0)
