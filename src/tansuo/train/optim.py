"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule.

Following nanoGPT (and GPT-2/3 practice): parameters with two or more dimensions (linear and embedding
matrices) decay; biases and norm gains do not. The schedule is a pure function of the step, so resuming
needs only the step number.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and everything else (not decayed)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the fused kernel (on the CPU too: 9x faster than the default
    for-loop over a 23M-parameter encoder here, 14 ms against 125 ms a step)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def lr_at(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str
) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
