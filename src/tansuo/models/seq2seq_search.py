"""Greedy and beam-search decoding for :class:`~tansuo.models.seq2seq.Seq2Seq`, batched over sentences.

Both encode the source once, keep the decoder's self-attention keys and values in KV caches and the
encoder output's keys and values (projected once) in the cross-attention caches, and stop a sentence at
``</s>`` or at its length limit ``max_len_ratio * source length + max_len_extra`` (fairseq's
``--max-len-a`` / ``--max-len-b``), capped by the model's positions.

Beam search follows fairseq's ``SequenceGenerator``: each step scores every continuation of the ``K`` live
hypotheses of a sentence and keeps the ``2K`` best; those ending in ``</s>`` among the first ``K`` are
finished (their score, the sum of token log-probabilities, divided by ``length ** length_penalty``), the best
``K`` others live on. A sentence is done when it has ``K`` finished hypotheses or reaches its limit (its live
hypotheses are then finished as they are); done sentences leave the batch. With ``K = 1`` it is greedy
decoding. :func:`beam_search_nbest` gives each sentence's finished hypotheses, best first, with their scores
(fairseq's ``--nbest``, transformers' ``num_return_sequences``); :func:`beam_search` the best of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tansuo.models.seq2seq import DecoderState, Seq2Seq


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode: ``beam_size`` 1 is greedy."""

    beam_size: int = 5
    length_penalty: float = 1.0  # finished scores are divided by length ** length_penalty (0: raw sums)
    max_len_ratio: float = 1.5  # a translation has at most ratio * source tokens + extra tokens
    max_len_extra: int = 10
    max_len: int | None = None  # and at most this many tokens (a server's cap); None: the model's positions
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_len_ratio < 0 or self.max_len_extra < 0 or self.max_len_ratio + self.max_len_extra <= 0:
            raise ValueError("max_len_ratio and max_len_extra must be >= 0 and not both 0")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")


class Hypothesis(NamedTuple):
    """A finished translation: token ids without ``<s>`` / ``</s>``, and its score (the sum of its tokens'
    log-probabilities, ``</s>`` included, divided by ``length ** length_penalty``)."""

    ids: list[int]
    score: float


def length_limits(model: Seq2Seq, src_mask: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    """Each sentence's most target tokens (``</s>`` included), ``(B,)`` long, at least 1."""
    src_len = src_mask.sum(dim=1).float()
    limit = (settings.max_len_ratio * src_len + settings.max_len_extra).floor().long()
    cap = model.config.max_seq_len - 1
    return limit.clamp(min=1, max=cap if settings.max_len is None else min(cap, settings.max_len))


def translate_ids(model: Seq2Seq, src: torch.Tensor, settings: DecodeSettings) -> list[list[int]]:
    """Token ids of the translation of each source row ``(B, S)`` (padded with the model's ``pad_id``),
    without ``<s>`` and ``</s>``: greedy for ``beam_size`` 1, else beam search."""
    if settings.beam_size == 1:
        return greedy_search(model, src, settings)
    return beam_search(model, src, settings)


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: torch.Tensor, settings: DecodeSettings) -> list[list[int]]:
    """The most likely next token at each step, for every row at once."""
    B = src.shape[0]
    src_mask = model.source_mask(src)
    memory = model.encode(src, src_mask)  # (B, S, C)
    limits = length_limits(model, src_mask, settings)
    state = model.init_state(B, int(limits.max()), memory)
    tokens = torch.full((B, 1), settings.bos_id, dtype=torch.long, device=src.device)
    out = torch.full((B, int(limits.max())), settings.eos_id, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    lengths = limits.cpu().clone()
    for t in range(int(limits.max())):
        logits = model.step(tokens, memory, src_mask, state).float()  # (B, V)
        logits[:, model.config.pad_id] = -math.inf
        logits[:, settings.bos_id] = -math.inf
        tokens = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        nxt = tokens[:, 0].cpu()
        out[:, t] = nxt
        ended = ~done & (nxt == settings.eos_id)
        lengths[ended] = t
        done |= ended | (t + 1 >= limits.cpu())
        if bool(done.all()):
            break
    return [out[b, : int(lengths[b])].tolist() for b in range(B)]


def beam_search(model: Seq2Seq, src: torch.Tensor, settings: DecodeSettings) -> list[list[int]]:
    """The best finished hypothesis of each row by length-normalised log-probability (see the module)."""
    return [hyps[0].ids if hyps else [] for hyps in beam_search_nbest(model, src, settings)]


@torch.no_grad()
def beam_search_nbest(model: Seq2Seq, src: torch.Tensor, settings: DecodeSettings) -> list[list[Hypothesis]]:
    """Each row's finished hypotheses (up to ``beam_size``, distinct token sequences), best score first; of
    equal scores the one finished first leads."""
    B, K = src.shape[0], settings.beam_size
    device = src.device
    src_mask = model.source_mask(src)
    memory = model.encode(src, src_mask)
    limits = length_limits(model, src_mask, settings).cpu()
    rows = torch.arange(B, device=device).repeat_interleave(K)
    memory, src_mask = memory[rows], src_mask[rows]  # (B*K, S, C), (B*K, S)
    state = model.init_state(B * K, int(limits.max()), memory)
    sentence = torch.arange(B)  # the input row of each live sentence
    tokens = torch.full((B * K, 1), settings.bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # the first step expands one hypothesis, not K copies of it
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    for t in range(int(limits.max())):
        n = len(sentence)
        logp = model.step(tokens[:, -1:], memory, src_mask, state).float().log_softmax(dim=-1)  # (n*K, V)
        V = logp.shape[-1]
        logp[:, model.config.pad_id] = -math.inf
        logp[:, settings.bos_id] = -math.inf
        candidates = (scores.reshape(-1, 1) + logp).view(n, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (n, 2K), best first
        top_beam, top_token = top_index // V, top_index % V
        is_eos = top_token == settings.eos_id
        norm = (t + 1) ** settings.length_penalty
        ended = (is_eos[:, :K] & torch.isfinite(top_scores[:, :K])).nonzero().tolist()
        for i, j in ended:  # finished hypotheses: </s> among the K best continuations
            done_list = finished[int(sentence[i])]
            if len(done_list) < K:
                ids = tokens[i * K + int(top_beam[i, j]), 1:].tolist()
                done_list.append(Hypothesis(ids, float(top_scores[i, j]) / norm))
        # the K best continuations that do not end live on (at most K of the 2K end: one per hypothesis)
        order = (is_eos.long() * 2 * K + torch.arange(2 * K, device=device)).argsort(dim=1)[:, :K]
        scores = top_scores.gather(1, order)  # (n, K)
        beams = top_beam.gather(1, order)
        select = (torch.arange(n, device=device)[:, None] * K + beams).view(-1)  # (n*K,)
        tokens = torch.cat([tokens[select], top_token.gather(1, order).view(-1, 1)], dim=1)
        state.reorder_(
            select, cross=False
        )  # the encoder's keys and values are the same for a sentence's beams
        at_limit = t + 1 >= limits[sentence]
        for i in (
            at_limit.nonzero().view(-1).tolist()
        ):  # out of length: the live hypotheses finish as they are
            done_list = finished[int(sentence[i])]
            for k in range(K):
                if len(done_list) < K and math.isfinite(float(scores[i, k])):
                    done_list.append(Hypothesis(tokens[i * K + k, 1:].tolist(), float(scores[i, k]) / norm))
        done = torch.tensor([len(finished[int(s)]) >= K for s in sentence]) | at_limit
        if bool(done.all()):
            break
        if bool(done.any()):  # finished sentences leave the batch
            keep = (~done).nonzero().view(-1)
            keep_rows = (keep.to(device)[:, None] * K + torch.arange(K, device=device)).view(-1)
            tokens, memory, src_mask = tokens[keep_rows], memory[keep_rows], src_mask[keep_rows]
            state.reorder_(keep_rows)
            scores, sentence = scores[keep.to(device)], sentence[keep]
    return [sorted(done_list, key=lambda h: -h.score) for done_list in finished]  # stable: ties keep order


__all__ = [
    "DecodeSettings",
    "DecoderState",
    "Hypothesis",
    "beam_search",
    "beam_search_nbest",
    "greedy_search",
    "length_limits",
    "translate_ids",
]
