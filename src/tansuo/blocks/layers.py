"""Transformer layers and the stack that runs them.

``TransformerLayer`` is the pre-norm residual layer of GPT-2 (Radford et al. 2019) and ViT (Dosovitskiy et
al. 2021); Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture", explain why it
trains without warm-up tricks. It takes ready-made modules (torchtune's ``TransformerSelfAttentionLayer``
style): which attention, feed-forward and norm it uses is decided by whoever builds it. ``PostNormLayer`` is
the post-norm layer of the original Transformer (Vaswani et al. 2017) and BERT (Devlin et al. 2019), with the
same ``forward`` signature, usable in the same ``TransformerStack`` (without a final norm).

Shapes: B batch, T sequence length, S memory length, C embedding width.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tansuo.blocks.attention import KVCache


class TransformerLayer(nn.Module):
    """Pre-norm layer: self-attention, optional cross-attention, feed-forward, each added to the residual.

    ``x = x + drop(attn(attn_norm(x)))``; with cross-attention
    ``x = x + drop(cross_attn(cross_attn_norm(x), memory))``; then ``x = x + drop(mlp(mlp_norm(x)))``.

    Args:
        attn: Self-attention, called as ``attn(x, causal=..., key_padding_mask=..., cache=...)``.
        mlp: Position-wise feed-forward network.
        attn_norm: Norm before self-attention.
        mlp_norm: Norm before the feed-forward network.
        cross_attn: Cross-attention to an encoder's output (decoders of encoder-decoder models).
        cross_attn_norm: Norm before cross-attention; required with ``cross_attn``.
        dropout: Residual dropout on each branch's output.
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        *,
        cross_attn: nn.Module | None = None,
        cross_attn_norm: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (cross_attn is None) != (cross_attn_norm is None):
            raise ValueError("cross_attn and cross_attn_norm come together: pass both or neither")
        self.attn_norm = attn_norm
        self.attn = attn
        self.cross_attn_norm = cross_attn_norm
        self.cross_attn = cross_attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        memory: torch.Tensor | None = None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Runs the layer.

        Args:
            x: ``(B, T, C)``.
            memory: Encoder output ``(B, S, C_memory)``; required exactly when the layer has cross-attention.
            causal: Causal self-attention (decoders).
            key_padding_mask: ``(B, T)`` (or ``(B, cache length + T)``), True for real tokens of ``x``.
            memory_mask: ``(B, S)``, True for real tokens of ``memory``.
            cache: KV cache of the self-attention.
            cross_cache: Keys and values of ``memory`` for the cross-attention, computed once (see
                :class:`~tansuo.blocks.MultiHeadAttention`).

        Returns:
            ``(B, T, C)``.
        """
        h = self.attn(self.attn_norm(x), causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("this layer has cross-attention: pass memory (the encoder output)")
            h = self.cross_attn(
                self.cross_attn_norm(x), memory, key_padding_mask=memory_mask, cache=cross_cache
            )
            x = x + self.dropout(h)
        elif memory is not None or cross_cache is not None:
            raise ValueError("memory was passed to a layer without cross-attention")
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class PostNormLayer(nn.Module):
    """Post-norm layer (BERT): each branch's output is added to the residual, then normalised.

    ``x = attn_norm(x + drop(attn(x)))``, then ``x = mlp_norm(x + drop(mlp(x)))``, as in Hugging Face's
    ``BertSelfOutput`` and ``BertOutput``. Its output is already normalised, so a stack of these layers takes
    no final norm.

    Args:
        attn: Self-attention, called as ``attn(x, causal=..., key_padding_mask=..., cache=...)``.
        mlp: Position-wise feed-forward network.
        attn_norm: Norm after the attention residual.
        mlp_norm: Norm after the feed-forward residual.
        dropout: Residual dropout on each branch's output.
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        *,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.attn_norm = attn_norm
        self.mlp = mlp
        self.mlp_norm = mlp_norm
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        memory: torch.Tensor | None = None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Runs the layer; arguments as in :meth:`TransformerLayer.forward`. It has no cross-attention, so
        ``memory`` and ``memory_mask`` must be None."""
        if memory is not None or memory_mask is not None:
            raise ValueError("memory was passed to a post-norm layer, which has no cross-attention")
        h = self.attn(x, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        x = self.attn_norm(x + self.dropout(h))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class TransformerStack(nn.Module):
    """Layers run in order, then an optional final norm (pre-norm stacks need one).

    The same stack is an encoder (``causal=False``) or a decoder (``causal=True``, layers with
    cross-attention when there is an encoder).

    Args:
        layers: Modules with :meth:`TransformerLayer.forward`'s signature.
        final_norm: Applied to the output of the last layer.
    """

    def __init__(self, layers: list[nn.Module], final_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        # activation checkpointing (see `activation_checkpointing_`): a flag, not a wrapper module, so the
        # parameter names, state dicts and bundles stay the same with it on or off
        self.checkpoint_layers = False

    def forward(
        self,
        x: torch.Tensor,
        *,
        memory: torch.Tensor | None = None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        cross_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Maps ``(B, T, C)`` to ``(B, T, C)``; arguments as in :meth:`TransformerLayer.forward`, with one
        cache per layer in ``caches`` (self-attention) and ``cross_caches`` (cross-attention)."""
        for given in (caches, cross_caches):
            if given is not None and len(given) != len(self.layers):
                raise ValueError(f"got {len(given)} caches for {len(self.layers)} layers; pass one per layer")
        recompute = (
            self.checkpoint_layers and caches is None and cross_caches is None and torch.is_grad_enabled()
        )
        for i, layer in enumerate(self.layers):
            kwargs: dict[str, object] = dict(
                causal=causal, key_padding_mask=key_padding_mask, memory_mask=memory_mask
            )
            if recompute:
                # the backward pass runs the layer again (with the same dropout masks: the RNG state is
                # saved) instead of keeping its activations
                x = checkpoint(layer, x, memory=memory, use_reentrant=False, **kwargs)
            else:
                if cross_caches is not None:
                    kwargs["cross_cache"] = cross_caches[i]
                x = layer(x, memory=memory, cache=None if caches is None else caches[i], **kwargs)
        return x if self.final_norm is None else self.final_norm(x)


def activation_checkpointing_(model: nn.Module, enabled: bool = True) -> int:
    """Turns activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
    on or off for every :class:`TransformerStack` in ``model``, in place: with it on, each layer's
    activations are recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant) instead of
    being stored. Inference and KV-cached decoding are unaffected.

    Returns:
        How many stacks were changed (0: the model has none, e.g. a CNN).
    """
    stacks = [m for m in model.modules() if isinstance(m, TransformerStack)]
    for stack in stacks:
        stack.checkpoint_layers = enabled
    return len(stacks)
