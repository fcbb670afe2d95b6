"""The encoder-decoder Transformer and its decoding: a hand-written reference forward, the causal mask,
cached incremental decoding, greedy and beam search."""

import math

import pytest
import torch
import torch.nn.functional as F

from tansuo.blocks import KVCache
from tansuo.models import create_model
from tansuo.models.seq2seq import DecoderState, Seq2Seq, Seq2SeqConfig
from tansuo.models.seq2seq_search import (
    DecodeSettings,
    beam_search,
    beam_search_nbest,
    greedy_search,
    translate_ids,
)

PAD, BOS, EOS = 0, 2, 3


def _model(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    return create_model("seq2seq_test", dropout=0.0, **overrides).eval()


def _source(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 64, (batch, length), generator=g)
    src[1, length - 3 :] = PAD  # a shorter sentence, padded
    return src


# ---------------------------------------------------------------------------------------- a reference


def _ref_attention(mha, x, memory, key_mask=None, causal=False):
    """softmax(Q K^T / sqrt(D)) V per head, written out (Vaswani et al. 2017, section 3.2.1)."""
    B, T, C = x.shape
    H = mha.num_heads
    D = C // H
    q = x @ mha.q_proj.weight.T + mha.q_proj.bias
    kv = memory @ mha.kv_proj.weight.T + mha.kv_proj.bias
    k, v = kv[..., :C], kv[..., C:]
    q, k, v = (t.reshape(B, -1, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, *, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, S)
    S = k.shape[2]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if causal:
        future = torch.ones(T, S, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    y = scores.softmax(-1) @ v  # (B, H, T, D)
    return y.transpose(1, 2).reshape(B, T, C) @ mha.out_proj.weight.T + mha.out_proj.bias


def _ln(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _ref_layer(layer, x, memory=None, key_mask=None, memory_mask=None, causal=False):
    h = _ln(layer.attn_norm, x)
    x = x + _ref_attention(layer.attn, h, h, key_mask, causal)
    if memory is not None:
        x = x + _ref_attention(layer.cross_attn, _ln(layer.cross_attn_norm, x), memory, memory_mask)
    h = _ln(layer.mlp_norm, x)
    mlp = layer.mlp
    return (
        x
        + torch.relu(h @ mlp.in_proj.weight.T + mlp.in_proj.bias) @ mlp.out_proj.weight.T
        + mlp.out_proj.bias
    )


def _sinusoids(T: int, C: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(0, C, 2, dtype=torch.float64)
    angle = pos / 10000 ** (i / C)
    table = torch.zeros(T, C, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return table.float()


def _reference(model: Seq2Seq, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    C = model.config.embed_dim
    E = model.tok_emb.weight
    src_mask = src != PAD
    x = E[src] * math.sqrt(C) + _sinusoids(src.shape[1], C)
    for layer in model.encoder.layers:
        x = _ref_layer(layer, x, key_mask=src_mask)
    memory = _ln(model.encoder.final_norm, x)
    y = E[tgt] * math.sqrt(C) + _sinusoids(tgt.shape[1], C)
    for layer in model.decoder.layers:
        y = _ref_layer(layer, y, memory=memory, memory_mask=src_mask, causal=True)
    return _ln(model.decoder.final_norm, y) @ E.T  # the tied output projection


def test_forward_equals_a_hand_written_reference():
    model = _model()
    src = _source()
    tgt = torch.randint(4, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), _reference(model, src, tgt), rtol=1e-4, atol=1e-5)


def test_untied_embeddings_have_their_own_matrices():
    model = _model(tie_embeddings=False)
    names = {n for n, _ in model.named_parameters()}
    assert {"tok_emb.weight", "tgt_emb.weight", "head.weight"} <= names
    tied = _model()
    assert model.num_params() - tied.num_params() == 2 * 64 * 32


def test_the_causal_mask_lets_nothing_from_the_future_through():
    model = _model()
    src = _source()
    tgt = torch.randint(4, 64, (3, 6), generator=torch.Generator().manual_seed(3))
    changed = tgt.clone()
    changed[:, 3:] = torch.randint(4, 64, (3, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_padding_of_the_source_changes_nothing():
    model = _model()
    src = _source()
    tgt = torch.randint(4, 64, (3, 4), generator=torch.Generator().manual_seed(5))
    longer = torch.cat([src, torch.full((3, 2), PAD)], dim=1)
    longer[0, -2:], longer[2, -2:] = PAD, PAD
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt)[1], model(longer, tgt)[1], rtol=1e-5, atol=1e-5)


def test_cached_incremental_decoding_equals_full_recomputation():
    model = _model()
    src = _source()
    tgt = torch.randint(4, 64, (3, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(src, tgt)  # (B, T, V)
        mask = model.source_mask(src)
        memory = model.encode(src, mask)
        state = model.init_state(3, 8, memory)
        steps = [model.step(tgt[:, t : t + 1], memory, mask, state) for t in range(6)]
        chunked_state = model.init_state(3, 8, memory)  # a prefix at once, then one token at a time
        head = model.forward_head(model.decode(tgt[:, :4], memory, mask, chunked_state))
        tail = [model.step(tgt[:, t : t + 1], memory, mask, chunked_state) for t in (4, 5)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, torch.stack(tail, dim=1)], dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.length == 6


def test_the_encoder_keys_and_values_are_projected_once():
    model = _model()
    src = _source()
    calls = []
    handles = [
        layer.cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
        for layer in model.decoder.layers
    ]
    greedy_search(model, src, DecodeSettings(beam_size=1, max_len_extra=5))
    for handle in handles:
        handle.remove()
    assert len(calls) == len(model.decoder.layers)  # once per layer, not once per step


def test_beam_search_with_beam_one_equals_greedy():
    model = _model()
    src = _source(batch=5, length=8)
    settings = DecodeSettings(beam_size=1, max_len_ratio=1.0, max_len_extra=4, bos_id=BOS, eos_id=EOS)
    greedy = greedy_search(model, src, settings)
    assert beam_search(model, src, settings) == greedy
    assert translate_ids(model, src, settings) == greedy
    assert all(len(ids) <= 1.0 * int((row != PAD).sum()) + 4 for ids, row in zip(greedy, src, strict=True))


def test_batched_beam_search_equals_one_sentence_at_a_time():
    model = _model()
    src = _source(batch=4, length=6)
    settings = DecodeSettings(beam_size=3, max_len_extra=6)
    together = beam_search(model, src, settings)
    alone = [beam_search(model, row[row != PAD][None], settings)[0] for row in src]
    assert together == alone


class _Markov(Seq2Seq):
    """A toy decoder whose next-token probabilities depend on the last token only (a fixed table): after
    <s>, A 0.6 and B 0.4; after A, A 0.34, B 0.33 and </s> 0.33; after B, </s> 0.99. The best sequence is
    "B </s>" (0.396) while greedy decoding takes A and never finds a likelier way out."""

    A, B = 4, 5

    def __init__(self) -> None:
        super().__init__(
            Seq2SeqConfig(
                vocab_size=6, embed_dim=4, num_encoder_layers=1, num_decoder_layers=1, num_heads=1, mlp_dim=4
            )
        )
        table = torch.full((6, 6), 1e-6)
        table[BOS, self.A], table[BOS, self.B] = 0.6, 0.4
        table[self.A, self.A], table[self.A, self.B], table[self.A, EOS] = 0.34, 0.33, 0.33
        table[self.B, EOS] = 0.99
        table[EOS, EOS] = 1.0
        self.table = table / table.sum(dim=1, keepdim=True)

    def step(self, tokens, memory, src_mask, state):
        for cache in state.self_caches:  # keep the cache's length honest
            cache.length += 1
        return self.table[tokens[:, -1]].log()

    def init_state(self, batch_size, max_len, memory):
        return DecoderState([KVCache(batch_size, 1, max_len, 1)], [KVCache(batch_size, 1, 1, 1)])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_best_sequence_where_greedy_does_not(length_penalty):
    model = _Markov().eval()
    src = torch.tensor([[4, 5, EOS], [5, 4, EOS]])
    settings = DecodeSettings(beam_size=3, length_penalty=length_penalty, max_len_extra=5)
    assert beam_search(model, src, settings) == [[_Markov.B], [_Markov.B]]
    greedy = greedy_search(model, src, DecodeSettings(beam_size=1, max_len_extra=5))
    assert greedy[0][0] == _Markov.A and greedy[0] != [_Markov.B]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_the_n_best_list_holds_each_finished_hypothesis_once_best_first_with_its_score(length_penalty):
    model = _Markov().eval()
    settings = DecodeSettings(beam_size=4, length_penalty=length_penalty, max_len_extra=5)
    (hyps,) = beam_search_nbest(model, torch.tensor([[4, 5, EOS]]), settings)
    A, B = _Markov.A, _Markov.B
    assert sorted(h.ids for h in hyps) == [[], [A], [A, B], [B]]  # beam 4: four finished, each once
    logp = model.table.log()
    for h in hyps:  # the sum of the token log-probabilities, </s> included, over length ** penalty
        path = [BOS, *h.ids, EOS]
        total = sum(float(logp[a, b]) for a, b in zip(path, path[1:], strict=False))
        assert h.score == pytest.approx(total / (len(h.ids) + 1) ** length_penalty, rel=1e-5)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert hyps[0].ids == [B] == beam_search(model, torch.tensor([[4, 5, EOS]]), settings)[0]
    # without a penalty "A </s>" leads "A B </s>" by the </s> after B; per token the longer one leads
    assert [h.ids for h in hyps][1] == ([A, B] if length_penalty else [A])


def test_n_best_lists_of_a_batch_equal_one_sentence_at_a_time_and_lead_with_the_best():
    model = _model()
    src = _source(batch=4, length=6)
    settings = DecodeSettings(beam_size=4, max_len_extra=6)
    together = beam_search_nbest(model, src, settings)
    assert [hyps[0].ids for hyps in together] == beam_search(model, src, settings)
    for hyps, row in zip(together, src, strict=True):
        assert len(hyps) == 4 and len({tuple(h.ids) for h in hyps}) == 4  # distinct
        assert all(a.score >= b.score for a, b in zip(hyps, hyps[1:], strict=False))
        (alone,) = beam_search_nbest(model, row[row != PAD][None], settings)
        assert [h.ids for h in alone] == [h.ids for h in hyps]
        assert [h.score for h in alone] == pytest.approx([h.score for h in hyps], abs=1e-5)


def test_decode_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="beam_size"):
        DecodeSettings(beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        DecodeSettings(max_len_ratio=0, max_len_extra=0)
