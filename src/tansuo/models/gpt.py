"""GPT: a decoder-only Transformer language model.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), in the shape of
Karpathy's nanoGPT (``model.py``): token embedding (+ learned positions), pre-norm causal layers, final
norm, a language-model head tied to the token embedding (Press & Wolf 2017, "Using the Output Embedding to
Improve Language Models"). LLaMA's choices (Touvron et al. 2023) are options: RMSNorm, rotary positions
(Su et al. 2021) with their base and Llama 3.1's scaling, SwiGLU feed-forward (Shazeer 2020), grouped-query
attention (Ainslie et al. 2023), biases on the query/key/value projections only (Qwen2), an untied head.
With them the one class holds GPT-2 and the Llama family (Llama, Mistral, Qwen2, SmolLM) imported from
Hugging Face checkpoints (:mod:`tansuo.models.hf_decoders`).

Shapes: B batch, T sequence length, C embedding width, H heads, V vocabulary size.
"""

import functools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from tansuo.blocks import (
    FeedForward,
    KVCache,
    LearnedPositions,
    MultiHeadAttention,
    RotaryEmbedding,
    SlotKVCache,
    SwiGLU,
    TransformerLayer,
    TransformerStack,
    build_norm,
)
from tansuo.models._registry import check_choice, check_dropout, check_positive, check_types, register_model
from tansuo.models.sampling import sample_logits


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int  # fixed by the tokenizer; a task overrides it from its data
    num_layers: int
    num_heads: int
    embed_dim: int
    max_seq_len: int = 256  # longest context; sizes the learned positions, rotary tables and KV caches
    mlp_ratio: int = (
        4  # feed-forward hidden width = mlp_ratio * embed_dim (x 2/3 for swiglu: same parameters)
    )
    dropout: float = 0.0  # 0 when data is plentiful; 0.1-0.2 against overfitting small data (nanoGPT: 0.2)
    bias: bool = False  # biases in linears and LayerNorms; nanoGPT: without is a little better and faster
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (LLaMA: cheaper, no mean, no bias)
    positions: str = "learned"  # "learned" (GPT-2) or "rotary" (relative positions, no parameters)
    mlp: str = "gelu"  # "gelu" (GPT-2 MLP) or "swiglu" (LLaMA gated MLP)
    activation: str = "gelu"  # the gelu MLP's: "gelu" (exact) or "gelu_tanh" (GPT-2's tanh approximation)
    mlp_hidden: int = 0  # feed-forward hidden width when > 0 (imported checkpoints); 0: from mlp_ratio
    num_kv_heads: int = 0  # key/value heads for grouped-query attention when > 0; 0: num_heads
    qkv_bias: str = "same"  # biases on the q/k/v projections: "same" as bias, "yes" or "no" (Qwen2: yes)
    tie_embeddings: bool = True  # the head shares the token embedding's weights
    norm_eps: float = 0.0  # the norms' epsilon when > 0; 0: each norm's default (1e-5 LayerNorm, 1e-6 RMS)
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_scaling: str = "none"  # "none" or "llama3" (Llama 3.1's long-context frequency scaling)
    rope_factor: float = 8.0  # llama3 scaling: the factor long wavelengths are stretched by
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # the context the frequencies were trained for

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(
            self, ["vocab_size", "num_layers", "num_heads", "embed_dim", "max_seq_len", "mlp_ratio"]
        )
        check_dropout(self)
        check_choice(self, "norm", ("layernorm", "rmsnorm"))
        check_choice(self, "positions", ("learned", "rotary"))
        check_choice(self, "mlp", ("gelu", "swiglu"))
        check_choice(self, "activation", ("gelu", "gelu_tanh"))
        check_choice(self, "qkv_bias", ("same", "yes", "no"))
        check_choice(self, "rope_scaling", ("none", "llama3"))
        if self.num_kv_heads < 0 or self.mlp_hidden < 0 or self.norm_eps < 0:
            raise ValueError("num_kv_heads, mlp_hidden and norm_eps must be >= 0 (0: the default)")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.positions == "rotary" and (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width, but embed_dim / num_heads = "
                f"{self.embed_dim // self.num_heads}; change embed_dim or num_heads"
            )


def _norm(config: GPTConfig) -> nn.Module:
    return build_norm(config.norm, config.embed_dim, bias=config.bias, eps=config.norm_eps or None)


def _layer(config: GPTConfig, rotary: RotaryEmbedding | None) -> TransformerLayer:
    C = config.embed_dim
    if config.mlp == "swiglu":
        hidden = config.mlp_hidden or 8 * math.ceil(2 * config.mlp_ratio * C / 3 / 8)  # 2/3 of GELU's width
        mlp = SwiGLU(C, hidden, bias=config.bias)
    else:
        tanh = config.activation == "gelu_tanh"
        activation = functools.partial(nn.GELU, approximate="tanh") if tanh else nn.GELU
        hidden = config.mlp_hidden or config.mlp_ratio * C
        mlp = FeedForward(C, hidden, bias=config.bias, activation=activation)  # dropout: the layer's own
    qkv_bias = {"same": None, "yes": True, "no": False}[config.qkv_bias]
    attn = MultiHeadAttention(
        C,
        config.num_heads,
        bias=config.bias,
        dropout=config.dropout,
        rotary=rotary,
        num_kv_heads=config.num_kv_heads or None,
        qkv_bias=qkv_bias,
    )
    return TransformerLayer(attn, mlp, _norm(config), _norm(config), dropout=config.dropout)


def _drop_tied_head(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # lm_head.weight *is* tok_emb.weight. Storing it once keeps state_dict() in line with named_parameters()
    # and lets safetensors' save_file (which refuses tensors sharing memory) write it unchanged.
    state_dict.pop(prefix + "lm_head.weight", None)


def _restore_tied_head(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "tok_emb.weight" in state_dict:
        state_dict.setdefault(prefix + "lm_head.weight", state_dict[prefix + "tok_emb.weight"])


class GPT(nn.Module):
    """Decoder-only Transformer language model; build it with :func:`gpt` or a preset.

    Args:
        config: The architecture.
    """

    family = "gpt"
    config_class = GPTConfig
    prunable: frozenset[str] = frozenset()  # what structured pruning may remove
    onnx_inputs: tuple[str, ...] = ()  # its ONNX export's inputs; () = no export

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        C, H = config.embed_dim, config.num_heads
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = LearnedPositions(config.max_seq_len, C) if config.positions == "learned" else None
        rotary = None
        if config.positions == "rotary":
            scaling = None
            if config.rope_scaling == "llama3":
                scaling = (
                    config.rope_factor,
                    config.rope_low_freq_factor,
                    config.rope_high_freq_factor,
                    config.rope_original_max_seq_len,
                )
            rotary = RotaryEmbedding(C // H, config.max_seq_len, config.rope_theta, scaling)
        self.dropout = nn.Dropout(config.dropout)
        layers = [_layer(config, rotary) for _ in range(config.num_layers)]
        self.stack = TransformerStack(layers, _norm(config))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()
        #: decode one token at a time with a compiled step (:meth:`compile_decoding`)
        self.compiled_decoding = False
        if config.tie_embeddings:
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_restore_tied_head)

    def _init_weights(self) -> None:
        # nanoGPT / GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream are scaled
        # by 1/sqrt(2 * num_layers) so that the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.config.num_layers))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (the tied head counted once).

        Args:
            exclude_embeddings: Leave out token and position embeddings, as in the "non-embedding
                parameters" of Kaplan et al. 2020's scaling laws.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_emb.weight.numel()
            total -= 0 if self.pos_emb is None else self.pos_emb.weight.numel()
        return total

    def flops_per_token(self, context: int) -> int:
        """Training FLOPs (forward and backward) per token at ``context`` tokens of context.

        Kaplan et al. 2020 (Table 1) count a forward pass as ``2 N + 2 L T d_attn`` per token: a multiply and
        an add per non-embedding weight, and causal attention, where the token at position t scores t + 1
        keys and mixes t + 1 values (``4 d_attn (t + 1)``, on average over a window of T positions about
        ``2 d_attn T``). Backward costs twice the forward, hence::

            6 N + 6 L T d_attn (+ 6 V C when the head is tied to the token embedding)

        N is :meth:`num_params` without embeddings; a tied head's weights are the embedding's, so its matmul
        (``2 V C`` forward, which Kaplan drops as small at their scale) is added here, while an untied head is
        in N already. d_attn is the queries' width, ``num_heads * head width`` (= ``embed_dim``), with or
        without grouped-query attention. PaLM's ``6 N + 12 L T C`` (Chowdhery et al. 2022, which
        bench/train_throughput.py uses) counts the whole T x T score matrix, masked half included.
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        head = 6 * c.vocab_size * c.embed_dim if c.tie_embeddings else 0
        return 6 * n + 6 * c.num_layers * context * c.embed_dim + head

    def example_input(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random token ids ``(batch_size, seq_len)`` on the model's device; ``seq_len`` defaults to
        ``max_seq_len`` up to 256 (an 8k-context Llama's whole context is no example) and is capped at it."""
        L = self.config.max_seq_len
        shape = (batch_size, min(seq_len or min(L, 256), L))
        return torch.randint(0, self.config.vocab_size, shape, device=self.tok_emb.weight.device)

    def init_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[KVCache]:
        """Empty KV caches, one per layer, for :meth:`forward` and :meth:`generate`.

        Args:
            batch_size: B of the sequences to decode.
            max_seq_len: Most positions to hold; defaults to (and may not exceed) ``config.max_seq_len``.
            device: Defaults to the model's device.
            dtype: Defaults to the autocast dtype when autocast is on, else the model's dtype.
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len ({max_seq_len}) exceeds the model's ({self.config.max_seq_len})")
        H, D, device, dtype = self._cache_shape(device, dtype)
        return [
            KVCache(batch_size, H, max_seq_len, D, device=device, dtype=dtype)
            for _ in range(self.config.num_layers)
        ]

    def init_slot_cache(
        self, slots: int, capacity: int, device: torch.device | str | None = None
    ) -> list[SlotKVCache]:
        """Empty per-row-length caches, one per layer, for ``slots`` sequences of up to ``capacity`` positions
        each, decoded together while they come and go (``generation.DecodeEngine``)."""
        H, D, device, dtype = self._cache_shape(device, None)
        capacity = min(capacity, self.config.max_seq_len)
        layers = self.config.num_layers
        return [SlotKVCache(slots, H, capacity, D, device=device, dtype=dtype) for _ in range(layers)]

    def _cache_shape(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[int, int, torch.device, torch.dtype]:
        weight = self.tok_emb.weight
        device = torch.device(device) if device is not None else weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        H = self.config.num_kv_heads or self.config.num_heads  # the cache holds key/value heads
        D = self.config.embed_dim // self.config.num_heads
        return H, D, device, dtype

    def forward_features(
        self,
        idx: torch.Tensor,
        cache: list[KVCache] | list[SlotKVCache] | None = None,
        pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``(B, T)`` to final-norm hidden states ``(B, T, C)``; see :meth:`forward`."""
        T = idx.shape[1]
        offset = 0 if cache is None else cache[0].length
        cached = offset if isinstance(offset, int) else cache[0].longest  # per-row lengths: the longest
        if cached + T > self.config.max_seq_len:
            raise ValueError(
                f"{cached} cached + {T} new tokens exceed max_seq_len ({self.config.max_seq_len}); "
                "crop the context (generate does) or build the model with a larger max_seq_len"
            )
        x = self.tok_emb(idx)  # (B, T, C)
        mask = None
        if isinstance(offset, torch.Tensor):  # a SlotKVCache: each row continues at its own length
            if pad is not None:
                raise ValueError("pad is for rows sharing one cache length; a SlotKVCache has per-row ones")
            if self.pos_emb is not None:
                x = x + self.pos_emb(offset[:, None] + torch.arange(T, device=idx.device))  # (B, T, C)
        elif pad is not None:  # left-padded rows: row b's real tokens start at column pad[b]
            columns = torch.arange(offset + T, device=idx.device)
            mask = columns[None, :] >= pad[:, None]  # (B, S): keys that are real tokens
            if self.pos_emb is not None:  # each row counts its positions from its first real token
                x = x + self.pos_emb((columns[None, offset:] - pad[:, None]).clamp(min=0))
            # rotary positions need no shift: a row's scores depend only on distances between its tokens
        elif self.pos_emb is not None:
            x = x + self.pos_emb(T, offset)  # positions continue after the cached ones
        return self.stack(self.dropout(x), causal=True, key_padding_mask=mask, caches=cache)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, C)`` to logits ``(B, T, V)``."""
        return self.lm_head(features)

    def forward(
        self, idx: torch.Tensor, cache: list[KVCache] | None = None, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            idx: Token ids ``(B, T)``.
            cache: From :meth:`init_cache`; the tokens continue the cached sequence, and the caches are
                updated.
            pad: ``(B,)`` long, for a batch of sequences of different lengths padded on the left: the number
                of padding tokens in front of each row (the same for every chunk fed into one cache). Padding
                is masked out of attention and each row's positions start at its first real token, so a
                row's logits match those of the sequence decoded alone (up to float rounding).

        Returns:
            Logits ``(B, T, V)``.
        """
        return self.forward_head(self.forward_features(idx, cache, pad))

    def _last_logits(self, idx: torch.Tensor, cache: list[KVCache] | None) -> torch.Tensor:
        return self.forward_head(self.forward_features(idx, cache)[:, -1])  # (B, V), the head on one position

    def compile_decoding(self, enabled: bool = True) -> "GPT":
        """Makes :meth:`generate` feed each new token through ``torch.compile`` of one decoding step (with a
        KV cache; the prompt is still prefilled eagerly). Each op of an eager step costs microseconds of
        dispatch, which at batch 1 is a large part of a small model's step; the compiled one fuses them.
        The first step compiles, tens of seconds to minutes on a small CPU (cached on disk by PyTorch for
        later processes), and the cache length is a dynamic size, so it compiles once. Returns ``self``."""
        self.compiled_decoding = enabled
        return self

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        top_p: float | None = None,
        stop_tokens: Collection[int] = (),
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Continues each sequence by sampling one token at a time. Call ``model.eval()`` first.

        With the cache, the prompt is processed once and each step feeds one token. Once a sequence fills
        ``max_seq_len``, the context becomes the last ``max_seq_len`` tokens, processed again at every step
        (exactly what decoding without the cache sees).

        Args:
            idx: Prompt token ids ``(B, T)``, T >= 1.
            max_new_tokens: Tokens to add.
            temperature: Divides the logits; 0 picks the most likely token (greedy).
            top_k: Sample only among the k most likely tokens.
            generator: Random generator for reproducible sampling.
            use_cache: Use a KV cache (faster; same result up to float rounding).
            top_p: Sample only among the likeliest tokens whose probabilities add up to top_p.
            stop_tokens: Token ids that end a sequence (a chat model's end of turn): decoding stops once
                every row has produced one (a row that stopped keeps repeating its stop token).
            on_token: Called with each step's new tokens ``(B, 1)`` as they are sampled (streaming).

        Returns:
            ``(B, T + n)``: the prompt followed by the n <= ``max_new_tokens`` new tokens.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if max_new_tokens <= 0:
            return idx
        L = self.config.max_seq_len
        # the cache holds what this call can reach, not the whole context (8k positions for a Llama)
        size = min(L, idx.shape[1] + max_new_tokens)
        cache = self.init_cache(idx.shape[0], max_seq_len=size) if use_cache else None
        logits = self._last_logits(idx[:, -L:], cache)
        stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=idx.device)
        done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_token = sample_logits(logits, temperature, top_k, generator, top_p)  # (B, 1)
            if len(stops):
                next_token = torch.where(done, idx[:, -1:], next_token)  # a finished row repeats its stop
                done = done | torch.isin(next_token, stops)
            idx = torch.cat([idx, next_token], dim=1)
            if on_token is not None:
                on_token(next_token)
            if step == max_new_tokens - 1 or (len(stops) and bool(done.all())):
                break
            if cache is not None and cache[0].length < size:
                decode = _compiled_step(idx.device.type) if self.compiled_decoding else GPT._last_logits
                logits = decode(self, next_token, cache)
            else:  # no cache, or a full one: the last L tokens from the start
                for layer_cache in cache or []:
                    layer_cache.reset()
                logits = self._last_logits(idx[:, -L:], cache)
        return idx


@functools.cache
def _compiled_step(device_type: str) -> Callable:
    # compiled once per process; a graph per model (its parameters are guarded), the cache length dynamic.
    # On CPU the graph's wrapper is C++ (cpp_wrapper): a SmolLM2-135M step calls about 90 fused kernels and
    # 151 weight-only matrix-vector products, and Python's wrapper around them cost about 1 ms of 12 a token
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(GPT._last_logits, dynamic=True, options=options)


def gpt(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_seq_len: int = 256,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    bias: bool = False,
    norm: str = "layernorm",
    positions: str = "learned",
    mlp: str = "gelu",
    activation: str = "gelu",
    mlp_hidden: int = 0,
    num_kv_heads: int = 0,
    qkv_bias: str = "same",
    tie_embeddings: bool = True,
    norm_eps: float = 0.0,
    rope_theta: float = 10000.0,
    rope_scaling: str = "none",
    rope_factor: float = 8.0,
    rope_low_freq_factor: float = 1.0,
    rope_high_freq_factor: float = 4.0,
    rope_original_max_seq_len: int = 8192,
) -> GPT:
    """Builds a GPT from every hyperparameter (see :class:`GPTConfig` for what each means)."""
    fields = dict(locals())
    return GPT(GPTConfig(**fields))


_GPT_TEST = dict(vocab_size=64, max_seq_len=32, num_layers=2, num_heads=2, embed_dim=32)
_GPT_CHAR_SMALL = dict(vocab_size=65, max_seq_len=64, num_layers=4, num_heads=4, embed_dim=128)
_GPT_MINI = dict(vocab_size=65, max_seq_len=256, num_layers=6, num_heads=6, embed_dim=384)
_GPT2 = dict(  # GPT-2 small (124M): the Hugging Face "gpt2" checkpoint's shape
    vocab_size=50257,
    max_seq_len=1024,
    num_layers=12,
    num_heads=12,
    embed_dim=768,
    bias=True,
    activation="gelu_tanh",
)
_SMOLLM2_135M = dict(  # SmolLM2-135M: a Llama-architecture decoder (GQA 9/3 heads, SwiGLU, RMSNorm, tied)
    vocab_size=49152,
    max_seq_len=8192,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    mlp_hidden=1536,
    norm="rmsnorm",
    norm_eps=1e-5,
    positions="rotary",
    rope_theta=100000.0,
    mlp="swiglu",
)


@register_model
def gpt_test(**overrides) -> GPT:
    """Tiny GPT for tests: 2 layers, 2 heads, width 32, vocabulary 64, context 32."""
    return gpt(**{**_GPT_TEST, **overrides})


@register_model
def gpt_char_small(**overrides) -> GPT:
    """nanoGPT's Shakespeare-on-a-CPU configuration: 4 layers, 4 heads, width 128, context 64 (0.8M)."""
    return gpt(**{**_GPT_CHAR_SMALL, **overrides})


@register_model
def gpt_mini(**overrides) -> GPT:
    """nanoGPT's ``shakespeare_char`` GPU configuration: 6 layers, 6 heads, width 384, context 256 (10.7M)."""
    return gpt(**{**_GPT_MINI, **overrides})


@register_model
def gpt2(**overrides) -> GPT:
    """GPT-2 small's architecture (Radford et al. 2019): 12 layers, 12 heads, width 768, context 1024,
    vocabulary 50,257, biases, tanh-GELU (124M). ``tansuo import hf`` builds GPT-2 checkpoints from it."""
    return gpt(**{**_GPT2, **overrides})


@register_model
def llama(**overrides) -> GPT:
    """A Llama-family decoder (RMSNorm, rotary, SwiGLU, grouped-query attention) at SmolLM2-135M's size:
    30 layers, 9 query / 3 key-value heads, width 576, context 8192, vocabulary 49,152 (135M).
    ``tansuo import hf`` builds Llama, Mistral, Qwen2 and SmolLM checkpoints from it."""
    return gpt(**{**_SMOLLM2_135M, **overrides})
