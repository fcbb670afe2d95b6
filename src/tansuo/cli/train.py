"""``tansuo train``: a recipe to a run folder and its best bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    console,
    err_console,
    metrics_table,
    print_class_report,
    setup_logging,
)


def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/digits-vit.yaml")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a recipe field: --set train.lr=3e-4 (repeatable)"),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="data file; same as --set data.path=PATH")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", help="folder in which the recipe's relative data file names are looked up"
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="run folder; same as --set train.out_dir=DIR")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run folder's last checkpoint")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a model as a recipe says; write checkpoints, a metrics log and the best bundle."""
    setup_logging(verbose)
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import RunSetup, train_recipe
    from tansuo.train.trainer import Trainer

    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={json.dumps(data)}")
    if out is not None:
        sets.append(f"train.out_dir={json.dumps(out)}")
    if device is not None:
        sets.append(f"train.device={device}")
    rec, data_cfg = load_recipe(recipe, sets, data_dir)
    out_dir = Path(rec.train.out_dir)

    def built(run: RunSetup) -> None:
        report = run.init
        if report is not None:
            console.print(
                f"initialised from {rec.model.init_from} ({report.kind}): {len(report.loaded)} tensors "
                f"loaded, {len(report.skipped)} skipped, {len(report.missing)} left at their fresh init",
                markup=False,
                highlight=False,
            )
        console.print(
            f"[bold]{rec.task}[/] · model [bold]{rec.model.name}[/] ({run.model.num_params():,} parameters) "
            f"· run folder {out_dir}"
        )

    fitting: list[Trainer] = []  # the trainer once its fit begins: where an interrupt stopped it

    def start(trainer: Trainer) -> None:
        console.print(
            f"device {trainer.device} · {trainer.plan.total_steps} steps"
            f" · evaluate every {trainer.plan.eval_every}"
        )
        fitting.append(trainer)

    try:
        done = train_recipe(rec, data_cfg, resume=resume, progress=not quiet, on_built=built, on_start=start)
    except KeyboardInterrupt:
        if not fitting:
            raise
        trainer = fitting[0]
        saved = trainer.checkpoint_path
        where = f"the last checkpoint is {saved}" if saved.exists() else "no checkpoint was written yet"
        err_console.print(
            f"interrupted at step {trainer.step}; {where}. Continue with the same command plus --resume",
            highlight=False,
        )
        raise typer.Exit(130) from None
    result, task = done.result, done.task
    console.print(metrics_table(f"best at step {result.get('step')}", result))
    held = result.get(task.heldout_split, {})
    print_class_report(task.heldout_split, held)
    headline = held.get(task.default_metric)
    if headline is not None:
        console.print(f"{task.heldout_split} {task.default_metric}: [bold]{headline:.4f}[/]")
    console.print(f"bundle written to [bold]{result['bundle']}[/]")
