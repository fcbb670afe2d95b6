"""Int8 dynamic quantization: accuracy of the int8 layers (SQNR, as torchao tests), ties, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tansuo.compress import (
    Int8DynamicConfig,
    Int8DynamicLinear,
    input_absmax,
    quantize_,
    restore_structure,
    smooth_factors,
)
from tansuo.compress.quantize import restore_quantized
from tansuo.errors import CompressionError
from tansuo.models import create_model


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    return (20 * torch.log10(ref.norm() / (ref - approx).norm())).item()


def test_int8_linear_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8DynamicLinear.from_float(linear)
    x = torch.randn(4, 10, 64)
    with torch.no_grad():
        ref, out = linear(x), q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert sqnr(ref, out) > 30  # 8-bit weights and 7-bit activations: about 35 dB here
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (48,)
    # the int8 weights represent the float ones to within half a step per channel
    err = (q.dequantized_weight() - linear.weight).abs().max(dim=1).values
    assert torch.all(err <= q.weight_scale / 2 + 1e-7)


def test_quantize_bert_keeps_tied_decoder_and_output_close() -> None:
    torch.manual_seed(0)
    model = create_model("bert_test", num_classes=3).eval()
    ids = model.example_input(4, seq_len=12)
    with torch.no_grad():
        ref = model.forward_features(ids)
    names = quantize_(model, Int8DynamicConfig())
    assert "mlm_head.decoder" not in names  # tied to the token embedding: stays fp32
    assert model.mlm_head.decoder.weight is model.tok_emb.weight
    assert "stack.layers.0.attn.q_proj" in names and "head" in names
    assert isinstance(model.stack.layers[0].mlp.in_proj, Int8DynamicLinear)
    with torch.no_grad():
        out = model.forward_features(ids)
    assert sqnr(ref, out) > 20


def test_filter_fn_chooses_layers() -> None:
    model = create_model("bert_test", num_classes=2)
    names = quantize_(model, filter_fn=lambda m, name: name.startswith("stack.layers.1."))
    assert names and all(n.startswith("stack.layers.1.") for n in names)
    assert isinstance(model.stack.layers[0].attn.q_proj, nn.Linear)


def test_quantized_state_dict_round_trips_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("vit_test", num_classes=4).eval()
    names = quantize_(model)
    x = model.example_input(3)
    with torch.no_grad():
        ref = model(x)
    fresh = create_model("vit_test", num_classes=4).eval()
    restore_quantized(fresh, names)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_gpu_models_are_refused() -> None:
    model = create_model("bert_test")
    model.to("meta")
    with pytest.raises(CompressionError, match="CPU"):
        quantize_(model)


def test_missing_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tansuo.compress.quantize.supported_engines", lambda: ["qnnpack"])
    with pytest.raises(CompressionError, match="x86 engines"):
        quantize_(create_model("bert_test"))


def test_quantized_gpt_still_generates_with_its_cache() -> None:
    torch.manual_seed(0)
    model = create_model("gpt_test").eval()
    idx = model.example_input(1, seq_len=8)
    with torch.no_grad():
        ref = model.generate(idx, max_new_tokens=6, temperature=0.0)
    names = quantize_(model)
    assert names and all("tok_emb" not in n for n in names)
    with torch.no_grad():
        out = model.generate(idx, max_new_tokens=6, temperature=0.0)
    assert out.shape == ref.shape and torch.equal(out[:, :8], idx)


def test_smooth_factors_leave_the_product_unchanged() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(16, 32), torch.randn(5, 32)
    x[:, 3] *= 50  # an outlier channel
    s = smooth_factors(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-3)
    assert s[3] == s.max()  # the outlier channel is divided the most
    dead = torch.zeros(32)  # a channel that never fired keeps factor 1
    assert smooth_factors(dead, w, 0.5).eq(1).all()


def test_smoothing_moves_activation_outliers_into_the_weights() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(1, 32, 64)
    x[..., :2] *= 60  # two outlier channels, as in LLM and BERT activations (Dettmers et al. 2022)
    absmax = {"": x.abs().reshape(-1, 64).amax(0)}
    with torch.no_grad():
        ref = linear(x)
        plain = Int8DynamicLinear.from_float(linear)(x)
        smooth = Int8DynamicLinear.from_float(linear, Int8DynamicConfig(smooth=0.5), absmax[""])(x)
    assert sqnr(ref, smooth) > sqnr(ref, plain) + 6  # at least 4x less noise power


def test_smoothed_model_needs_calibration_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("bert_test", num_classes=3).eval()
    ids = model.example_input(4, seq_len=12)
    with pytest.raises(CompressionError, match="calibrated input ranges"):
        quantize_(create_model("bert_test", num_classes=3), Int8DynamicConfig(smooth=0.5))
    with pytest.raises(CompressionError, match="alpha"):
        Int8DynamicConfig(smooth=1.5)
    absmax = input_absmax(model, [ids], lambda m, batch: m.forward_features(batch))
    assert absmax["stack.layers.0.attn.q_proj"].shape == (32,)
    quantize_(model, Int8DynamicConfig(smooth=0.5), input_absmax=absmax)
    record = model.compression[-1]
    assert record["smooth"] == 0.5 and "stack.layers.0.mlp.out_proj" in record["smoothed"]
    assert model.stack.layers[0].mlp.out_proj.input_scale is not None
    with torch.no_grad():
        ref = model.forward_features(ids)
    fresh = create_model("bert_test", num_classes=3).eval()
    restore_structure(fresh, model.compression)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(ids), ref)
