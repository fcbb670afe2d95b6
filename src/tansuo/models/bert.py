"""BERT: a bidirectional Transformer encoder.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding", in
the shape of Hugging Face's ``BertModel``: token + learned position + segment embeddings, LayerNorm and
dropout; post-norm layers (:class:`~tansuo.blocks.PostNormLayer`) with biased attention and a GELU
feed-forward; a pooler (linear + tanh on the first token) feeding a classification head; and a masked
language-model head (``BertOnlyMLMHead``: linear, GELU, LayerNorm, then a decoder tied to the token embedding
with its own bias). ``prenorm=True`` swaps in pre-norm layers with a final norm (not a pretrained layout).

Shapes: B batch, T sequence length, C embedding width, H heads, V vocabulary size.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.blocks import (
    FeedForward,
    LearnedPositions,
    MultiHeadAttention,
    PostNormLayer,
    TransformerLayer,
    TransformerStack,
)
from tansuo.models._registry import check_dropout, check_positive, check_types, register_model

POOLINGS = ("cls", "mean")


@dataclass(kw_only=True)
class BertConfig:
    vocab_size: int = 30522  # fixed by the tokenizer (30522: bert-base-uncased's WordPiece)
    max_seq_len: int = 512  # number of learned positions
    type_vocab_size: int = 2  # segments (sentence A / B)
    embed_dim: int
    num_layers: int
    num_heads: int
    mlp_ratio: int = 4  # feed-forward hidden width = mlp_ratio * embed_dim
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    norm_eps: float = 1e-12  # LayerNorm epsilon (Hugging Face's layer_norm_eps)
    num_classes: int = 2  # 0: no head, forward returns the pooled features
    prenorm: bool = False  # pre-norm layers and a final norm instead of BERT's post-norm layers
    # what the classification head reads: "cls" = BERT's pooler, tanh(W h_[CLS] + b); "mean" = the mean of
    # the hidden states over real tokens, as sentence-transformers models (all-MiniLM-L6-v2) were trained
    pooling: str = "cls"

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self,
            [
                "vocab_size",
                "max_seq_len",
                "type_vocab_size",
                "embed_dim",
                "num_layers",
                "num_heads",
                "mlp_ratio",
            ],
        )
        check_positive(self, ["num_classes"], minimum=0)
        check_dropout(self)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )


def _layer(config: BertConfig) -> nn.Module:
    C = config.embed_dim
    attn = MultiHeadAttention(C, config.num_heads, bias=True, dropout=config.dropout)
    mlp = FeedForward(C, config.mlp_ratio * C, bias=True)  # exact (erf) GELU, as Hugging Face's "gelu"
    norms = (nn.LayerNorm(C, eps=config.norm_eps) for _ in range(2))
    layer_class = TransformerLayer if config.prenorm else PostNormLayer
    return layer_class(attn, mlp, *norms, dropout=config.dropout)


class BertMLMHead(nn.Module):
    """Masked-language-model head: ``decoder(norm(gelu(dense(x))))``; ``decoder.weight`` is tied by the model.

    Args:
        embed_dim: C.
        vocab_size: V.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, embed_dim: int, vocab_size: int, norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.activation = nn.GELU()
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.decoder = nn.Linear(embed_dim, vocab_size)  # its bias is the output bias of Hugging Face

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` to logits ``(B, T, V)``."""
        return self.decoder(self.norm(self.activation(self.dense(features))))


def _drop_tied_decoder(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # mlm_head.decoder.weight *is* tok_emb.weight; stored once so that safetensors' save_file accepts it.
    state_dict.pop(prefix + "mlm_head.decoder.weight", None)


def _restore_tied_decoder(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "tok_emb.weight" in state_dict:
        state_dict.setdefault(prefix + "mlm_head.decoder.weight", state_dict[prefix + "tok_emb.weight"])


def _init(module: nn.Module) -> None:
    # BERT: N(0, 0.02) for linear and embedding weights, zero biases, LayerNorm ones and zeros.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _no_padding(mask: torch.Tensor) -> bool:
    """Whether every token is real; False where the answer cannot steer Python: while compiling, and under
    ``vmap`` (DP-SGD's per-example gradients, ``train/privacy.py``), whose batched masks hold no one value."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(mask):
        return False
    return bool(mask.all())


class Bert(nn.Module):
    """Bidirectional Transformer encoder with pooler, classification and MLM heads; build it with
    :func:`bert` or a preset.

    Args:
        config: The architecture.
    """

    family = "bert"
    config_class = BertConfig
    prunable: frozenset[str] = frozenset({"heads", "ffn"})  # what structured pruning may remove
    onnx_inputs: tuple[str, ...] = ("input_ids", "attention_mask")  # its ONNX export's inputs; () = no export

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        C = config.embed_dim
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = LearnedPositions(config.max_seq_len, C)
        self.seg_emb = nn.Embedding(config.type_vocab_size, C)
        self.emb_norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        layers = [_layer(config) for _ in range(config.num_layers)]
        final_norm = nn.LayerNorm(C, eps=config.norm_eps) if config.prenorm else None
        self.stack = TransformerStack(layers, final_norm)
        self.pooler = nn.Linear(C, C)  # tanh applied in :meth:`pooled`
        self.head_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(C, config.num_classes) if config.num_classes else nn.Identity()
        self.mlm_head = BertMLMHead(C, config.vocab_size, config.norm_eps)
        self.apply(_init)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.mlm_head.decoder.weight = self.tok_emb.weight
        self.register_state_dict_post_hook(_drop_tied_decoder)
        self.register_load_state_dict_pre_hook(_restore_tied_decoder)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied MLM decoder counted once).

        Args:
            exclude_embeddings: Leave out the token, position and segment embeddings.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel() + self.seg_emb.weight.numel()
        return total

    def flops_per_token(self, context: int) -> int:
        """Training FLOPs (forward and backward) per token at ``context`` tokens of context:
        ``6 N + 12 L T C + 6 V C`` (Kaplan et al. 2020's count, Table 1, times 3 for backward, with
        bidirectional attention: every position scores and mixes all T, ``4 C T`` forward per layer; the MLM
        decoder tied to the token embedding counted at every position, though the mlm task scores only the
        chosen ~15%, so this overstates by up to ``6 V C`` per unchosen token)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        return 6 * n + 12 * c.num_layers * context * c.embed_dim + 6 * c.vocab_size * c.embed_dim

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random token ids ``(batch_size, seq_len)`` on the model's device; ``seq_len`` defaults to
        ``min(16, max_seq_len)`` and is capped at ``max_seq_len``."""
        shape = (batch_size, min(seq_len or 16, self.config.max_seq_len))
        return torch.randint(0, self.config.vocab_size, shape, device=self.tok_emb.weight.device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classification head by a new, freshly initialised one (0: no head); updates
        ``config``."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        weight = self.pooler.weight
        self.head = nn.Linear(self.config.embed_dim, num_classes) if num_classes else nn.Identity()
        self.head.to(device=weight.device, dtype=weight.dtype).apply(_init)

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``(B, T)`` to hidden states ``(B, T, C)``.

        Args:
            input_ids: ``(B, T)`` long.
            attention_mask: ``(B, T)`` bool or int, true / 1 for real tokens; None: every token is real.
            token_type_ids: ``(B, T)`` segment ids; None: all segment 0.
        """
        T = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb(T)  # (B, T, C)
        segments = self.seg_emb.weight[0] if token_type_ids is None else self.seg_emb(token_type_ids)
        x = x + segments  # no ids: every token is in segment 0
        x = self.dropout(self.emb_norm(x))
        mask = None if attention_mask is None else attention_mask.bool()
        if mask is not None and _no_padding(mask):
            mask = None  # no padding: attention without a mask takes the fused (flash) kernels
        return self.stack(x, key_padding_mask=mask)

    def pooled(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` to one vector per sequence ``(B, C)``: the pooler output
        ``tanh(W h_0 + b)`` (``pooling="cls"``), or the mean over real tokens (``pooling="mean"``;
        ``attention_mask`` ``(B, T)`` says which are real, None: all)."""
        if self.config.pooling == "cls":
            return torch.tanh(self.pooler(features[:, 0]))
        if attention_mask is None:
            return features.mean(dim=1)
        weights = attention_mask.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
        return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward_head(
        self, features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` to class logits ``(B, num_classes)`` through :meth:`pooled`."""
        return self.head(self.head_drop(self.pooled(features, attention_mask)))

    def mlm_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` to masked-language-model logits ``(B, T, V)``."""
        return self.mlm_head(features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``(B, num_classes)``; arguments as in :meth:`forward_features`."""
        features = self.forward_features(input_ids, attention_mask, token_type_ids)
        return self.forward_head(features, attention_mask)


def bert(
    *,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int = 30522,
    max_seq_len: int = 512,
    type_vocab_size: int = 2,
    mlp_ratio: int = 4,
    dropout: float = 0.1,
    norm_eps: float = 1e-12,
    num_classes: int = 2,
    prenorm: bool = False,
    pooling: str = "cls",
) -> Bert:
    """Builds a BERT from every hyperparameter (see :class:`BertConfig` for what each means)."""
    config = BertConfig(
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        type_vocab_size=type_vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        norm_eps=norm_eps,
        num_classes=num_classes,
        prenorm=prenorm,
        pooling=pooling,
    )
    return Bert(config)


_BERT_TEST = dict(vocab_size=128, max_seq_len=64, num_layers=2, num_heads=2, embed_dim=32)
_BERT_MINI = dict(num_layers=4, num_heads=4, embed_dim=256)
_BERT_SMALL = dict(num_layers=4, num_heads=8, embed_dim=512)
_BERT_BASE = dict(num_layers=12, num_heads=12, embed_dim=768)
_MINILM_L6 = dict(num_layers=6, num_heads=12, embed_dim=384)


@register_model
def bert_test(**overrides) -> Bert:
    """Tiny BERT for tests: 2 layers, 2 heads, width 32, vocabulary 128, 64 positions."""
    return bert(**{**_BERT_TEST, **overrides})


@register_model
def bert_mini(**overrides) -> Bert:
    """BERT-Mini (Turc et al. 2019; google/bert_uncased_L-4_H-256_A-4): 4 layers, 4 heads, width 256."""
    return bert(**{**_BERT_MINI, **overrides})


@register_model
def bert_small(**overrides) -> Bert:
    """BERT-Small (Turc et al. 2019; google/bert_uncased_L-4_H-512_A-8): 4 layers, 8 heads, width 512."""
    return bert(**{**_BERT_SMALL, **overrides})


@register_model
def bert_base(**overrides) -> Bert:
    """BERT-Base (Devlin et al. 2019): 12 layers, 12 heads, width 768 (110M)."""
    return bert(**{**_BERT_BASE, **overrides})


@register_model
def minilm_l6(**overrides) -> Bert:
    """The shape of all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM): 6 layers, 12 heads, width 384
    (22,713,216 parameters in Hugging Face's ``BertModel``: embeddings, encoder and pooler)."""
    return bert(**{**_MINILM_L6, **overrides})
