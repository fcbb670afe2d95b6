"""SASRec: self-attentive sequential recommendation.

Kang & McAuley 2018, "Self-Attentive Sequential Recommendation" (arXiv:1808.09781): a user's item history is
read by a causal Transformer; the hidden state after item t scores every item as the next one by a dot
product with the item embeddings (tied input and output). Built here from the shared blocks: pre-norm
layers (:class:`~tansuo.blocks.TransformerLayer`, a final norm), learned positions, biased attention and a
GELU feed-forward; the default size is RecBole's (2 layers, 2 heads, width 64, inner width 256, dropout 0.5).

Every recommender here has the same surface, so the ``recommend`` task, the server and compression need no
per-model case:

- items are indices ``1..num_items``; 0 is padding. Histories are padded on the left, so the newest item is
  always the last column; positions count back from it (the newest item sits at position ``max_seq_len -
  1`` whatever the padding), so a history scores the same in any batch;
- ``forward_features(items) (B, T) -> (B, T, C)``, ``forward_head(features) -> (B, T, num_items + 1)``
  (column 0 is padding), ``forward = forward_head . forward_features``;
- ``item_scores(features (..., C), items (..., K)) -> (..., K)``: the scores of given items only (sampled
  losses); ``next_item_scores(items) -> (B, num_items + 1)``: the scores of the item after each history;
- ``objective``: ``"causal"`` (each position predicts the next item) or ``"masked"`` (BERT4Rec's cloze).

Shapes: B batch, T history length, C embedding width, V = num_items + 1.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks import (
    FeedForward,
    LearnedPositions,
    MultiHeadAttention,
    TransformerLayer,
    TransformerStack,
)
from tansuo.models._registry import check_dropout, check_positive, check_types, register_model


@dataclass(kw_only=True)
class SASRecConfig:
    num_items: int = 1682  # fixed by the data (the recommend task overrides it); indices 1..num_items
    max_seq_len: int = 50  # longest history (RecBole's MAX_ITEM_LIST_LENGTH)
    embed_dim: int = 64  # RecBole's hidden_size
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: int = 4  # feed-forward width = mlp_ratio * embed_dim (RecBole's inner_size 256)
    dropout: float = 0.5  # RecBole's hidden and attention dropout: ml-100k is small and overfits fast
    norm_eps: float = 1e-12  # RecBole's layer_norm_eps

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self, ["num_items", "max_seq_len", "embed_dim", "num_layers", "num_heads", "mlp_ratio"]
        )
        check_dropout(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )


def positions_from_end(T: int, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """Positions ``(T,)`` of a left-padded history of width T: the last column is ``max_seq_len - 1``."""
    if max_seq_len < T:
        raise ValueError(
            f"a history of {T} items is longer than the model's max_seq_len ({max_seq_len}); cut it to the "
            "last max_seq_len items (the recommend task does)"
        )
    return torch.arange(max_seq_len - T, max_seq_len, device=device)


def init_weights(model: nn.Module) -> None:
    """RecBole's initialisation: N(0, 0.02) weights, zero biases, unit norms; the padding row zero."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def random_history(
    num_items: int, max_seq_len: int, batch_size: int, seq_len: int | None, device
) -> torch.Tensor:
    """Random item ids ``(batch_size, min(seq_len or 16, max_seq_len))`` in ``1..num_items``."""
    shape = (batch_size, min(seq_len or 16, max_seq_len))
    return torch.randint(1, num_items + 1, shape, device=device)


class SASRec(nn.Module):
    """Causal Transformer over item histories; build it with :func:`sasrec` or a preset."""

    family = "sasrec"
    config_class = SASRecConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()
    objective = "causal"

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.tok_emb = nn.Embedding(config.num_items + 1, C, padding_idx=0)  # also the output embedding
        self.pos_emb = LearnedPositions(config.max_seq_len, C)
        self.dropout = nn.Dropout(config.dropout)
        layers = [
            TransformerLayer(
                MultiHeadAttention(C, config.num_heads, bias=True, dropout=config.dropout),
                FeedForward(C, config.mlp_ratio * C, bias=True),
                nn.LayerNorm(C, eps=config.norm_eps),
                nn.LayerNorm(C, eps=config.norm_eps),
                dropout=config.dropout,
            )
            for _ in range(config.num_layers)
        ]
        self.stack = TransformerStack(layers, nn.LayerNorm(C, eps=config.norm_eps))
        init_weights(self)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random histories ``(batch_size, seq_len)`` (default 16 items, at most ``max_seq_len``)."""
        c = self.config
        return random_history(c.num_items, c.max_seq_len, batch_size, seq_len, self.tok_emb.weight.device)

    def forward_features(self, items: torch.Tensor) -> torch.Tensor:
        """Left-padded histories ``(B, T)`` to the hidden state after each item ``(B, T, C)``: position t sees
        items ``<= t`` only."""
        T = items.shape[1]
        x = self.tok_emb(items) + self.pos_emb(positions_from_end(T, self.config.max_seq_len, items.device))
        real = items != 0  # (B, T)
        mask = None if torch.compiler.is_compiling() or bool(real.all()) else real
        return self.stack(self.dropout(x), causal=True, key_padding_mask=mask)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(..., C)`` to the scores of every item ``(..., V)`` (tied item embedding)."""
        return F.linear(features, self.tok_emb.weight)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, T, V)`` of the next item after each position of left-padded histories ``(B, T)``."""
        return self.forward_head(self.forward_features(items))

    def item_scores(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(..., K)`` of ``items (..., K)`` given hidden states ``(..., C)``."""
        return (features.unsqueeze(-2) * self.tok_emb(items)).sum(-1)

    def next_item_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, V)`` of the item that follows each left-padded history ``(B, T)``."""
        return self.forward_head(self.forward_features(items)[:, -1])


def sasrec(
    *,
    num_items: int = 1682,
    max_seq_len: int = 50,
    embed_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    mlp_ratio: int = 4,
    dropout: float = 0.5,
    norm_eps: float = 1e-12,
) -> SASRec:
    """Builds a SASRec from every hyperparameter (see :class:`SASRecConfig`)."""
    return SASRec(SASRecConfig(**dict(locals())))


@register_model
def sasrec_test(**overrides) -> SASRec:
    """Tiny SASRec for tests: 2 layers, 2 heads, width 16, 40 items, histories of 8."""
    return sasrec(**{**dict(num_items=40, max_seq_len=8, embed_dim=16, dropout=0.0), **overrides})


@register_model
def sasrec_base(**overrides) -> SASRec:
    """SASRec at RecBole's defaults: 2 layers, 2 heads, width 64, inner 256, dropout 0.5, 50 items of
    history (with MovieLens-100k's 1,682 items: 0.21M parameters)."""
    return sasrec(**overrides)
