"""Group-wise clipping for DP-SGD (``train.privacy.group_norms``), on Opacus' ``DPOptimizer``.

Flat clipping bounds an example's whole gradient by one norm C. When one part of the model has far larger
per-example gradients than the rest (a freshly initialised classification head on a pretrained encoder
tuned with LoRA: about 3.7 against 0.6 on SST-2 with MiniLM), clipping scales both by the same factor, so the
large part takes nearly all of C and the rest drowns in noise sized for C. Group-wise clipping (He et al.
2022, "Exploring the Limits of Differentially Private Deep Learning with Group-wise Clipping") gives each of
the G groups its own norm ``C_g`` and clips each example's gradient of that group to it.

The noise, and why the guarantee is the flat one's: divide group ``g`` of each clipped example by ``C_g``.
Every group then has norm at most 1 and the whole vector at most ``sqrt(G)``: adding Gaussian noise of
standard deviation ``sigma * sqrt(G)`` to the sum of these vectors is the Gaussian mechanism with noise
multiplier ``sigma``, which the accountant already counts. Multiplying group ``g`` back by ``C_g`` is
post-processing. So group ``g`` receives noise of standard deviation ``sigma * sqrt(G) * C_g``: each group's
noise is in proportion to its own norm, not to the largest one's (Opacus' per-layer clipping adds
``sigma * ||C||`` to every tensor). With equal norms ``C / sqrt(G)`` both are flat clipping's ``sigma * C``.
"""

from __future__ import annotations

import math

import torch
from opacus.optimizers.optimizer import (
    DPOptimizer,
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)


class GroupClippingOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` that clips each group of parameters apart and noises each in proportion.

    Args:
        optimizer: the wrapped optimizer.
        groups: for each trainable parameter of ``optimizer``, in order (``self.params``), its group's index.
        norms: each group's clipping norm ``C_g``.
        noise_multiplier, expected_batch_size, loss_reduction: as ``DPOptimizer``'s.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        groups: list[int],
        norms: list[float],
        noise_multiplier: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=math.sqrt(len(norms)),  # the rescaled vector's norm; add_noise scales per group
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
        )
        if len(groups) != len(self.params) or sorted(set(groups)) != list(range(len(norms))):
            raise ValueError(
                f"{len(self.params)} parameters, {len(groups)} group indices, {len(norms)} groups"
            )
        self.groups, self.norms = groups, norms

    def clip_and_accumulate(self) -> None:
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        n = len(samples[0])
        squares = torch.zeros(len(self.norms), n, device=samples[0].device)
        for g, s in zip(self.groups, samples, strict=True):
            squares[g] += s.flatten(1).float().pow(2).sum(1)  # (n,); an empty batch: (0,)
        norms = torch.tensor(self.norms, device=squares.device).unsqueeze(1)  # (G, 1)
        factors = (norms / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # (G, n)
        for p, g, s in zip(self.params, self.groups, samples, strict=True):
            _check_processed_flag(p.grad_sample)
            grad = torch.einsum("i,i...", factors[g].to(p.dtype), s.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        scale = self.noise_multiplier * math.sqrt(len(self.norms))
        for p, g in zip(self.params, self.groups, strict=True):
            _check_processed_flag(p.summed_grad)
            std = scale * self.norms[g]
            noise = _generate_noise(std=std, reference=p.summed_grad, generator=self.generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
