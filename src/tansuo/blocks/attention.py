"""Multi-head attention on ``torch.nn.functional.scaled_dot_product_attention``, with a KV cache.

Vaswani et al. 2017, "Attention Is All You Need", section 3.2: ``softmax(Q K^T / sqrt(D)) V`` per head. The
same module does self-attention (keys and values from ``x``) and cross-attention (from ``memory``, of width
``kv_dim``). Incremental decoding keeps past keys and values in a preallocated :class:`KVCache`, as in
nanoGPT's and torchtune's decoders.

Shapes: B batch, T query length, S key length, C embedding width, H heads, D = C / H head width.
Masks are boolean and True means "may be attended to", as in ``scaled_dot_product_attention``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.blocks.positions import RotaryEmbedding


class KVCache:
    """Preallocated keys and values ``(B, H, max_seq_len, D)`` of one attention layer, for decoding a chunk
    at a time. ``length`` positions are filled. Keys and values are read back in the dtype they were written
    in, so a float32 cache also serves bf16 autocast.
    """

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (B, H, max_seq_len, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """An empty cache writing into the given buffers ``(B, H, L, D)`` (views of a larger cache, such as
        one row of a :class:`SlotKVCache`, so a prompt is prefilled in place)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, 0
        return cache

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forgets every position (the buffers are kept and overwritten later)."""
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes new keys and values ``(B, H, T, D)`` at ``[length, length + T)``; returns all of
        ``[0, length + T)``, ``(B, H, length + T, D)``."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_seq_len or k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(
                f"keys of shape {tuple(k.shape)} do not fit a cache of shape {tuple(self.k.shape)} "
                f"holding {start} positions (is it full? use a batch of the cache's size)"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)

    def reorder_(self, index: torch.Tensor) -> None:
        """Keeps rows ``index`` (``(B',)`` long), in that order: beam search follows its surviving
        hypotheses (fairseq's ``reorder_incremental_state``)."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class SlotKVCache:
    """Keys and values of independent sequences decoded as one batch, each row at its own length (continuous
    batching: a sequence joins or leaves between steps while the others go on).

    Rows ``[0, rows)`` are the active ones; a step feeds every active row ``T`` tokens, written at each row's
    own length, and attention masks each row to its own keys (the causal mask at the row's positions).
    ``length`` is then a ``(rows,)`` tensor, which positions (learned or rotary) read per row. Buffers are
    ``(slots, H, capacity, D)``; :meth:`grow` enlarges the capacity, :meth:`move` compacts the rows.
    """

    def __init__(
        self,
        slots: int,
        num_heads: int,
        capacity: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (slots, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (slots, H, capacity, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.host_lengths = [0] * slots  # the same, without a device sync
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> torch.Tensor:
        """Each active row's filled positions, ``(rows,)`` (a copy: :meth:`update` moves them on)."""
        return self.lengths[: self.rows].clone()

    @property
    def longest(self) -> int:
        return max(self.host_lengths[: self.rows], default=0)

    def row(self, r: int) -> KVCache:
        """An empty :class:`KVCache` over row ``r`` (to prefill it); record its length with :meth:`set`."""
        return KVCache.over(self.k[r : r + 1], self.v[r : r + 1])

    def set(self, r: int, length: int) -> None:
        self.lengths[r] = length
        self.host_lengths[r] = length

    def move(self, src: int, dst: int) -> None:
        """Copies row ``src`` (its filled positions) into row ``dst``."""
        n = self.host_lengths[src]
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]
        self.set(dst, n)

    def grow(self, capacity: int) -> None:
        """Enlarges every row to hold ``capacity`` positions (the filled ones are kept)."""
        if capacity <= self.capacity:
            return
        n = self.longest if self.rows else 0
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, :n] = old[:, :, :n]
            setattr(self, name, new)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes ``(rows, H, T, D)`` at each row's length; returns ``(rows, H, S, D)`` with S the longest
        row's new length (positions past a row's own length are stale; the causal mask hides them)."""
        n, T = k.shape[0], k.shape[2]
        if n != self.rows:
            raise ValueError(f"{n} rows of keys for a cache with {self.rows} active rows")
        S = self.longest + T
        if self.capacity < S:
            raise ValueError(f"a row would reach {S} positions; the cache holds {self.capacity} (grow it)")
        columns = self.length[:, None] + torch.arange(T, device=k.device)  # (rows, T)
        rows = torch.arange(n, device=k.device)[:, None]
        self.k[rows, :, columns] = k.transpose(1, 2).to(self.k.dtype)  # indexed as (rows, T, H, D)
        self.v[rows, :, columns] = v.transpose(1, 2).to(self.v.dtype)
        self.lengths[:n] += T
        for r in range(n):
            self.host_lengths[r] += T
        return self.k[:n, :, :S].to(k.dtype), self.v[:n, :, :S].to(v.dtype)


def attention_mask(
    query_len: int,
    key_len: int,
    *,
    causal: bool = False,
    offset: int | torch.Tensor = 0,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Builds the boolean mask for ``scaled_dot_product_attention`` (True = attend), or None for no mask.

    Args:
        query_len: T; query i sits at absolute position ``offset + i``.
        key_len: S; key j sits at absolute position j.
        causal: Whether query i may only see keys at positions ``<= offset + i``.
        offset: Absolute position of the first query (the KV cache length before this chunk); a ``(B,)``
            tensor gives each row its own (a :class:`SlotKVCache`).
        key_padding_mask: ``(B, S)``, True for real keys, False for padding.
        device: Device of the mask.

    Returns:
        ``(T, S)``, ``(B, 1, T, S)`` or None. Query rows that see no key at all (only padding) are opened
        to every key: their output is meaningless but finite, where some kernels give NaN.
    """
    mask = None
    if isinstance(offset, torch.Tensor):  # per-row positions: (B, 1, T, S)
        query_pos = offset[:, None] + torch.arange(query_len, device=device)  # (B, T)
        mask = (torch.arange(key_len, device=device)[None, None, :] <= query_pos[:, :, None])[:, None]
    elif causal and not (query_len == 1 and offset == key_len - 1):  # one query at the end sees every key
        query_pos = torch.arange(offset, offset + query_len, device=device)
        mask = torch.arange(key_len, device=device)[None, :] <= query_pos[:, None]  # (T, S)
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != key_len:
            raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} keys, not {key_len}")
        padding = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        mask = padding if mask is None else padding & mask  # (B, 1, T, S)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head ``q (B, H, 1, D)`` over every key ``k, v (B, Hkv, S, D)``, Hkv dividing
    H, in elementwise products and sums: a compiled decoding step fuses them, where SDPA's CPU kernel costs
    tens of microseconds of set-up per call for a few thousand multiply-adds per head."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    # products and sums rather than matmuls, which Inductor fuses into its own loops (a matmul would be an
    # MKL call each, as costly as SDPA at this size, or be rewritten into SDPA by its pattern matcher)
    q = q.reshape(B, Hkv, H // Hkv, 1, D) * D**-0.5
    weights = (q * k[:, :, None]).sum(dim=-1).softmax(dim=-1)  # (B, Hkv, group, S)
    return (weights[..., None] * v[:, :, None]).sum(dim=-2).reshape(B, H, 1, D)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention.

    Args:
        embed_dim: C, width of queries and of the output.
        num_heads: H; must divide ``embed_dim``.
        kv_dim: Width of ``memory`` for cross-attention; defaults to ``embed_dim``.
        bias: Whether the projections have biases.
        dropout: Dropout on the attention probabilities (training only).
        rotary: Rotary embedding applied to queries and keys of self-attention (never to cross-attention).
            It may be shared by every layer of a model.
        num_kv_heads: Key/value heads, dividing ``num_heads``: grouped-query attention (Ainslie et al. 2023),
            each key/value head shared by ``num_heads / num_kv_heads`` query heads (1: multi-query);
            default ``num_heads``. The KV cache holds the key/value heads only.
        qkv_bias: Whether the query, key and value projections have biases (Qwen2: yes, its output
            projection no); default ``bias``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: RotaryEmbedding | None = None,
        num_kv_heads: int | None = None,
        qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_dim = kv_dim or embed_dim
        self.dropout = dropout
        qkv_bias = bias if qkv_bias is None else qkv_bias
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(self.kv_dim, 2 * kv_width, bias=qkv_bias)  # keys and values in one matmul
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rotary = rotary

    def _heads(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads or self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | SlotKVCache | None = None,
    ) -> torch.Tensor:
        """Attends from ``x`` to itself (self-attention) or to ``memory`` (cross-attention).

        Args:
            x: Queries' input, ``(B, T, C)``.
            memory: Keys' and values' input ``(B, S, kv_dim)``; None for self-attention.
            causal: Whether each position only sees itself and earlier positions (absolute positions, so a
                chunk decoded with a cache sees the whole cache and the earlier part of the chunk).
            key_padding_mask: ``(B, S)``, True for real tokens. With a cache, S = cache length + T.
            cache: Self-attention: past keys and values, updated in place. Cross-attention: the keys and
                values of ``memory``, computed from it on the first call (an empty cache) and read back
                on later calls, so an encoder-decoder's decoder projects its encoder output once.

        Returns:
            ``(B, T, C)``.
        """
        B, T, C = x.shape
        if memory is None and self.kv_dim != C:
            raise ValueError(f"this attention reads keys and values of width {self.kv_dim}; pass memory")
        if memory is not None and cache is not None:
            return self._cached_cross_attention(x, memory, key_padding_mask, cache)
        exporting = torch.compiler.is_exporting()
        compiling = torch.compiler.is_compiling() and not exporting and not self.training
        grouped = self.num_kv_heads != self.num_heads
        plain = memory is None and cache is None and not causal and self.rotary is None and not grouped
        if exporting and plain:
            return self._exported_self_attention(x, key_padding_mask)
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        kv = self.kv_proj(x if memory is None else memory).chunk(2, dim=-1)
        k, v = (self._heads(t, self.num_kv_heads) for t in kv)  # (B, Hkv, T, D)
        offset = 0 if cache is None else cache.length
        if self.rotary is not None and memory is None:
            q, k = self.rotary.rotate(q, offset), self.rotary.rotate(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, S, D), S = offset + T
        gqa = False
        if grouped and exporting:  # each key/value head serves a group of query heads
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        elif grouped:  # the kernel reads each key/value head for its group: no copy of the cache
            gqa = True
        S = k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if causal and key_padding_mask is None and isinstance(offset, int) and offset == 0 and S == T:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa
            )  # fused kernels
        elif T == 1 and key_padding_mask is None and not isinstance(offset, torch.Tensor) and compiling:
            y = _one_query_attention(q, k, v)  # a compiled decoding step: plain ops the compiler fuses
        else:
            mask = attention_mask(
                T, S, causal=causal, offset=offset, key_padding_mask=key_padding_mask, device=x.device
            )
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa
            )  # (B, H, T, D)
        # heads side by side: H * D wide, narrower than C once heads are pruned
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _cached_cross_attention(
        self, x: torch.Tensor, memory: torch.Tensor, key_padding_mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """Cross-attention whose keys and values of ``memory`` live in ``cache`` (filled on first use)."""
        B, T, _ = x.shape
        if not isinstance(cache, KVCache):
            raise ValueError("cross-attention caches the memory's keys and values in a KVCache")
        if cache.length == 0:
            kv = self.kv_proj(memory).chunk(2, dim=-1)
            cache.update(*(self._heads(t, self.num_kv_heads) for t in kv))  # (B, Hkv, S, D)
        k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
        mask = None
        if key_padding_mask is not None:
            mask = attention_mask(T, k.shape[2], key_padding_mask=key_padding_mask, device=x.device)
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        grouped = self.num_kv_heads != self.num_heads
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout, enable_gqa=grouped
        )  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _exported_self_attention(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Bidirectional self-attention written for export: the same function as :meth:`forward`, in the
        shape ONNX Runtime's transformer fusions recognise (``tansuo.export.onnx`` turns it into one
        ``com.microsoft`` Attention node): three projections (keys and values sliced out of ``kv_proj``; the
        slices of the weights are folded into constants after export) and an additive mask ``(B, 1, T, S)``,
        the dtype's minimum at padding, instead of a boolean one. A row of padding only sees padding, so its
        output is finite, as with :func:`attention_mask`'s guard."""
        B, T, _ = x.shape
        width = self.kv_proj.out_features // 2
        w, b = self.kv_proj.weight, self.kv_proj.bias
        q = self.q_proj(x)
        k = F.linear(x, w[:width], None if b is None else b[:width])
        v = F.linear(x, w[width:], None if b is None else b[width:])
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = None
        if key_padding_mask is not None:
            real = key_padding_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            mask = torch.zeros(real.shape, dtype=q.dtype, device=x.device)
            mask = mask.masked_fill(~real, torch.finfo(q.dtype).min).expand(B, 1, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))
