"""BERT: padding invariance, the post-norm layer, the tied MLM head, parameter counts, safetensors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tansuo.blocks import FeedForward, MultiHeadAttention, PostNormLayer, TransformerLayer, TransformerStack
from tansuo.models import create_model
from tansuo.models.bert import BertConfig

ATOL = 1e-5  # float32


def _model(**overrides):
    torch.manual_seed(0)
    return create_model("bert_test", **overrides).eval()


@pytest.mark.parametrize("prenorm", [False, True])
def test_padding_does_not_change_the_real_tokens(prenorm):
    model = _model(prenorm=prenorm)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (1, 7), generator=gen)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    alone = model.forward_features(ids, token_type_ids=segments)
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    other = torch.randint(1, 128, (1, 12), generator=gen)
    batch = torch.cat([padded_ids, other])
    mask = torch.tensor([[1] * 7 + [0] * 5, [1] * 12])  # int mask, as tokenizers give it
    batch_segments = torch.cat([F.pad(segments, (0, 5)), torch.zeros(1, 12, dtype=torch.long)])
    features = model.forward_features(batch, attention_mask=mask, token_type_ids=batch_segments)
    torch.testing.assert_close(features[:1, :7], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.forward_features(other), features[1:], atol=ATOL, rtol=0)
    logits = model(batch, attention_mask=mask.bool(), token_type_ids=batch_segments)
    torch.testing.assert_close(logits[:1], model(ids, token_type_ids=segments), atol=ATOL, rtol=0)


def test_post_norm_layer_by_hand():
    torch.manual_seed(0)
    C, H, T = 16, 4, 5
    attn = MultiHeadAttention(C, H)
    mlp = FeedForward(C, 4 * C)
    norm1, norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
    for norm in (norm1, norm2):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    layer = PostNormLayer(attn, mlp, norm1, norm2, dropout=0.1).eval()
    x = torch.randn(2, T, C)
    mask = torch.tensor([[True] * T, [True] * 3 + [False] * 2])

    q = attn.q_proj(x).view(2, T, H, C // H).transpose(1, 2)
    k, v = (t.view(2, T, H, C // H).transpose(1, 2) for t in attn.kv_proj(x).chunk(2, dim=-1))
    scores = q @ k.transpose(-1, -2) / (C // H) ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, T, C)
    h = F.layer_norm(x + attn.out_proj(y), (C,), norm1.weight, norm1.bias)
    ff = mlp.out_proj(F.gelu(mlp.in_proj(h)))
    expected = F.layer_norm(h + ff, (C,), norm2.weight, norm2.bias)

    torch.testing.assert_close(layer(x, key_padding_mask=mask), expected, atol=ATOL, rtol=0)
    stack = TransformerStack([layer])
    torch.testing.assert_close(stack(x, key_padding_mask=mask), expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="cross-attention"):
        layer(x, memory=x)


def test_mlm_head_is_tied_to_the_token_embedding():
    model = _model()
    assert model.mlm_head.decoder.weight is model.tok_emb.weight
    assert model.mlm_head.decoder.bias.shape == (128,)
    assert "mlm_head.decoder.weight" not in model.state_dict()
    assert "mlm_head.decoder.bias" in model.state_dict()
    features = model.forward_features(model.example_input())
    logits = model.mlm_logits(features)
    assert logits.shape == (*features.shape[:2], 128)
    h = model.mlm_head.norm(F.gelu(model.mlm_head.dense(features)))
    expected = h @ model.tok_emb.weight.T + model.mlm_head.decoder.bias
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_minilm_l6_has_the_parameter_count_of_bert_model():
    with torch.device("meta"):
        model = create_model("minilm_l6")
    heads = ("mlm_head.", "head.")
    bert_model = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(heads))
    assert bert_model == 22_713_216  # all-MiniLM-L6-v2: embeddings + encoder + pooler
    assert model.num_params() == bert_model + sum(
        p.numel() for name, p in model.named_parameters() if name.startswith(heads)
    )
    embeddings = (30522 + 512 + 2) * 384
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embeddings


def test_prenorm_variant_runs():
    model = _model(prenorm=True)
    assert isinstance(model.stack.layers[0], TransformerLayer)
    assert model.stack.final_norm is not None
    assert isinstance(_model().stack.layers[0], PostNormLayer)
    assert _model().stack.final_norm is None
    x = model.example_input()
    out = model(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_safetensors_round_trip_keeps_the_tied_mlm_decoder(tmp_path):
    model = _model()
    with torch.no_grad():
        model.mlm_head.decoder.bias.normal_()
    path = tmp_path / "bert.safetensors"
    save_file(model.state_dict(), path)
    torch.manual_seed(1)
    rebuilt = create_model("bert_test", **dataclasses.asdict(model.config)).eval()
    rebuilt.load_state_dict(load_file(path))
    assert rebuilt.mlm_head.decoder.weight is rebuilt.tok_emb.weight
    x = model.example_input()
    features = model.forward_features(x)
    assert torch.equal(rebuilt.forward_features(x), features)
    assert torch.equal(rebuilt.mlm_logits(features), model.mlm_logits(features))
    assert torch.equal(rebuilt(x), model(x))


def test_reset_classifier_and_example_input():
    model = _model()
    model.reset_classifier(5)
    assert model.config.num_classes == 5
    x = model.example_input(batch_size=3)
    assert x.shape == (3, 16) and x.dtype == torch.long
    assert model(x).shape == (3, 5)
    model.reset_classifier(0)
    assert model(x).shape == (3, 32)  # the pooled features


def test_init_follows_bert():
    model = _model()
    assert torch.all(model.pooler.bias == 0)
    assert torch.all(model.mlm_head.decoder.bias == 0)
    assert torch.all(model.emb_norm.weight == 1) and torch.all(model.emb_norm.bias == 0)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embed_dim": 31}, "divisible"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"num_classes": -1}, "num_classes"),
        ({"prenorm": 1}, "prenorm"),
    ],
)
def test_config_checks(overrides, message):
    fields = dict(embed_dim=32, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match=message):
        BertConfig(**{**fields, **overrides})


def test_mean_pooling_averages_real_tokens_only():
    torch.manual_seed(0)
    model = create_model("bert_test", pooling="mean", dropout=0.0).eval()
    ids = torch.randint(5, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        features = model.forward_features(ids, attention_mask=mask)
        pooled = model.pooled(features, mask)
        torch.testing.assert_close(pooled[1], features[1, :6].mean(0))
        torch.testing.assert_close(pooled[0], features[0].mean(0))
        # the padded row gives the same logits as the same tokens alone
        alone = model(ids[1:, :6], attention_mask=mask[1:, :6])
        torch.testing.assert_close(model(ids, attention_mask=mask)[1:], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        create_model("bert_test", pooling="max")
