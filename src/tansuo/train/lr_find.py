"""The learning-rate range test (``tansuo lr-find``): which learning rate to train a recipe with.

Smith 2017, "Cyclical Learning Rates for Training Neural Networks" (section 3.3), as fastai's ``lr_find``
and PyTorch Lightning's ``Tuner.lr_find`` run it: train the recipe's freshly built model for ``num_steps``
optimizer steps while the learning rate grows exponentially from ``min_lr`` to ``max_lr``, record the loss
of each step, smooth it with a bias-corrected exponential moving average (weight ``beta`` on the past), and
stop early once the smoothed loss exceeds ``diverge`` times its lowest value (or is not finite).

The suggestion is the learning rate where the smoothed loss falls fastest (steepest descent: the most
negative slope against log lr, as Lightning suggests), searched between the first ``skip_start`` of the
steps and the lowest loss; a curve too short for a slope gets the learning rate of the lowest loss divided
by 10 (fastai's ``minimum`` suggestion). The result says which. Nothing is written to disk: the model,
optimizer and prepared data live in memory and in a temporary folder, and only the plot
(:func:`plot_lr_find`, matplotlib, imported there) is saved.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tansuo.atomic import atomic_write
from tansuo.device import autocast_dtype, autocast_to, resolve_device
from tansuo.errors import RecipeError, TansuoError
from tansuo.recipe import Recipe
from tansuo.train.optim import build_optimizer
from tansuo.train.setup import build_run

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    """One range test: the learning rates tried, their losses, and the suggestion."""

    lrs: list[float]  # the learning rate of each step taken
    losses: list[float]  # each step's loss
    smoothed: list[float]  # the bias-corrected moving average of ``losses``
    suggestion: float
    method: str  # "steepest descent" or "minimum / 10"
    min_lr: float
    max_lr: float
    num_steps: int  # steps planned; ``len(lrs)`` were taken
    stopped: str | None  # why the sweep ended before ``num_steps`` (divergence), or None


def lr_sweep(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` learning rates growing exponentially from ``min_lr`` to ``max_lr`` (both included).

    Raises:
        RecipeError: The range is empty or not positive, or fewer than 2 steps are asked for.
    """
    if not 0 < min_lr < max_lr:
        raise RecipeError(f"lr-find: need 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}")
    if num_steps < 2:
        raise RecipeError(f"lr-find: --steps must be at least 2, got {num_steps}")
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def smooth_losses(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction: ``avg = beta * avg + (1 - beta) * loss``, reported
    as ``avg / (1 - beta ** (i + 1))`` so the first values are not pulled towards zero."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float], skip_start: float = 0.1) -> tuple[float, str]:
    """The learning rate of steepest descent of ``smoothed`` against log lr, between the first
    ``skip_start`` of the points and the lowest loss; with fewer than 3 points there, the lowest loss's
    learning rate / 10. Returns the learning rate and which of the two rules gave it."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    first = min(int(skip_start * len(smoothed)), max(0, lowest - 2))
    if lowest - first + 1 < 3:
        return max(lrs[lowest] / 10, lrs[0]), "minimum / 10"
    logs = [math.log(lr) for lr in lrs]
    # central differences inside the window, one-sided at its ends (numpy.gradient's rule)
    slopes = []
    for i in range(first, lowest + 1):
        lo, hi = max(first, i - 1), min(lowest, i + 1)
        slopes.append((smoothed[hi] - smoothed[lo]) / (logs[hi] - logs[lo]))
    steepest = first + min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[steepest], "steepest descent"


def find_lr(
    rec: Recipe,
    data_cfg: Any,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    data_root: str | Path | None = None,
) -> LRFindResult:
    """Run the range test on a validated recipe's task and freshly built model (``build_run``: the same
    seed, data, model, ``init_from`` and LoRA as ``tansuo train``), with the recipe's batch size, gradient
    accumulation, AdamW settings, clipping and precision; the schedule, evaluation and checkpoints are left
    out. ``data_root`` holds the task's prepared files (default: a temporary folder, removed after).

    Raises:
        RecipeError: A bad range, ``beta`` or ``diverge``, or a recipe that does not build.
        TansuoError: The loss is not finite at the very first step.
    """
    lrs = lr_sweep(min_lr, max_lr, num_steps)
    if not 0 <= beta < 1:
        raise RecipeError(f"lr-find: the smoothing beta must lie in [0, 1), got {beta}")
    if diverge <= 1:
        raise RecipeError(f"lr-find: the divergence factor must exceed 1, got {diverge}")
    with tempfile.TemporaryDirectory(prefix="tansuo-lr-find-") as tmp:
        run = build_run(rec, data_cfg, Path(tmp if data_root is None else data_root))
        return _sweep(run.task, run.model, rec, lrs, beta, diverge)


def _sweep(
    task: Any, model: torch.nn.Module, rec: Recipe, lrs: list[float], beta: float, diverge: float
) -> LRFindResult:
    cfg = rec.train
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model.to(device).train()
    optimizer = build_optimizer(
        model,
        lrs[0],
        cfg.weight_decay,
        (cfg.beta1, cfg.beta2),
        device,
        layer_decay=cfg.layer_decay,
        impl=cfg.optimizer_impl,
        kind=cfg.optimizer,
        momentum=cfg.momentum,
        lr_scales=cfg.lr_scales,
    )
    dtype = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = task.train_batches(cfg.batch_size, start=0)
    taken: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stopped = None
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with autocast_to(device, dtype):
                loss = task.loss(model, batch)
            step_loss += loss.item() / cfg.grad_accum
            scaler.scale(loss / cfg.grad_accum).backward()
        if not math.isfinite(step_loss):
            if not losses:
                raise TansuoError(f"lr-find: the loss is {step_loss} at the first step (lr {lr:.3g})")
            stopped = f"the loss became {step_loss} at lr {lr:.3g}"
            break
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        taken.append(lr)
        losses.append(step_loss)
        smoothed = smooth_losses(losses, beta)
        if len(smoothed) > 1 and smoothed[-1] > diverge * min(smoothed):
            stopped = f"the smoothed loss rose above {diverge:g}x its lowest at lr {lr:.3g}"
            break
    if stopped:
        log.info("lr-find stopped after %d of %d steps: %s", len(taken), len(lrs), stopped)
    suggestion, method = suggest_lr(taken, smoothed)
    return LRFindResult(taken, losses, smoothed, suggestion, method, lrs[0], lrs[-1], len(lrs), stopped)


def plot_lr_find(result: LRFindResult, path: str | Path) -> None:
    """Save the loss against the learning rate (log scale), raw and smoothed, with the suggestion marked,
    as a PNG at ``path`` (written atomically). Imports matplotlib (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
        ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
        ax.axvline(
            result.suggestion,
            color="C3",
            linestyle="--",
            label=f"suggestion {result.suggestion:.3g} ({result.method})",
        )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test")
        # the divergent tail would flatten the interesting part: cap the view at 1.5x the first loss
        low = min(min(result.smoothed), min(result.losses))
        high = max(result.smoothed[0], min(result.smoothed)) * 1.5
        if math.isfinite(low) and math.isfinite(high) and high > low:
            ax.set_ylim(low - 0.05 * (high - low), high)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
