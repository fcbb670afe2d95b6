"""BERT4Rec: bidirectional Transformer over item histories, trained to fill in masked items.

Sun et al. 2019, "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer" (arXiv:1904.06690): BERT's encoder (:mod:`tansuo.models.bert`: its post-norm layers and its
masked-language-model head, tied to the item embedding with an output bias) over items instead of words.
Training hides random items behind a ``[mask]`` item (index ``num_items + 1``) and predicts them (the cloze
task; the ``recommend`` task does the masking for models whose ``objective`` is ``"masked"``); the next item
is predicted by appending ``[mask]`` to the history, so a history holds at most ``max_seq_len - 1`` items.
RecBole's defaults: 2 layers, 2 heads, width 64, inner width 256, dropout 0.2.

The surface is SASRec's (see :mod:`tansuo.models.sasrec`); scores cover items ``0..num_items`` (not the
mask). Shapes: B batch, T history length, C embedding width, V = num_items + 1.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tansuo.blocks import LearnedPositions, TransformerStack
from tansuo.models._registry import check_dropout, check_positive, check_types, register_model
from tansuo.models.bert import BertConfig, BertMLMHead, _drop_tied_decoder, _layer, _restore_tied_decoder
from tansuo.models.sasrec import init_weights, positions_from_end, random_history


@dataclass(kw_only=True)
class BERT4RecConfig:
    num_items: int = 1682  # fixed by the data; indices 1..num_items, num_items + 1 is [mask]
    max_seq_len: int = 50  # positions, the appended [mask] included
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_ratio: int = 4
    dropout: float = 0.2  # RecBole's hidden and attention dropout for BERT4Rec
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["num_items", "embed_dim", "num_layers", "num_heads", "mlp_ratio"])
        check_positive(self, ["max_seq_len"], minimum=2)
        check_dropout(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )


class BERT4Rec(nn.Module):
    """Bidirectional item encoder with a tied cloze head; build it with :func:`bert4rec` or a preset."""

    family = "bert4rec"
    config_class = BERT4RecConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()
    objective = "masked"

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.mask_id = config.num_items + 1
        encoder = BertConfig(
            vocab_size=config.num_items + 2,
            max_seq_len=config.max_seq_len,
            embed_dim=C,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
            norm_eps=config.norm_eps,
            num_classes=0,
        )
        self.tok_emb = nn.Embedding(config.num_items + 2, C, padding_idx=0)
        self.pos_emb = LearnedPositions(config.max_seq_len, C)
        self.emb_norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.stack = TransformerStack([_layer(encoder) for _ in range(config.num_layers)])  # post-norm
        self.mlm_head = BertMLMHead(C, config.num_items + 2, config.norm_eps)
        init_weights(self)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.mlm_head.decoder.weight = self.tok_emb.weight
        self.register_state_dict_post_hook(_drop_tied_decoder)
        self.register_load_state_dict_pre_hook(_restore_tied_decoder)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        c = self.config
        return random_history(c.num_items, c.max_seq_len, batch_size, seq_len, self.tok_emb.weight.device)

    def forward_features(self, items: torch.Tensor) -> torch.Tensor:
        """Left-padded item ids ``(B, T)`` (``[mask]`` allowed) to hidden states ``(B, T, C)``; every
        position sees every real item."""
        T = items.shape[1]
        x = self.tok_emb(items) + self.pos_emb(positions_from_end(T, self.config.max_seq_len, items.device))
        real = items != 0
        mask = None if torch.compiler.is_compiling() or bool(real.all()) else real
        return self.stack(self.dropout(self.emb_norm(x)), key_padding_mask=mask)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(..., C)`` to item scores ``(..., V)`` (the ``[mask]`` column left out)."""
        return self.mlm_head(features)[..., : self.config.num_items + 1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, T, V)`` of the item at each position."""
        return self.forward_head(self.forward_features(items))

    def item_scores(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        head = self.mlm_head
        h = head.norm(head.activation(head.dense(features)))  # (..., C)
        return (h.unsqueeze(-2) * self.tok_emb(items)).sum(-1) + head.decoder.bias[items]

    def next_item_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, V)`` of the item after each history: ``[mask]`` appended to its last
        ``max_seq_len - 1`` items."""
        items = items[:, -(self.config.max_seq_len - 1) :]
        masked = torch.cat([items, torch.full_like(items[:, :1], self.mask_id)], dim=1)
        return self.forward_head(self.forward_features(masked)[:, -1])


def bert4rec(
    *,
    num_items: int = 1682,
    max_seq_len: int = 50,
    embed_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    mlp_ratio: int = 4,
    dropout: float = 0.2,
    norm_eps: float = 1e-12,
) -> BERT4Rec:
    """Builds a BERT4Rec from every hyperparameter (see :class:`BERT4RecConfig`)."""
    return BERT4Rec(BERT4RecConfig(**dict(locals())))


@register_model
def bert4rec_test(**overrides) -> BERT4Rec:
    """Tiny BERT4Rec for tests: 2 layers, 2 heads, width 16, 40 items, 8 positions."""
    return bert4rec(**{**dict(num_items=40, max_seq_len=8, embed_dim=16, dropout=0.0), **overrides})


@register_model
def bert4rec_base(**overrides) -> BERT4Rec:
    """BERT4Rec at RecBole's defaults: 2 layers, 2 heads, width 64, inner 256, dropout 0.2."""
    return bert4rec(**overrides)
