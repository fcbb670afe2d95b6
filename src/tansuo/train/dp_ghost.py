"""Ghost clipping for DP-SGD (``train.privacy.grad_sample_mode: ghost``): clipped sums of per-example
gradients without the per-example gradients.

DP-SGD needs ``sum_i c_i * grad_i`` with ``c_i = min(1, C / ||grad_i||)``. Opacus' hooks build every
``grad_i`` (batch x parameters values: 42 MB an example for MiniLM's 10.6M non-embedding parameters, so a
few examples at a time). Ghost clipping (Li et al. 2021, "Large Language Models Can Be Strong
Differentially Private Learners"; Opacus' fast gradient clipping) takes two backward passes instead:

1. One backward of the batch's loss with Opacus' norm hooks (``GradSampleHooksFastGradientClipping``): for a
   Linear layer fed ``a`` (B, T, in) whose output receives ``g`` (B, T, out), ``||grad_i||^2`` is
   ``sum_{t,s} (a_t . a_s)(g_t . g_s)``, two T x T products per example, no ``in x out`` tensor; other
   layers (LayerNorm, the LoRA adapters) give their per-example gradients' norms from their small
   per-example gradients. The same pass gives the gradient of the loss at the model's output.
2. One backward per clipping group from the model's output, with each example's row of that gradient
   scaled by ``B * c_i``: since an example's loss depends on its own row alone (the
   :data:`~tansuo.tasks.base.EXAMPLES` contract: no layer mixes the examples of a batch), this is
   ``sum_i c_i * grad_i``. A group whose parameters sit at the end of the model (a classification head)
   costs almost nothing: autograd walks only as far as the parameters asked for.

The sums, the noise and the accountant are those of the per-example way; only memory and time change.
The model must return one tensor whose first dimension is the batch (classify and image models do).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from tansuo.errors import TansuoError
from tansuo.tasks.base import Batch


@contextlib.contextmanager
def _quiet_opacus() -> Any:
    """Opacus' fast-clipping hooks log one INFO line per layer each time they are attached."""
    from opacus.grad_sample import grad_sample_module_fast_gradient_clipping as fgc

    logger = logging.getLogger(fgc.__name__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def ghost_clipped_sums(
    model: nn.Module,
    loss_fn: Any,
    batch: Batch,
    groups: dict[str, int],
    norms: list[float],
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each trained parameter's clipped sum over the batch's examples, and the batch's summed loss.

    Args:
        model: the model in training mode; its trained parameters are those in ``groups``.
        loss_fn: ``loss_fn(model, batch)``, the mean of the examples' losses.
        batch: the examples (tensors with the batch first).
        groups: each trained parameter's name -> its clipping group's index.
        norms: each group's clipping norm; example ``i``'s gradient of group ``g`` is scaled by
            ``min(1, norms[g] / (its norm + 1e-6))``, as Opacus' optimizers do.
        autocast: the context the forward runs in.

    Raises:
        TansuoError: The model's output is not one tensor with a row per example.
    """
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleHooksFastGradientClipping,
    )

    params = {n: p for n, p in model.named_parameters() if n in groups}
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with _quiet_opacus():
        hooks = GradSampleHooksFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", strict=False, use_ghost_clipping=True
        )
    # in both passes: a first trained layer's input needs no gradient, as it should be
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        try:
            loss, out = _forward(model, loss_fn, batch, autocast, outputs)
            handle.remove()
            grad_out, squares = _norms(loss, out, params, groups, len(norms))
            hooks.hooks_enabled = False  # the weighted passes only sum
            bounds = torch.tensor(norms, device=squares.device).unsqueeze(1)  # (G, 1)
            factors = (bounds / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # (G, n)
            sums = _weighted_sums(out, grad_out, params, groups, factors)
        finally:
            handle.remove()
            hooks.remove_hooks()
            for p in params.values():
                for attr in ("_norm_sample", "grad_sample"):
                    if hasattr(p, attr):
                        setattr(p, attr, None)
    return sums, loss.detach() * len(out)


def _forward(
    model: nn.Module,
    loss_fn: Any,
    batch: Batch,
    autocast: Callable[[], AbstractContextManager[Any]],
    outputs: list[Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean loss and the model's output, checked to be one tensor with a row per example."""
    n = len(next(iter(batch.values())))
    try:
        with autocast():
            loss = loss_fn(model, batch)
    except NotImplementedError as e:  # Opacus refuses a parameter used twice (tied weights)
        if "tying" not in str(e):
            raise
        raise TansuoError(f"train.privacy.grad_sample_mode ghost: {e}; use grad_sample_mode auto") from e
    out = outputs[0] if len(outputs) == 1 else None
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        got = f"{len(outputs)} calls" if len(outputs) != 1 else type(out).__name__
        raise TansuoError(
            "train.privacy.grad_sample_mode ghost: the model must be called once and return one "
            f"tensor with a row per example ({n}), got {got}; use grad_sample_mode auto"
        )
    return loss, out


def _norms(
    loss: torch.Tensor,
    out: torch.Tensor,
    params: dict[str, nn.Parameter],
    groups: dict[str, int],
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first backward: the loss's gradient at the output, and each group's squared per-example norms
    ``(G, n)`` from the norms Opacus' hooks leave on each parameter (``_norm_sample``)."""
    grad_out, *plain = torch.autograd.grad(
        loss, [out, *params.values()], retain_graph=True, allow_unused=True
    )
    squares = torch.zeros(count, len(out), device=out.device)
    for (name, p), grad in zip(params.items(), plain, strict=True):
        norm = getattr(p, "_norm_sample", None)
        if norm is not None:
            squares[groups[name]] += norm.detach().float().pow(2)
        elif grad is not None and bool(grad.any()):  # a norm taken as 0 would break the guarantee
            raise TansuoError(
                "train.privacy.grad_sample_mode ghost: Opacus' hooks gave no per-example norm for "
                f"{name}, which the loss reaches; use grad_sample_mode auto"
            )
    return grad_out, squares


def _weighted_sums(
    out: torch.Tensor,
    grad_out: torch.Tensor,
    params: dict[str, nn.Parameter],
    groups: dict[str, int],
    factors: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One backward per group from the output, each example's row scaled by ``n * factor``: the group's
    clipped sum (the output's gradient is the mean loss's, ``1 / n`` of each example's)."""
    n = len(out)
    used = sorted({groups[name] for name in params})
    sums: dict[str, torch.Tensor] = {}
    for k, g in enumerate(used):
        names = [name for name in params if groups[name] == g]
        scale = (n * factors[g]).to(grad_out.dtype).view(n, *([1] * (grad_out.dim() - 1)))
        grads = torch.autograd.grad(
            out,
            [params[name] for name in names],
            grad_outputs=grad_out * scale,
            retain_graph=k < len(used) - 1,
            allow_unused=True,
        )
        for name, grad in zip(names, grads, strict=True):
            sums[name] = torch.zeros_like(params[name]) if grad is None else grad.to(params[name].dtype)
    return sums
