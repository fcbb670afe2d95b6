"""Normalisation layers.

RMSNorm follows Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (arXiv:1910.07467).
LayerNorm is torch's own ``nn.LayerNorm`` (Ba et al. 2016), whose ``bias=False`` gives the bias-free
variant used by nanoGPT.
"""

import torch
from torch import nn

NORM_KINDS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """Scales each vector by the reciprocal of its root mean square, then by a learned gain.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias. The statistics are computed in float32 so
    that bf16 activations keep their precision.

    Args:
        dim: Size of the last dimension, the one normalised.
        eps: Added to the mean square before the square root, to avoid dividing by zero.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises the last dimension of ``x`` (any leading shape); returns the same shape and dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def build_norm(kind: str, dim: int, *, bias: bool = True, eps: float | None = None) -> nn.Module:
    """Builds a normalisation layer by name, for builders whose configs name their norm with a string.

    Args:
        kind: ``"layernorm"`` or ``"rmsnorm"``.
        dim: Width of the vectors to normalise.
        bias: Whether LayerNorm has a bias (RMSNorm never has one).
        eps: Added to the variance; default each layer's own (LayerNorm 1e-5, RMSNorm 1e-6).

    Returns:
        The layer.

    Raises:
        ValueError: If ``kind`` is not one of ``NORM_KINDS``.
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias) if eps is None else nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim) if eps is None else RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}, not {kind!r}")
