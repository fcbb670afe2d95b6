"""Reusable Transformer building blocks. They take ready-made modules and sizes, never a model config."""

from tansuo.blocks.attention import KVCache, MultiHeadAttention, SlotKVCache, attention_mask
from tansuo.blocks.feed_forward import FeedForward, SwiGLU
from tansuo.blocks.layers import PostNormLayer, TransformerLayer, TransformerStack, activation_checkpointing_
from tansuo.blocks.norms import NORM_KINDS, RMSNorm, build_norm
from tansuo.blocks.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions

__all__ = [
    "NORM_KINDS",
    "FeedForward",
    "KVCache",
    "LearnedPositions",
    "MultiHeadAttention",
    "PostNormLayer",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SlotKVCache",
    "SwiGLU",
    "TransformerLayer",
    "TransformerStack",
    "activation_checkpointing_",
    "attention_mask",
    "build_norm",
]
