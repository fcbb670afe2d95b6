"""MultiHeadAttention against attention written out by hand; masks, causality and the KV cache."""

import math

import pytest
import torch

from tansuo.blocks import KVCache, MultiHeadAttention, RotaryEmbedding, attention_mask

ATOL = 1e-5  # float32


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def _by_hand(attn: MultiHeadAttention, x, memory=None, mask=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + mask) V with the module's own weights."""
    source = x if memory is None else memory
    q = x @ attn.q_proj.weight.T + attn.q_proj.bias
    k, v = (source @ attn.kv_proj.weight.T + attn.kv_proj.bias).chunk(2, dim=-1)
    q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape)
    return y @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.fixture
def attn() -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(16, 4).eval()


def test_self_attention_matches_hand_computation(attn):
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), _by_hand(attn, x), atol=ATOL, rtol=0)


def test_padding_mask_matches_hand_computation(attn):
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[True] * 5, [True, True, True, False, False]])
    expected = _by_hand(attn, x, mask=padding[:, None, None, :])
    torch.testing.assert_close(attn(x, key_padding_mask=padding), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_export_form_is_the_same_function(bias):
    # what torch.export traces (three projections, additive mask) against the eager path, with padding, a
    # row of padding only, and heads of different count than width / head_dim (as after pruning)
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, bias=bias).eval()
    attn.q_proj, attn.num_heads, attn.num_kv_heads = torch.nn.Linear(16, 8, bias=bias), 2, 2
    attn.kv_proj = torch.nn.Linear(16, 16, bias=bias)
    attn.out_proj = torch.nn.Linear(8, 16, bias=bias)
    x = torch.randn(3, 5, 16)
    padding = torch.tensor([[True] * 5, [True, True, True, False, False], [False] * 5])
    for mask in (None, padding):
        eager = attn(x, key_padding_mask=mask)
        exported = attn._exported_self_attention(x, mask)
        torch.testing.assert_close(exported[:2], eager[:2], atol=ATOL, rtol=0)
        assert torch.isfinite(exported).all()


def test_export_takes_the_export_form(attn, monkeypatch):
    calls = []
    monkeypatch.setattr(attn, "_exported_self_attention", lambda x, m: calls.append(m) or x)
    x = torch.randn(2, 5, 16)
    torch.export.export(attn, (x,))
    assert len(calls) == 1
    attn(x)
    torch.export.export(attn, (x,), kwargs={"causal": True})  # causal keeps the general form
    assert len(calls) == 1


def test_causal_matches_hand_computation(attn):
    x = torch.randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, causal=True), _by_hand(attn, x, mask=causal), atol=ATOL, rtol=0)


def test_cross_attention_shape_and_hand_computation():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, kv_dim=12).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    memory_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y = attn(x, memory, key_padding_mask=memory_mask)
    assert y.shape == (2, 5, 16)
    torch.testing.assert_close(y, _by_hand(attn, x, memory, memory_mask[:, None, None, :]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="pass memory"):
        attn(x)


def test_causal_attention_lets_nothing_from_the_future_through(attn):
    x = torch.randn(1, 6, 16, requires_grad=True)
    y = attn(x, causal=True)
    for t in range(6):
        (grad,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0), f"position {t} sees the future"
        assert torch.all(grad[:, : t + 1].abs().sum(-1) > 0), f"position {t} does not see its past"


def test_mask_is_causal_in_absolute_positions():
    mask = attention_mask(3, 5, causal=True, offset=2)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert attention_mask(1, 5, causal=True, offset=4) is None  # the last token sees everything


def test_query_with_only_padding_keys_stays_finite(attn):
    x = torch.randn(1, 3, 16)
    padding = torch.tensor([[False, True, True]])
    y = attn(x, causal=True, key_padding_mask=padding)  # query 0 may only see key 0, which is padding
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 3], [7]])
def test_kv_cache_chunks_match_full_pass(chunks, rotary):
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, rotary=RotaryEmbedding(4, 16) if rotary else None).eval()
    x = torch.randn(2, 7, 16)
    cache = KVCache(2, 4, 16, 4)
    outputs, start = [], 0
    for size in chunks:
        outputs.append(attn(x[:, start : start + size], causal=True, cache=cache))
        start += size
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(outputs, dim=1), attn(x, causal=True), atol=ATOL, rtol=0)


def test_kv_cache_refuses_overflow_and_wrong_shapes():
    cache = KVCache(1, 2, 4, 3)
    cache.update(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="is it full"):
        cache.update(torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 1, 3))
    cache.reset()
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3))


def test_embed_dim_must_divide_into_heads():
    with pytest.raises(ValueError, match=r"embed_dim \(130\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(130, 4)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_one_query_attention_equals_sdpa(num_kv_heads: int) -> None:
    """The form a compiled decoding step uses: one query per head over a cache, grouped or not."""
    from tansuo.blocks.attention import _one_query_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k, v = (torch.randn(2, num_kv_heads, 7, 8, generator=g) for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=num_kv_heads != 4)
    torch.testing.assert_close(_one_query_attention(q, k, v), ref, rtol=1e-5, atol=1e-6)
