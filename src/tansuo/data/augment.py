"""Augmentation of image batches on the fly, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random whole-pixel offset, filling the uncovered border with zeros.

    Offsets ``(dy, dx)`` are drawn uniformly from ``[-max_shift, max_shift]`` per image with
    ``torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator)``; output pixel ``(y, x)`` is
    input pixel ``(y - dy, x - dx)`` or zero outside the image. Vectorised: pad, then gather.

    Args:
        x: (B, C, H, W) images.
        max_shift: Largest shift in pixels; 0 returns ``x`` itself.
        generator: Random source, on the CPU or on ``x``'s device.

    Returns:
        (B, C, H, W) shifted images.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return x
    batch, channels, height, width = x.shape
    shifts = torch.randint(
        -max_shift, max_shift + 1, (batch, 2), generator=generator, device=generator.device
    )
    shifts = shifts.to(x.device)
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))  # (B, C, H+2m, W+2m)
    rows = torch.arange(height, device=x.device) + max_shift - shifts[:, :1]  # (B, H)
    cols = torch.arange(width, device=x.device) + max_shift - shifts[:, 1:]  # (B, W)
    batch_index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
