"""RMSNorm, LayerNorm choice and feed-forward networks against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks import FeedForward, RMSNorm, SwiGLU, build_norm


def test_rms_norm_matches_hand_computation():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 6)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)


def test_rms_norm_keeps_bf16():
    assert RMSNorm(4)(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_build_norm():
    assert build_norm("layernorm", 4, bias=False).bias is None
    assert isinstance(build_norm("rmsnorm", 4), RMSNorm)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_norm("batchnorm", 4)


def test_feed_forward_matches_hand_computation():
    torch.manual_seed(0)
    mlp = FeedForward(4, 8)
    x = torch.randn(2, 4)
    hidden = F.gelu(x @ mlp.in_proj.weight.T + mlp.in_proj.bias)
    expected = hidden @ mlp.out_proj.weight.T + mlp.out_proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-6)


def test_swiglu_matches_hand_computation():
    torch.manual_seed(0)
    mlp = SwiGLU(4, 6)
    x = torch.randn(2, 4)
    w_gate, w_up = mlp.in_proj.weight[:6], mlp.in_proj.weight[6:]
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.out_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-6)
