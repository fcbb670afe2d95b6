"""``tansuo explore`` and ``tansuo report``: the search over models, sizes, training and compression."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from tansuo.cli._app import (
    console,
    err_console,
    recipe_sets,
    setup_logging,
)


def _finish_study(study: Any, spec: Any, storage: str, *, copy: bool = True) -> None:
    """Write the study's reports, copy the pick to best/ and print the Pareto front and recommendation."""
    from tansuo.explore.report import TABLE, TITLES, describe, fmt, pareto_rows
    from tansuo.explore.results import finish_study

    results, paths, best = finish_study(study, spec, storage, copy=copy)
    c = results["counts"]
    measured = sum(r["status"] == "ok" for r in results["variants"])
    console.print(
        f"study {results['study']}: {c['complete']} trials complete, {c['fail']} failed, {c['running']} "
        f"running; {measured} variants measured",
        highlight=False,
        markup=False,
    )
    table = Table(title="Pareto front (feasible variants)", box=None, pad_edge=False)
    table.add_column("id")
    table.add_column("model", overflow="fold", ratio=1)
    table.add_column("variant")
    for n in TABLE[:5]:
        table.add_column(TITLES[n], justify="right", no_wrap=True)
    for r in pareto_rows(results):
        mark = " *" if r["id"] == results["recommended"] else ""
        q = results["quality_direction"]
        cells = [
            r["id"] + mark,
            describe(r),
            r["variant"],
            *(fmt(n, r["values"].get(n), q) for n in TABLE[:5]),
        ]
        table.add_row(*(escape(x) for x in cells))
    console.print(table)
    if results["recommended"] is None:
        console.print(f"no recommendation: {results['why']}", highlight=False, markup=False)
    else:
        console.print(
            f"recommended (*): {results['recommended']}: {results['why']}", highlight=False, markup=False
        )
        if best is not None:
            console.print(f"bundle copied to [bold]{escape(str(best))}[/]", highlight=False)
    console.print(f"report: {paths['html']} (also {paths['md'].name}, {paths['json'].name})", highlight=False)


def explore(
    recipe: Annotated[
        Path, typer.Argument(help="a recipe with an explore: section, e.g. recipes/quickstart.yaml")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="override a recipe field, explore.* included: --set explore.budget.trials=4"
        ),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="data file; same as --set data.path=PATH")
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="folder in which relative data file names are looked up")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="study folder; same as --set explore.study=DIR")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: SQLite in the folder)"
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="continue the study: finished trials are kept, cut-short ones rerun"),
    ] = False,
    worker: Annotated[
        bool,
        typer.Option("--worker", help="join the study in --storage (create it if absent) and run trials"),
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Search models x sizes x training x compression; report the Pareto front and the bundle to ship."""
    setup_logging(verbose)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tansuo.explore.progress import StudyProgress, quiet_optuna, trial_text
    from tansuo.explore.schema import load_explore_recipe
    from tansuo.explore.search import budget_used, open_study, redact, run_study
    from tansuo.recipe import apply_overrides, read_recipe_file

    quiet_optuna()
    if not verbose:  # the explore progress display replaces the trainer's and compressor's per-step lines
        logging.getLogger("tansuo").setLevel(logging.WARNING)
        logging.getLogger("tansuo.explore").setLevel(logging.INFO)
    sets = recipe_sets(set_, data, device)
    if out is not None:
        sets.append(f"explore.study={json.dumps(str(out))}")
    spec = load_explore_recipe(recipe, sets, data_dir)
    raw = apply_overrides(read_recipe_file(recipe), sets)
    study = open_study(spec, raw, storage=storage, resume=resume, worker=worker)
    label = redact(storage) if storage else str(spec.study_dir / "optuna.db")
    objectives = spec.explore.objectives
    tracker = StudyProgress(spec)
    tracker.add_finished(study)
    used, waiting = budget_used(study)
    total = spec.explore.budget.trials
    if spec.sampler == "grid":
        total = used + waiting if total is None else min(total, used + waiting)
    console.print(
        f"study [bold]{escape(study.study_name)}[/] in {escape(label)} · sampler {spec.sampler} · objectives "
        f"{', '.join(objectives)} · {len(spec.explore.candidates)} candidates x {len(spec.explore.variants)} "
        f"variants · budget {total if total is not None else '-'} trials"
        + (f", {spec.explore.budget.minutes:g} min" if spec.explore.budget.minutes else "")
        + (f" · {used} trials already done" if used else ""),
        highlight=False,
    )

    progress = Progress(
        TextColumn("explore"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[best]}"),
        TextColumn("{task.fields[now]}"),
        console=err_console,
        disable=quiet,
    )

    with progress:
        job = progress.add_task("explore", total=total, completed=used, best=tracker.headline(), now="")

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                progress.update(job, now=trial_text(info))
                return
            if kind == "done":
                tracker.add(info["record"])
            progress.update(job, advance=1, best=tracker.headline(), now="")
            if kind == "failed":
                err_console.print(f"trial {info['number']} failed: {escape(info['reason'])}", highlight=False)

        try:
            ran = run_study(spec, study, on_event=on_event)
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(
                "interrupted: finished trials are stored; the cut-short one runs again on "
                f"`tansuo explore {recipe} --resume` (with the same options)",
                highlight=False,
            )
            raise typer.Exit(130) from None
    if worker:
        console.print(
            f"this worker ran {ran} trials; `tansuo report {spec.study_dir}` writes the report",
            highlight=False,
        )
        return
    _finish_study(study, spec, label)


def report(
    study_dir: Annotated[Path, typer.Argument(help="a study folder written by tansuo explore")],
    storage: Annotated[
        str | None, typer.Option(help="the storage URL, when the study is not in the folder's SQLite file")
    ] = None,
) -> None:
    """Write a study's report.html, report.md and results.json again; copy the recommended bundle to best/."""
    setup_logging(False)
    from tansuo.explore.progress import quiet_optuna
    from tansuo.explore.schema import load_explore
    from tansuo.explore.search import load_study_folder, redact

    quiet_optuna()
    study, info = load_study_folder(study_dir, storage)
    spec = load_explore(info["recipe"], study_dir)
    spec.study_dir = Path(study_dir)
    _finish_study(study, spec, redact(storage) if storage else info["storage"])
