"""``tansuo lr-find``: a learning-rate range test on a recipe, a plot and a suggested ``train.lr``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import DataDirOption, DataOption, SetOption, console, recipe_sets, setup_logging


def lr_find(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/digits-vit.yaml")],
    set_: SetOption = None,
    data: DataOption = None,
    data_dir: DataDirOption = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda")] = None,
    min_lr: Annotated[float, typer.Option("--min-lr", help="first learning rate of the sweep")] = 1e-7,
    max_lr: Annotated[float, typer.Option("--max-lr", help="last learning rate of the sweep")] = 10.0,
    steps: Annotated[int, typer.Option("--steps", help="optimizer steps of the sweep")] = 100,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="PNG to write; default: lr-find.png in the recipe's train.out_dir"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Find a learning rate: train the recipe's model for --steps steps while the learning rate grows
    exponentially from --min-lr to --max-lr, stop when the loss diverges, plot the smoothed loss against
    the learning rate and suggest the one where the loss falls fastest. Nothing but the plot is written."""
    setup_logging(verbose)
    from tansuo.recipe import load_recipe
    from tansuo.train.lr_find import find_lr, plot_lr_find

    rec, data_cfg = load_recipe(recipe, recipe_sets(set_, data, device), data_dir)
    console.print(
        f"[bold]{rec.task}[/] · model [bold]{rec.model.name}[/] · lr {min_lr:.3g} to {max_lr:.3g} "
        f"over {steps} steps · batch {rec.train.batch_size}"
    )
    result = find_lr(rec, data_cfg, min_lr=min_lr, max_lr=max_lr, num_steps=steps)
    path = plot if plot is not None else Path(rec.train.out_dir) / "lr-find.png"
    plot_lr_find(result, path)
    ran = f"{len(result.lrs)} of {result.num_steps} steps"
    if result.stopped:
        ran += f" (stopped: {result.stopped})"
    console.print(f"ran {ran}; lowest smoothed loss {min(result.smoothed):.4f}", highlight=False)
    console.print(f"plot written to [bold]{path}[/]")
    console.print(f"suggested learning rate: [bold]{result.suggestion:.3g}[/] ({result.method})")
    console.print(f"train with: --set train.lr={result.suggestion:.3g}", markup=False, highlight=False)
