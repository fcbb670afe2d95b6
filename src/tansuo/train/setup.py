"""Training a recipe: seeds, the task from its data, the model, its initial weights, the trainer, the fit.

:func:`train_recipe` is the one sequence ``tansuo train``, explore's trials and the benchmarks share, so that
a trial or a benchmark trains exactly what ``tansuo train`` would from the same recipe; :func:`build_run` is
its first half (everything before the :class:`~tansuo.train.trainer.Trainer`). The recipe comes validated,
from :func:`tansuo.recipe.load_recipe` (a file, ``--set`` overrides, ``--data-dir``) or
:func:`tansuo.recipe.validate_recipe` (a mapping).
"""

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tansuo.adapters import LoRAConfig, LoRAError, freeze_base_, lora_, origin_of
from tansuo.device import resolve_device, seed_everything
from tansuo.errors import RecipeError
from tansuo.models import create_model
from tansuo.models.init import InitReport, load_initial_weights
from tansuo.recipe import Recipe
from tansuo.tasks import get_task
from tansuo.tasks.base import Task
from tansuo.train.distributed import main_first, process_group
from tansuo.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    task: Task
    model: nn.Module
    init: InitReport | None  # what ``model.init_from`` loaded; None without it


def build_run(rec: Recipe, data_cfg: Any, data_root: Path, task: Task | None = None) -> RunSetup:
    """Seeds every generator with ``rec.seed``, builds the task from ``data_cfg`` (its prepared files under
    ``data_root``) unless ``task`` is given (the membership audit's reference models train a bundle's task on
    part of its data), the model from the registry (the task's sizes, e.g. vocabulary and classes, then the
    recipe's overrides), loads ``model.init_from`` when the recipe names one, and with ``train.lora`` adds
    the adapters and freezes the rest.

    Raises:
        RecipeError: The overrides do not build the model (an unknown field, an invalid combination).
    """
    seed_everything(rec.seed)
    if task is None:
        task = get_task(rec.task).from_recipe(data_cfg, rec.seed, data_root)
    try:
        model = create_model(rec.model.name, **{**task.model_overrides(), **rec.model.overrides})
    except (ValueError, TypeError) as e:
        raise RecipeError(f"invalid recipe:\n  model: {e}") from None
    init = load_initial_weights(model, rec.model.init_from) if rec.model.init_from else None
    if rec.train.lora is not None:
        _add_lora(model, rec)
    if rec.train.trainable is not None:
        _freeze_but(model, rec.train.trainable, lora=rec.train.lora is not None)
    return RunSetup(task, model, init)


def _freeze_but(model: nn.Module, patterns: list[str], lora: bool) -> None:
    """``train.trainable``: only the parameters matching a pattern train (BitFit: ``*.bias``, ``head.*``)."""
    if lora:
        raise RecipeError(
            "invalid recipe:\n  train.trainable does not combine with train.lora (which freezes all but its "
            "adapters and modules_to_save); give one of them"
        )
    names = [n for n, _ in model.named_parameters()]
    unused = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unused:
        raise RecipeError(
            f"invalid recipe:\n  train.trainable: {', '.join(unused)} matches no parameter of "
            f"the model (its parameters are named like {', '.join(names[:3])} ...)"
        )
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("train.trainable: %d of %d parameters train (%.2f%%)", trainable, total, 100 * trainable / total)


def _add_lora(model: nn.Module, rec: Recipe) -> None:
    """``train.lora``: adapters on the loaded weights, everything else frozen (before the optimizer exists,
    so it holds only what trains). The base the run started from goes into the LoRA record, so the bundle's
    ``adapter/`` uses the Hugging Face names of an imported model."""
    settings = rec.train.lora
    config = LoRAConfig(
        r=settings.r,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=settings.targets if isinstance(settings.targets, str) else tuple(settings.targets),
        modules_to_save=tuple(settings.modules_to_save),
    )
    try:
        names = lora_(model, config, base=origin_of(rec.model.init_from))
        trainable = freeze_base_(model, config.modules_to_save)
    except LoRAError as e:
        raise RecipeError(f"invalid recipe:\n  train.lora: {e}") from None
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA on %d layers: %d of %d parameters train (%.2f%%)",
        len(names),
        trainable,
        total,
        100 * trainable / total,
    )


@dataclass
class TrainResult:
    """What :func:`train_recipe` returns."""

    result: dict[str, Any]  # Trainer.fit's: the best bundle's metrics by split, "step" and "bundle"
    task: Task
    model: nn.Module
    init: InitReport | None  # what ``model.init_from`` loaded; None without it
    trainer: Trainer  # after the fit: its device, plan, step and run folder

    @property
    def bundle(self) -> Path:
        """The best bundle's folder."""
        return Path(self.result["bundle"])


def train_recipe(
    rec: Recipe,
    data_cfg: Any,
    *,
    data_root: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_built: Callable[[RunSetup], None] | None = None,
    on_start: Callable[[Trainer], None] | None = None,
) -> TrainResult:
    """Train a validated recipe as ``tansuo train`` does: :func:`build_run`, a
    :class:`~tansuo.train.trainer.Trainer` writing into ``rec.train.out_dir`` (checkpoint, metrics.jsonl,
    the best bundle), then its ``fit``.

    In a process started by torchrun (``WORLD_SIZE`` > 1) it joins the process group first and leaves it at
    the end; rank 0 prepares the data before the other ranks build their task from the same files. Rank 0
    returns the best bundle's metrics, the other ranks only ``step`` and ``bundle``.

    Args:
        rec: the validated recipe (:func:`tansuo.recipe.load_recipe`).
        data_cfg: the task's validated data config (the second half of what ``load_recipe`` returns).
        data_root: where the task writes its prepared data files (default: ``<out_dir>/data``).
        resume: continue from the run folder's last checkpoint.
        progress: show the trainer's progress bar.
        on_built: called with the task, model and init report once they exist, before the trainer is made.
        on_start: called with the trainer just before ``fit`` (to show its device and plan, or to keep it
            and tell where an interrupted run stopped: ``trainer.step``, ``trainer.checkpoint_path``).

    Raises:
        RecipeError: The overrides do not build the model (from :func:`build_run`), or the recipe's
            ``train.best_metric`` is not one the task computes.
        TrainingDiverged: The loss became NaN or infinite.
    """
    root = Path(rec.train.out_dir) / "data" if data_root is None else Path(data_root)
    with process_group(resolve_device(rec.train.device), rec.train.dist_timeout):
        with main_first():
            run = build_run(rec, data_cfg, root)
        if on_built is not None:
            on_built(run)
        trainer = Trainer(
            run.task, run.model, rec.train, seed=rec.seed, recipe=rec.model_dump(), progress=progress
        )
        if on_start is not None:
            on_start(trainer)
        result = trainer.fit(resume=resume)
    return TrainResult(result, run.task, run.model, run.init, trainer)
