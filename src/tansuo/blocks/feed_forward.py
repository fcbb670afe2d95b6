"""Position-wise feed-forward networks.

``FeedForward`` is the two-layer MLP of Vaswani et al. 2017, "Attention Is All You Need" (with GELU as in
GPT-2 and ViT); ``SwiGLU`` is the gated variant of Shazeer 2020, "GLU Variants Improve Transformer"
(arXiv:2002.05202), as used by LLaMA.

Both name their last projection ``out_proj``: it writes into the residual stream, and model initialisers
find it by that name (nanoGPT scales its initial weights down with depth).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """Linear -> activation -> dropout -> linear, applied to each position alone.

    Args:
        embed_dim: Width of the input and output.
        hidden_dim: Width of the hidden layer (often 4 * embed_dim).
        bias: Whether both linears have biases.
        dropout: Dropout on the hidden activations. The residual dropout belongs to the layer around it.
        activation: A module class (or factory) called with no arguments, e.g. ``nn.GELU`` or ``nn.ReLU``.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        bias: bool = True,
        dropout: float = 0.0,
        activation: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.activation = activation()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(..., embed_dim)`` to ``(..., embed_dim)``."""
        return self.out_proj(self.dropout(self.activation(self.in_proj(x))))


class SwiGLU(nn.Module):
    """``out_proj(silu(x W_gate) * (x W_up))``.

    The gate and up projections are one fused linear (one matmul instead of two). With three matrices
    instead of two, ``hidden_dim = 2/3 * 4 * embed_dim`` keeps the parameter count of a 4x MLP.

    Args:
        embed_dim: Width of the input and output.
        hidden_dim: Width of the gated hidden layer.
        bias: Whether the linears have biases (LLaMA has none).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, 2 * hidden_dim, bias=bias)
        self.out_proj = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps ``(..., embed_dim)`` to ``(..., embed_dim)``."""
        gate, up = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(F.silu(gate) * up)
