"""``tansuo train``: a recipe to a run folder and its best bundle, in one process or several (torchrun)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

if TYPE_CHECKING:
    from tansuo.train.launch import LaunchConfig

from tansuo.cli._app import (
    DataDirOption,
    DataOption,
    SetOption,
    console,
    err_console,
    metrics_table,
    print_class_report,
    setup_logging,
)


def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/digits-vit.yaml")],
    set_: SetOption = None,
    data: DataOption = None,
    data_dir: DataDirOption = None,
    out: Annotated[
        str | None, typer.Option("--out", help="run folder; same as --set train.out_dir=DIR")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run folder's last checkpoint")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            help="train on N processes of this machine through torchrun (DDP, or FSDP with "
            "--set train.parallel=fsdp); one per GPU on CUDA",
            rich_help_panel="Several processes",
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option("--nnodes", help="machines taking part", rich_help_panel="Several processes")
    ] = 1,
    node_rank: Annotated[
        int,
        typer.Option(
            "--node-rank", help="this machine's number, 0 to nnodes-1", rich_help_panel="Several processes"
        ),
    ] = 0,
    master_addr: Annotated[
        str,
        typer.Option("--master-addr", help="address of machine 0", rich_help_panel="Several processes"),
    ] = "127.0.0.1",
    master_port: Annotated[
        int | None,
        typer.Option(
            "--master-port",
            help="a free port on machine 0 (one machine: chosen for you)",
            rich_help_panel="Several processes",
        ),
    ] = None,
) -> None:
    """Train a model as a recipe says; write checkpoints, a metrics log and the best bundle.

    With --nproc-per-node N it runs N processes through torchrun's launcher (the same as
    `torchrun --nproc-per-node N -m tansuo train RECIPE ...`); the global batch is train.batch_size x
    processes x train.grad_accum, and rank 0 alone writes the run folder.
    """
    from tansuo.train.distributed import env_rank
    from tansuo.train.launch import LaunchConfig

    main = env_rank() == 0  # under torchrun only rank 0 prints
    setup_logging(verbose if main else False)
    if not main:
        logging.getLogger("tansuo").setLevel(logging.WARNING)
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
    rec, data_cfg = load_recipe(recipe, sets, data_dir)  # checked here once, before any process starts
    out_dir = Path(rec.train.out_dir)
    if nproc_per_node is not None or nnodes != 1:
        launch = LaunchConfig(
            1 if nproc_per_node is None else nproc_per_node, nnodes, node_rank, master_addr, master_port
        )
        if launch.world_size > 1:  # each process runs this command again, without the launcher's flags
            from tansuo.device import resolve_device

            launch.check_device(resolve_device(rec.train.device))
            worker = ["train", str(recipe), *(a for s in set_ or [] for a in ("--set", s))]
            for flag, value in (
                ("--data", data),
                ("--data-dir", data_dir),
                ("--out", out),
                ("--device", device),
            ):
                if value is not None:
                    worker += [flag, value]
            worker += [
                f for f, on in (("--resume", resume), ("--quiet", quiet), ("--verbose", verbose)) if on
            ]
            _launch(launch, worker, rec.train.parallel)
            return

    def built(run: RunSetup) -> None:
        if not main:
            return
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
        fitting.append(trainer)
        if not main:
            return
        console.print(
            f"device {trainer.device} · {trainer.plan.total_steps} steps"
            f" · evaluate every {trainer.plan.eval_every}"
        )
        world = trainer.parallel.world
        if world > 1:
            console.print(
                f"{trainer.parallel.mode} on {world} processes · global batch {trainer.global_batch} = "
                f"{rec.train.batch_size} per rank x {world} ranks x {rec.train.grad_accum} accumulation"
            )

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
    if not main:
        return
    result, task = done.result, done.task
    console.print(metrics_table(f"best at step {result.get('step')}", result))
    held = result.get(task.heldout_split, {})
    print_class_report(task.heldout_split, held)
    headline = held.get(task.default_metric)
    if headline is not None:
        console.print(f"{task.heldout_split} {task.default_metric}: [bold]{headline:.4f}[/]")
    console.print(f"bundle written to [bold]{result['bundle']}[/]")


def _launch(config: LaunchConfig, worker: list[str], parallel: str) -> None:
    """Run ``tansuo WORKER`` in the launched processes; a failed rank ends this command with its exit code."""
    from tansuo.train.launch import WorkerFailed, launch

    console.print(
        f"launching {config.world_size} processes ({config.nproc_per_node} here, {config.nnodes} "
        f"{'machine' if config.nnodes == 1 else 'machines'}) · train.parallel {parallel}"
    )
    try:
        launch(config, worker)
    except WorkerFailed as e:
        err_console.print(
            f"[bold red]error:[/] {escape(str(e))}. The run was stopped; continue it from its last "
            "checkpoint with the same command plus --resume",
            highlight=False,
        )
        raise typer.Exit(e.exitcode if e.exitcode > 0 else 1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; continue with the same command plus --resume", highlight=False)
        raise typer.Exit(130) from None
