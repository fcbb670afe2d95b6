"""GPT: KV-cache decoding equals the full pass, generation, weight tying, initialisation, config checks."""

import math

import pytest
import torch

from tansuo.models import create_model
from tansuo.models.gpt import GPTConfig

ATOL = 1e-5  # float32

VARIANTS = {
    "learned": {},
    "rotary": {"positions": "rotary"},
    "llama": {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu"},
}


def _model(**overrides):
    torch.manual_seed(0)
    return create_model("gpt_test", **overrides).eval()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 4, 2]])
def test_kv_cache_decoding_matches_full_forward(variant, chunks):
    model = _model(**VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = model.init_cache(batch_size=2)
    logits, start = [], 0
    for size in chunks:
        logits.append(model(idx[:, start : start + size], cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(logits, dim=1), model(idx), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["learned", "rotary"])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 10}])
def test_generate_with_cache_equals_without(variant, sampling):
    model = _model(**VARIANTS[variant])
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    new = 32  # 5 + 32 > max_seq_len 32: the window slides
    outputs = [
        model.generate(
            prompt, new, **sampling, generator=torch.Generator().manual_seed(2), use_cache=use_cache
        )
        for use_cache in (True, False)
    ]
    assert outputs[0].shape == (2, 5 + new)
    assert torch.equal(outputs[0][:, :5], prompt)
    assert torch.equal(outputs[0], outputs[1])


def test_greedy_generation_follows_the_argmax():
    model = _model()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, 3, temperature=0.0)
    for t in range(4, 7):
        assert out[0, t] == model(out[:, :t])[0, -1].argmax()


def test_forward_beyond_context_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        model.init_cache(1, max_seq_len=64)


def test_head_is_tied_and_saved_once():
    model = _model()
    assert model.lm_head.weight is model.tok_emb.weight
    state = model.state_dict()
    assert "lm_head.weight" not in state
    other = _model(dropout=0.1)
    other.load_state_dict(state)  # strict: the tied head is restored from the embedding
    assert other.lm_head.weight is other.tok_emb.weight
    assert torch.equal(other.lm_head.weight, model.tok_emb.weight)


def test_residual_projections_are_scaled_down_with_depth():
    torch.manual_seed(0)
    model = create_model("gpt_test", embed_dim=128, num_heads=4, num_layers=8)
    expected = 0.02 / math.sqrt(2 * 8)
    for layer in model.stack.layers:
        for weight in (layer.attn.out_proj.weight, layer.mlp.out_proj.weight):
            assert abs(weight.std().item() - expected) < 0.1 * expected
        assert abs(layer.attn.q_proj.weight.std().item() - 0.02) < 0.002


def test_num_params_excludes_embeddings():
    model = _model()
    embeddings = 64 * 32 + 32 * 32  # tokens (shared with the head) + learned positions
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embeddings
    assert _model(positions="rotary").num_params() == model.num_params() - 32 * 32


def test_swiglu_keeps_parameter_count_close():
    gelu, swiglu = _model().num_params(), _model(mlp="swiglu").num_params()
    assert abs(swiglu - gelu) / gelu < 0.05


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 130, "num_heads": 4}, r"embed_dim \(130\) must be divisible by num_heads \(4\)"),
        ({"embed_dim": 36, "num_heads": 4, "positions": "rotary"}, "even head width"),
        ({"norm": "batchnorm"}, "norm must be one of 'layernorm', 'rmsnorm'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"num_layers": "4"}, "num_layers must be int"),
    ],
)
def test_config_errors_say_what_to_change(overrides, message):
    fields = dict(vocab_size=10, num_layers=1, num_heads=2, embed_dim=8)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**fields, **overrides})


def test_top_p_keeps_the_smallest_set_worth_p() -> None:
    from tansuo.models.sampling import sample_logits

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_logits(probs.log(), 1.0, None, g, top_p=0.75)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 alone is short of 0.75; 0.5 + 0.3 reaches it
    assert {int(sample_logits(probs.log(), 1.0, None, g, top_p=0.4)) for _ in range(50)} == {0}
    assert {int(sample_logits(probs.log(), 1.0, None, g, top_p=1.0)) for _ in range(500)} == {0, 1, 2, 3}
