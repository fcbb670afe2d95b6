"""TransformerLayer and TransformerStack: the pre-norm formula, cross-attention, causality through a stack."""

import pytest
import torch
from torch import nn

from tansuo.blocks import FeedForward, MultiHeadAttention, TransformerLayer, TransformerStack


def _layer(cross: bool = False) -> TransformerLayer:
    extra = {}
    if cross:
        extra = {"cross_attn": MultiHeadAttention(16, 2, kv_dim=8), "cross_attn_norm": nn.LayerNorm(16)}
    return TransformerLayer(
        MultiHeadAttention(16, 2), FeedForward(16, 32), nn.LayerNorm(16), nn.LayerNorm(16), **extra
    )


def test_layer_is_pre_norm_residual():
    torch.manual_seed(0)
    layer = _layer(cross=True).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    h = x + layer.attn(layer.attn_norm(x), causal=True)
    h = h + layer.cross_attn(layer.cross_attn_norm(h), memory, key_padding_mask=mask)
    expected = h + layer.mlp(layer.mlp_norm(h))
    actual = layer(x, memory=memory, causal=True, memory_mask=mask)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_layer_checks_memory():
    x = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="pass memory"):
        _layer(cross=True)(x)
    with pytest.raises(ValueError, match="without cross-attention"):
        _layer()(x, memory=torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="both or neither"):
        TransformerLayer(nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity(), cross_attn=nn.Identity())


def test_causal_stack_lets_nothing_from_the_future_through():
    torch.manual_seed(0)
    stack = TransformerStack([_layer(), _layer()], nn.LayerNorm(16)).eval()
    x = torch.randn(1, 6, 16, requires_grad=True)
    y = stack(x, causal=True)
    for t in range(6):
        (grad,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0), f"position {t} sees the future"


def test_stack_needs_one_cache_per_layer():
    stack = TransformerStack([_layer(), _layer()])
    with pytest.raises(ValueError, match="one per layer"):
        stack(torch.randn(1, 2, 16), caches=[])
