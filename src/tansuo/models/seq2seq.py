"""The encoder-decoder Transformer for sequence-to-sequence tasks (translation).

Vaswani et al. 2017, "Attention Is All You Need": an encoder of bidirectional self-attention layers reads
the source; a decoder of causal self-attention + cross-attention layers predicts the target one token at a
time. As in fairseq's ``transformer`` with ``--share-all-embeddings``: token embeddings scaled by sqrt(C)
plus sinusoidal positions, one matrix shared by the source and target embeddings and the output projection
(``tie_embeddings``, for a joint vocabulary), ReLU feed-forward. Layers are pre-norm
(:class:`~tansuo.blocks.TransformerLayer`, Xiong et al. 2020) with a final norm after each stack.

Incremental decoding (:meth:`Seq2Seq.step`) keeps a :class:`DecoderState`: one KV cache per decoder
layer's self-attention, and the encoder output's keys and values per layer, projected once on the first
step. Greedy and beam search are in :mod:`tansuo.models.seq2seq_search`.

Shapes: B batch, S source length, T target length, C embedding width, V vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    SinusoidalPositions,
    TransformerLayer,
    TransformerStack,
)
from tansuo.models._registry import (
    check_choice,
    check_dropout,
    check_positive,
    check_types,
    register_model,
)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(kw_only=True)
class Seq2SeqConfig:
    vocab_size: int = 8000  # one joint source/target vocabulary (fixed by the tokenizer)
    max_seq_len: int = 256  # longest source or target in tokens (sinusoidal positions precomputed)
    embed_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    num_heads: int
    mlp_dim: int  # feed-forward hidden width (Vaswani's d_ff)
    dropout: float = 0.1  # residual, attention-probability and embedding dropout
    activation: str = "relu"  # of the feed-forward network: relu (Vaswani) or gelu
    tie_embeddings: bool = True  # source and target embeddings and the output projection are one matrix
    pad_id: int = 0  # the padding token: source positions holding it are masked out of attention

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self,
            ["vocab_size", "max_seq_len", "embed_dim", "num_encoder_layers", "num_decoder_layers"],
        )
        check_positive(self, ["num_heads", "mlp_dim"])
        check_positive(self, ["pad_id"], minimum=0)
        check_dropout(self)
        check_choice(self, "activation", ACTIVATIONS)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id ({self.pad_id}) must be below vocab_size ({self.vocab_size})")


def _layer(config: Seq2SeqConfig, cross: bool) -> TransformerLayer:
    C, H, p = config.embed_dim, config.num_heads, config.dropout
    mlp = FeedForward(C, config.mlp_dim, dropout=p, activation=ACTIVATIONS[config.activation])
    extra = {}
    if cross:
        extra = dict(cross_attn=MultiHeadAttention(C, H, dropout=p), cross_attn_norm=nn.LayerNorm(C))
    return TransformerLayer(
        MultiHeadAttention(C, H, dropout=p), mlp, nn.LayerNorm(C), nn.LayerNorm(C), dropout=p, **extra
    )


class DecoderState:
    """What incremental decoding keeps between steps: each decoder layer's self-attention keys and values
    (``self_caches``) and the encoder output's keys and values for its cross-attention (``cross_caches``,
    filled on the first step). ``length`` target positions are decoded."""

    def __init__(self, self_caches: list[KVCache], cross_caches: list[KVCache]) -> None:
        self.self_caches, self.cross_caches = self_caches, cross_caches

    @property
    def length(self) -> int:
        return self.self_caches[0].length

    def reorder_(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keeps rows ``index`` in that order (beam search); ``cross=False`` leaves the encoder's keys and
        values alone, for a reordering within each sentence's beams (they are the same for all of them)."""
        for cache in self.self_caches + (self.cross_caches if cross else []):
            cache.reorder_(index)


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer; build it with :func:`seq2seq` or a preset.

    Args:
        config: The architecture.
    """

    family = "seq2seq"
    config_class = Seq2SeqConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()  # two inputs and a decoding loop: not exported

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        C, V = config.embed_dim, config.vocab_size
        self.tok_emb = nn.Embedding(V, C, padding_idx=config.pad_id)  # source (and target, output if tied)
        self.tgt_emb = None if config.tie_embeddings else nn.Embedding(V, C, padding_idx=config.pad_id)
        self.pos = SinusoidalPositions(config.max_seq_len, C)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = TransformerStack(
            [_layer(config, cross=False) for _ in range(config.num_encoder_layers)], nn.LayerNorm(C)
        )
        self.decoder = TransformerStack(
            [_layer(config, cross=True) for _ in range(config.num_decoder_layers)], nn.LayerNorm(C)
        )
        self.head = None if config.tie_embeddings else nn.Linear(C, V, bias=False)
        self.apply(_init)
        for emb in (self.tok_emb, self.tgt_emb):
            if emb is not None:  # fairseq: N(0, C^-1/2), so that sqrt(C) * embedding has unit scale
                nn.init.normal_(emb.weight, std=C**-0.5)
                nn.init.zeros_(emb.weight[config.pad_id])

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied matrix counted once).

        Args:
            exclude_embeddings: Leave out the token embeddings (source, and target when separate); an
                untied output projection stays in.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(e.weight.numel() for e in (self.tok_emb, self.tgt_emb) if e is not None)
        return total

    def flops_per_token(self, context: int) -> int:
        """Training FLOPs (forward and backward) per target token, assuming a source as long as the target
        (``context`` tokens each): ``6 N`` (each source token passes the encoder, each target token the
        decoder) plus attention, Kaplan et al. 2020's count times 3: encoder self-attention over all
        ``T`` (``12 L_enc T C``), causal decoder self-attention (``6 L_dec T C``), cross-attention over the
        ``T`` source positions (``12 L_dec T C``); plus a tied output projection's ``6 V C``."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        attention = 12 * c.num_encoder_layers + 18 * c.num_decoder_layers
        head = 6 * c.vocab_size * c.embed_dim if c.tie_embeddings else 0
        return 6 * n + attention * context * c.embed_dim + head

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        """Random source and target token ids, ``(batch_size, seq_len)`` each (default 12 tokens), without
        padding, on the model's device: the positional arguments of :meth:`forward`."""
        T = min(seq_len or 12, self.config.max_seq_len)
        device = self.tok_emb.weight.device
        low = self.config.pad_id + 1 if self.config.pad_id + 1 < self.config.vocab_size else 0
        src = torch.randint(low, self.config.vocab_size, (batch_size, T), device=device)
        tgt = torch.randint(low, self.config.vocab_size, (batch_size, T), device=device)
        return src, tgt

    # ------------------------------------------------------------------------------------------ pieces
    def _embed(self, emb: nn.Embedding, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = emb(ids) * math.sqrt(self.config.embed_dim) + self.pos(ids.shape[1], offset)  # (B, T, C)
        return self.dropout(x)

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` True for real source tokens."""
        return src != self.config.pad_id

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids ``(B, S)`` to the encoder output ``(B, S, C)``."""
        if src.shape[1] > self.config.max_seq_len:
            raise ValueError(f"a source of {src.shape[1]} tokens; the model has {self.config.max_seq_len}")
        mask = self.source_mask(src) if src_mask is None else src_mask
        return self.encoder(self._embed(self.tok_emb, src), key_padding_mask=mask)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None,
        state: DecoderState | None = None,
    ) -> torch.Tensor:
        """Target ids ``(B, T)`` (the first ``<s>``; with ``state``, the next ``T`` tokens after the
        ``state.length`` decoded ones) to decoder hidden states ``(B, T, C)``."""
        offset = 0 if state is None else state.length
        if offset + tgt.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"a target of {offset + tgt.shape[1]} tokens; the model has {self.config.max_seq_len}"
            )
        emb = self.tok_emb if self.tgt_emb is None else self.tgt_emb
        return self.decoder(
            self._embed(emb, tgt, offset),
            memory=memory,
            causal=True,
            memory_mask=src_mask,
            caches=None if state is None else state.self_caches,
            cross_caches=None if state is None else state.cross_caches,
        )

    def init_state(self, batch_size: int, max_len: int, memory: torch.Tensor) -> DecoderState:
        """Empty caches for decoding up to ``max_len`` target tokens of ``batch_size`` rows."""
        H, D = self.config.num_heads, self.config.embed_dim // self.config.num_heads
        kw = dict(device=memory.device, dtype=memory.dtype)
        n = self.config.num_decoder_layers
        return DecoderState(
            [KVCache(batch_size, H, max_len, D, **kw) for _ in range(n)],
            [KVCache(batch_size, H, memory.shape[1], D, **kw) for _ in range(n)],
        )

    def step(
        self, tokens: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, state: DecoderState
    ) -> torch.Tensor:
        """One decoding step: the last tokens ``(B, 1)`` to next-token logits ``(B, V)``, caches updated."""
        return self.forward_head(self.decode(tokens, memory, src_mask, state))[:, -1]

    # ------------------------------------------------------------------------------------------ the surface
    def forward_features(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Source ``(B, S)`` and decoder input ``(B, T)`` (``<s> y1 .. y_{T-1}``) to decoder hidden states
        ``(B, T, C)`` (teacher forcing)."""
        mask: torch.Tensor | None = self.source_mask(src)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None  # no padding: attention without a mask takes the fused kernels
        memory = self.encoder(self._embed(self.tok_emb, src), key_padding_mask=mask)
        return self.decode(tgt, memory, mask)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` to next-token logits ``(B, T, V)``."""
        if self.head is None:
            return F.linear(features, self.tok_emb.weight)
        return self.head(features)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` of each next target token; arguments as in :meth:`forward_features`."""
        return self.forward_head(self.forward_features(src, tgt))


def _init(module: nn.Module) -> None:
    # fairseq's transformer: Xavier-uniform linear weights, zero biases
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def seq2seq(
    *,
    embed_dim: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    num_heads: int,
    mlp_dim: int,
    vocab_size: int = 8000,
    max_seq_len: int = 256,
    dropout: float = 0.1,
    activation: str = "relu",
    tie_embeddings: bool = True,
    pad_id: int = 0,
) -> Seq2Seq:
    """Builds an encoder-decoder Transformer from every hyperparameter (see :class:`Seq2SeqConfig`)."""
    config = Seq2SeqConfig(
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        embed_dim=embed_dim,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        num_heads=num_heads,
        mlp_dim=mlp_dim,
        dropout=dropout,
        activation=activation,
        tie_embeddings=tie_embeddings,
        pad_id=pad_id,
    )
    return Seq2Seq(config)


_TEST = dict(
    vocab_size=64, max_seq_len=64, embed_dim=32, num_encoder_layers=2, num_decoder_layers=2, num_heads=4
)


@register_model
def seq2seq_test(**overrides) -> Seq2Seq:
    """Tiny encoder-decoder for tests: 2 + 2 layers, 4 heads, width 32, FFN 64, vocabulary 64."""
    return seq2seq(**{**_TEST, "mlp_dim": 64, **overrides})


@register_model
def seq2seq_small(**overrides) -> Seq2Seq:
    """The Multi30k anchor's shape (bentrevett/pytorch-seq2seq notebook 6): 3 + 3 layers, 8 heads, width
    256, FFN 512. With a joint vocabulary of 8,000: 6.0M parameters tied, 10.1M untied (recipes/multi30k.yaml;
    the anchor's 9.04M has separate word-level vocabularies)."""
    defaults = dict(embed_dim=256, num_encoder_layers=3, num_decoder_layers=3, num_heads=8, mlp_dim=512)
    return seq2seq(**{**defaults, **overrides})
