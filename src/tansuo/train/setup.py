"""What precedes training a recipe: seeds, the task from its data, the model, its initial weights.

One function, :func:`build_run`, shared by ``tansuo train``, explore's trials and the benchmarks, so that a
trial or a benchmark trains exactly what ``tansuo train`` would from the same recipe.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tansuo.errors import RecipeError
from tansuo.models import create_model
from tansuo.models.init import InitReport, load_initial_weights
from tansuo.recipe import Recipe
from tansuo.tasks import TASKS
from tansuo.tasks.base import Task
from tansuo.device import seed_everything


@dataclass
class RunSetup:
    task: Task
    model: nn.Module
    init: InitReport | None  # what ``model.init_from`` loaded; None without it


def build_run(rec: Recipe, data_cfg: Any, data_root: Path) -> RunSetup:
    """Seeds every generator with ``rec.seed``, builds the task from ``data_cfg`` (its prepared files under
    ``data_root``), the model from the registry (the task's sizes, e.g. vocabulary and classes, then the
    recipe's overrides) and loads ``model.init_from`` when the recipe names one.

    Raises:
        RecipeError: The overrides do not build the model (an unknown field, an invalid combination).
    """
    seed_everything(rec.seed)
    task = TASKS[rec.task].from_recipe(data_cfg, rec.seed, data_root)
    try:
        model = create_model(rec.model.name, **{**task.model_overrides(), **rec.model.overrides})
    except (ValueError, TypeError) as e:
        raise RecipeError(f"invalid recipe:\n  model: {e}") from None
    init = load_initial_weights(model, rec.model.init_from) if rec.model.init_from else None
    return RunSetup(task, model, init)
