"""Augmentation of image batches on the fly, on any device.

``random_shift`` is written here (a pad and a gather); the automatic policies and the mixing come from
kornia (``kornia.augmentation``: pure PyTorch, unlike torchvision, which does not load with the CPU torch
here), imported only when used. Every random draw is seeded per batch, so augmentation is a pure function
of (run seed, step) and a resumed run sees the same images.
"""

from __future__ import annotations

import functools

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


#: automatic augmentation policies for ``data.augment`` (kornia.augmentation.auto)
AUTO_AUGMENT = ("randaugment", "trivialaugment")


def auto_augment(x: torch.Tensor, policy: str, pixel_max: float, seed: int) -> torch.Tensor:
    """Apply RandAugment (Cubuk et al. 2020: two random operations of magnitude 10 out of 30 per image) or
    TrivialAugment (Müller & Hutter 2021: one random operation at a random magnitude per image), from
    kornia, to a batch of images.

    The policies work on ``[0, 1]`` images, so ``x`` is divided by ``pixel_max`` and multiplied back. Grey
    images run through the policy as RGB with three equal channels (its colour operations need three) and
    come back as the mean of the three. kornia draws from torch's global generator; the draw is made under
    ``torch.random.fork_rng`` seeded with ``seed``, so the result is a pure function of ``(x, seed)`` and
    the global random state (dropout's) is left as it was.

    Args:
        x: (B, C, H, W) images in source units, C 1 or 3.
        policy: ``randaugment`` or ``trivialaugment``.
        pixel_max: The source units' white (255, 16, 1.0).
        seed: Seed of this batch's draw (``batch_seed(run seed, micro-batch)``).

    Returns:
        (B, C, H, W) augmented images in source units.
    """
    if policy not in AUTO_AUGMENT:
        raise ValueError(f"unknown augmentation policy {policy!r}; use one of {AUTO_AUGMENT}")
    channels = x.shape[1]
    if channels not in (1, 3):
        raise ValueError(
            f"{policy} needs grey (1 channel) or RGB (3 channel) images, not {channels} channels"
        )
    unit = (x / pixel_max).clamp(0.0, 1.0)
    if channels == 1:
        unit = unit.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    aug = _policy(policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = aug(unit)
    if channels == 1:
        out = out.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return out * pixel_max


@functools.cache
def _policy(policy: str) -> torch.nn.Module:
    """The kornia policy module, built once (about 20 ms); it keeps no state between calls that matters:
    every call draws anew from the generator."""
    from kornia.augmentation.auto import RandAugment, TrivialAugment

    return RandAugment(n=2, m=10) if policy == "randaugment" else TrivialAugment()


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019), from kornia, and return
    soft targets.

    One uniform draw picks, for the whole batch, MixUp with probability ``mixup``, CutMix with probability
    ``cutmix``, else no mixing. MixUp blends each image with a partner, ``(1 - lam) * x + lam * partner``,
    ``lam`` uniform in [0, 1]; CutMix pastes a box of the partner, ``lam`` being the share of the image
    still its own (kornia's ``use_correct_lambda``). The targets are the same blend of the two one-hot
    labels, so each row sums to 1; an unmixed batch gets its one-hot labels. As in :func:`auto_augment`,
    the draw is a pure function of ``seed``.

    Args:
        x: (B, C, H, W) images.
        labels: (B,) class indices.
        num_classes: K, the width of the targets.
        mixup: Probability of MixUp for this batch.
        cutmix: Probability of CutMix for this batch; ``mixup + cutmix <= 1``.
        seed: Seed of this batch's draw.

    Returns:
        (B, C, H, W) images and (B, K) target probabilities.
    """
    import kornia.augmentation as K

    if mixup < 0 or cutmix < 0 or mixup + cutmix > 1 + 1e-9:
        raise ValueError(f"mixup ({mixup}) and cutmix ({cutmix}) are probabilities that sum to at most 1")
    onehot = F.one_hot(labels, num_classes).to(x.dtype)  # (B, K)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = float(torch.rand(()))
        if u >= mixup + cutmix:
            return x, onehot
        if u < mixup:
            x, mixed = K.RandomMixUpV2(data_keys=["input", "class"])(x, labels)  # mixed: (B, 3)
            own = 1.0 - mixed[:, 2]  # share of each image that is still its own
        else:
            x, mixed = K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)(x, labels)
            mixed = mixed[0]  # (B, 3): one mix
            own = mixed[:, 2]
    partner = F.one_hot(mixed[:, 1].long(), num_classes).to(x.dtype)  # (B, K)
    return x, own[:, None] * onehot + (1.0 - own[:, None]) * partner
