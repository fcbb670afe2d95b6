"""Position information for sequences of tokens.

- ``LearnedPositions``: a trained vector per position (GPT-2, BERT, ViT).
- ``SinusoidalPositions``: fixed sines and cosines of geometric frequencies (Vaswani et al. 2017, "Attention
  Is All You Need", section 3.5).
- ``RotaryEmbedding``: rotates query and key pairs by position-dependent angles, so that their dot product
  depends on the relative position only (Su et al. 2021, "RoFormer", arXiv:2104.09864). The "rotate half"
  pairing of GPT-NeoX and Hugging Face LLaMA is used: dimension i is paired with dimension i + D/2.

Shapes: B batch, H heads, T sequence length, C embedding width, D head width.
"""

import math

import torch
from torch import nn


def _positions(positions: int | torch.Tensor, offset: int, max_seq_len: int, device: torch.device):
    """Returns a long tensor of absolute positions, checked against ``max_seq_len``."""
    if not isinstance(positions, torch.Tensor):  # an int, or a symbolic one while exporting
        last = offset + positions - 1  # checked without a tensor, so no device sync
        positions = torch.arange(offset, offset + positions, device=device)
    else:
        positions = positions.to(device) + offset
        last = int(positions.max()) if positions.numel() else -1
    if last >= max_seq_len:
        raise ValueError(
            f"position {last} is beyond max_seq_len ({max_seq_len}); "
            "use shorter sequences or build the model with a larger max_seq_len"
        )
    return positions


class LearnedPositions(nn.Module):
    """One learned vector per position, initialised from N(0, 0.02^2).

    Args:
        max_seq_len: Number of positions that have a vector.
        embed_dim: Width of each vector.
    """

    def __init__(self, max_seq_len: int, embed_dim: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.weight = nn.Parameter(torch.empty(max_seq_len, embed_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: int | torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Looks up position vectors.

        Args:
            positions: A length T (positions ``offset .. offset + T - 1``) or a long tensor of positions.
            offset: Added to every position (e.g. the number of tokens already in a KV cache).

        Returns:
            ``(T, C)`` for a length, or ``positions.shape + (C,)`` for a tensor.
        """
        return self.weight[_positions(positions, offset, self.max_seq_len, self.weight.device)]


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position vectors; a non-persistent buffer, so nothing is trained or saved.

    Args:
        max_seq_len: Number of positions precomputed.
        embed_dim: Width of each vector.
        base: The wavelengths grow geometrically from 2 pi to ``base`` * 2 pi.
    """

    def __init__(self, max_seq_len: int, embed_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        position = torch.arange(max_seq_len, dtype=torch.float32)[:, None]  # (T, 1)
        inv_freq = torch.exp(torch.arange(0, embed_dim, 2) * (-math.log(base) / embed_dim))  # (ceil(C/2),)
        table = torch.zeros(max_seq_len, embed_dim)  # (T, C)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)[:, : embed_dim // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: int | torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Same contract as :meth:`LearnedPositions.forward`."""
        return self.table[_positions(positions, offset, self.max_seq_len, self.table.device)]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for queries and keys; cos/sin tables are non-persistent buffers.

    Args:
        head_dim: Width D of each head; must be even.
        max_seq_len: Number of positions precomputed.
        base: Base of the geometric frequencies (10000 in RoFormer and LLaMA 2, 500000 in Llama 3; Hugging
            Face configs call it ``rope_theta``).
        llama3_scaling: Llama 3.1's frequency scaling for long contexts, as ``(factor, low_freq_factor,
            high_freq_factor, original_max_position_embeddings)``; None for none.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        llama3_scaling: tuple[float, float, float, int] | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head width, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
        if llama3_scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, *llama3_scaling)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, dim=-1), persistent=False)  # (T, D)
        # rotate-half as one roll: x * cos + roll(x, D/2) * [-sin, sin]
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def rotate(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotates queries or keys by their absolute positions ``offset .. offset + T - 1``.

        Args:
            x: Queries or keys, ``(B, H, T, D)``.
            offset: Absolute position of the first of the T positions (the KV cache length when decoding);
                a ``(B,)`` tensor gives each row its own.

        Returns:
            The rotated tensor, same shape and dtype; each pair's norm is unchanged.
        """
        if isinstance(offset, torch.Tensor):
            steps = torch.arange(x.shape[-2], device=offset.device)
            positions = _positions(offset[:, None] + steps, 0, self.max_seq_len, self.cos.device)
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, T, D)
        elif isinstance(offset, int):  # a slice, not a lookup: fewer calls per decoded token
            end = offset + x.shape[-2]
            if end > self.max_seq_len:
                _positions(x.shape[-2], offset, self.max_seq_len, self.cos.device)  # raises, naming the limit
            cos, sin = self.cos[offset:end], self.sin[offset:end]  # (T, D)
        else:  # a symbolic offset while exporting
            positions = _positions(x.shape[-2], offset, self.max_seq_len, self.cos.device)
            cos, sin = self.cos[positions], self.sin[positions]  # (T, D)
        x32 = x.float()
        rotated = x32.roll(self.head_dim // 2, dims=-1)  # (x2, x1); sin carries the minus of (-x2, x1)
        return torch.addcmul(x32 * cos, rotated, sin).type_as(x)

    forward = rotate


def llama3_frequencies(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original: int
) -> torch.Tensor:
    """Llama 3.1's rotary scaling: wavelengths longer than ``original / low_freq_factor`` are stretched by
    ``factor``, those shorter than ``original / high_freq_factor`` kept, and those between blended smoothly
    (the ``"llama3"`` ``rope_type`` of Hugging Face transformers)."""
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"llama3 rotary scaling needs high_freq_factor ({high_freq_factor}) > low_freq_factor "
            f"({low_freq_factor})"
        )
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}"
