"""AdamW with weight decay on matrices only, and the learning-rate schedules (warm-up, then cosine, constant
or inverse square root).

Following nanoGPT (and GPT-2/3 practice): parameters with two or more dimensions (linear and embedding
matrices) decay; biases and norm gains do not. The schedule is a pure function of the step, so resuming
needs only the step number.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from tansuo.errors import RecipeError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise learning-rate decay: 0 below the first layer (embeddings), i + 1
    inside layer i (``...layers.<i>....``), ``num_layers + 1`` above the last (heads, final norm)."""
    m = _LAYER.search(name)
    if m is not None:
        return int(m.group(1)) + 1
    if any(part in name for part in ("emb", "stem", "cls_token")):
        return 0
    return num_layers + 1


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups: matrices (decayed) and everything else (not decayed); with ``layer_decay`` < 1 each of
    them is split by depth, with ``lr_scale = layer_decay ** (top - depth)`` (ELECTRA's layer-wise decay:
    the embeddings learn slowest, the head at the full rate). ``lr_scales`` ``{name prefix: factor}``
    multiplies the scale of the parameters under each prefix (the first that matches; a fresh head that
    may learn faster than a pretrained body). The trainer multiplies lr by ``lr_scale``.

    Raises:
        RecipeError: a prefix of ``lr_scales`` names no trained parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr_scales = lr_scales or {}
    unused = [k for k in lr_scales if not any(under(n, k) for n, _ in named)]
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in named})
        raise RecipeError(
            f"train.lr_scales: no trained parameter's name starts with {', '.join(unused)}; the trained "
            f"parameters are under {', '.join(tops)}"
        )
    depths = [int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))]
    num_layers = max(depths) + 1 if depths else 0
    top = num_layers + 1
    groups: dict[tuple[int, bool, float], dict] = {}
    for name, p in named:
        depth = layer_depth(name, num_layers) if layer_decay != 1.0 else top
        scale = next((f for k, f in lr_scales.items() if under(name, k)), 1.0)
        decayed = p.dim() >= 2
        group = groups.setdefault(
            (depth, decayed, scale),
            {
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": layer_decay ** (top - depth) * scale,
            },
        )
        group["params"].append(p)
    # the order of earlier versions (resumed checkpoints index the optimizer state by it): decayed first
    # without layer decay, by depth (not decayed first) with it
    order = (lambda k: (not k[1], k[2])) if layer_decay == 1.0 else (lambda k: k)
    return [groups[k] for k in sorted(groups, key=order)]


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under the dotted ``prefix`` (``head`` holds ``head.weight``)."""
    return name == prefix or name.startswith(prefix + ".")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
    layer_decay: float = 1.0,
    impl: str = "auto",
    kind: str = "adamw",
    momentum: float = 0.9,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (``kind="adamw"``) or SGD with ``momentum`` (``kind="sgd"``) over `param_groups`.

    ``impl`` (``train.optimizer_impl``) picks torch's implementation: ``fused`` (one kernel for all
    parameters; on the CPU too: 9x faster than the for-loop over a 23M-parameter encoder here, 14 ms
    against 125 ms a step), ``foreach`` (multi-tensor ops), ``for-loop`` (one parameter at a time), or
    ``auto``: fused on CPU and CUDA, torch's own choice elsewhere. All compute the same update up to
    rounding.
    """
    if impl == "auto":
        impl = "fused" if device.type in ("cuda", "cpu") else "default"
    flags = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
        "default": {},
    }
    if impl not in flags:
        raise ValueError(f"unknown optimizer implementation {impl!r}; use auto, fused, foreach or for-loop")
    groups = param_groups(model, weight_decay, layer_decay, lr_scales)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **flags[impl])
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; use adamw or sgd")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **flags[impl])


def lr_at(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, schedule: str
) -> float:
    """Learning rate for optimizer step ``step`` (0-based): a linear warm-up to ``lr`` over ``warmup_steps``
    (reaching it at step ``warmup_steps``), then by ``schedule``:

    - ``cosine``: half a cosine from ``lr`` down to ``min_lr`` at ``total_steps``;
    - ``constant``: ``lr``;
    - ``inverse_sqrt``: fairseq's ``inverse_sqrt`` (Vaswani et al. 2017, section 5.3), ``lr * sqrt(w / step)``
      with ``w = max(warmup_steps, 1)``: ``lr`` at the end of the warm-up, half of it at ``4 w``; floored at
      ``min_lr`` and independent of ``total_steps``, so a run can be lengthened without changing its past.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    if schedule == "inverse_sqrt":
        w = max(warmup_steps, 1)
        return max(min_lr, lr * math.sqrt(w / max(step, w)))
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use cosine, constant or inverse_sqrt")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
