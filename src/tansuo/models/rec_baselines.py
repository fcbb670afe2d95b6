"""The baselines a sequential recommender is judged against, on SASRec's surface (see
:mod:`tansuo.models.sasrec`: left-padded item histories in, scores of every item out).

- ``pop``: most-popular. One learned score per item, the same for every history; trained with the full
  softmax cross-entropy it converges to the log frequency of each item as a training target, so it ranks by
  popularity (RecBole's ``Pop`` counts; this learns the counts' logarithm through the same training loop).
- ``mf``: matrix factorisation trained with BPR (Rendle et al. 2009, "BPR: Bayesian Personalized Ranking
  from Implicit Feedback"; ``data.loss: bpr``). The user factor is the mean of the history's item factors
  (Kabbur et al. 2013, FISM; Koren 2008's asymmetric factor model) rather than a learned vector per user id,
  so a model scores any history (a new user, a request to the server) and needs no user ids; order within
  the history does not matter. At each position the user is the mean over the items so far.
- ``gru4rec``: Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural Networks", as RecBole
  builds it (item embedding, dropout, a GRU, a projection back to the embedding width, scores against the
  item embedding); RecBole's defaults: width 64, GRU hidden 128, one layer, dropout 0.3. Left padding is
  packed away, so a history's state does not depend on how it was padded.

Shapes: B batch, T history length, C embedding width, V = num_items + 1.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tansuo.models._registry import check_dropout, check_positive, check_types, register_model
from tansuo.models.sasrec import init_weights, random_history


class _Recommender(nn.Module):
    """What the baselines share: example input, next-item scores from the last position."""

    objective = "causal"
    config: "PopConfig | MFConfig | GRU4RecConfig"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        c = self.config
        device = next(self.parameters()).device
        return random_history(c.num_items, c.max_seq_len, batch_size, seq_len, device)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, T, V)`` of the next item after each position."""
        return self.forward_head(self.forward_features(items))

    def next_item_scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, V)`` of the item that follows each history."""
        return self.forward_head(self.forward_features(items)[:, -1])


# ------------------------------------------------------------------------------------------------ pop
@dataclass(kw_only=True)
class PopConfig:
    num_items: int = 1682
    max_seq_len: int = 50  # only bounds example inputs: the history is not read

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["num_items", "max_seq_len"])


class Pop(_Recommender):
    """Most-popular: one learned score per item, whatever the history."""

    family = "pop"
    config_class = PopConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()

    def __init__(self, config: PopConfig) -> None:
        super().__init__()
        self.config = config
        self.item_bias = nn.Parameter(torch.zeros(config.num_items + 1))

    def forward_features(self, items: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` to ``(B, T, 1)`` zeros: nothing about the history is used."""
        return torch.zeros(*items.shape, 1, device=items.device, dtype=self.item_bias.dtype)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.item_bias  # (..., 1) + (V,) -> (..., V)

    def item_scores(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return features + self.item_bias[items]  # (..., 1) + (..., K)


@register_model
def pop(**overrides) -> Pop:
    """Most-popular baseline (no parameters but one score per item)."""
    return Pop(PopConfig(**overrides))


# ------------------------------------------------------------------------------------------------ mf
@dataclass(kw_only=True)
class MFConfig:
    num_items: int = 1682
    max_seq_len: int = 50  # longest history read
    embed_dim: int = 64  # RecBole's BPR embedding_size

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["num_items", "max_seq_len", "embed_dim"])


class MF(_Recommender):
    """Matrix factorisation with the user as the mean of its history's item factors."""

    family = "mf"
    config_class = MFConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()

    def __init__(self, config: MFConfig) -> None:
        super().__init__()
        self.config = config
        self.history_emb = nn.Embedding(config.num_items + 1, config.embed_dim, padding_idx=0)  # user side
        self.item_emb = nn.Embedding(config.num_items + 1, config.embed_dim, padding_idx=0)  # target side
        init_weights(self)

    def forward_features(self, items: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` to the user factor after each position ``(B, T, C)``: the mean of the items so far."""
        real = (items != 0).to(self.history_emb.weight.dtype).cumsum(dim=1).clamp(min=1.0)  # (B, T)
        return self.history_emb(items).cumsum(dim=1) / real.unsqueeze(-1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.item_emb.weight)

    def item_scores(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (features.unsqueeze(-2) * self.item_emb(items)).sum(-1)


@register_model
def mf(**overrides) -> MF:
    """BPR-MF baseline: width 64 (RecBole's BPR default); train with ``data.loss: bpr``."""
    return MF(MFConfig(**overrides))


@register_model
def mf_test(**overrides) -> MF:
    """Tiny MF for tests: width 8, 40 items, histories of 8."""
    return MF(MFConfig(**{**dict(num_items=40, max_seq_len=8, embed_dim=8), **overrides}))


# ------------------------------------------------------------------------------------------------ gru4rec
@dataclass(kw_only=True)
class GRU4RecConfig:
    num_items: int = 1682
    max_seq_len: int = 50
    embed_dim: int = 64
    hidden_dim: int = 128
    num_layers: int = 1
    dropout: float = 0.3  # on the item embeddings (RecBole's dropout_prob)

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, ["num_items", "max_seq_len", "embed_dim", "hidden_dim", "num_layers"])
        check_dropout(self)


class GRU4Rec(_Recommender):
    """A GRU over the history; the state after each item scores the next."""

    family = "gru4rec"
    config_class = GRU4RecConfig
    prunable: frozenset[str] = frozenset()
    onnx_inputs: tuple[str, ...] = ()

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.num_items + 1, config.embed_dim, padding_idx=0)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.embed_dim, config.hidden_dim, config.num_layers, bias=False, batch_first=True
        )
        self.proj = nn.Linear(config.hidden_dim, config.embed_dim)
        init_weights(self)
        for param in self.gru.parameters():
            nn.init.xavier_uniform_(param)  # RecBole: xavier for the GRU's matrices

    def forward_features(self, items: torch.Tensor) -> torch.Tensor:
        """Left-padded ``(B, T)`` to the state after each item, projected ``(B, T, C)``."""
        B, T = items.shape
        lengths = (items != 0).sum(dim=1)  # (B,)
        pads = (T - lengths)[:, None]
        columns = torch.arange(T, device=items.device)[None, :]
        right = items.gather(1, (columns + pads) % T)  # the same rows padded on the right
        packed = pack_padded_sequence(
            self.dropout(self.tok_emb(right)),
            lengths.clamp(min=1).cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, hidden), zeros after
        left = out.gather(1, ((columns - pads) % T)[..., None].expand(B, T, out.shape[-1]))
        return self.proj(left)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.tok_emb.weight)

    def item_scores(self, features: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (features.unsqueeze(-2) * self.tok_emb(items)).sum(-1)


@register_model
def gru4rec(**overrides) -> GRU4Rec:
    """GRU4Rec at RecBole's defaults: width 64, hidden 128, one layer, dropout 0.3."""
    return GRU4Rec(GRU4RecConfig(**overrides))


@register_model
def gru4rec_test(**overrides) -> GRU4Rec:
    """Tiny GRU4Rec for tests: width 16, hidden 16, 40 items, histories of 8."""
    cfg = dict(num_items=40, max_seq_len=8, embed_dim=16, hidden_dim=16, dropout=0.0)
    return GRU4Rec(GRU4RecConfig(**{**cfg, **overrides}))
