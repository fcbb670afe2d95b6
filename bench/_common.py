"""What the benchmark scripts share: their ``main()`` (:func:`bench_main`; :func:`training_bench_main` for
those that train a recipe), the flags several of them take, logging, usage errors, the check that the CPUs
are idle, the header lines and writing the figures.

A script is ``parse_args(argv) -> args``, ``run(args) -> figures`` (measures; may print as it goes) and
optionally ``report(figures, args)`` (prints the result), joined by::

    def main(argv=None):
        bench_main(argv, parse_args, run, report, figures=lambda r, args: args.json)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from tansuo.recipe import Recipe
    from tansuo.train.trainer import Trainer

DEVICE_HELP = "auto (CUDA if present), cpu, cuda (default: auto)"


def fail(message: str) -> NoReturn:
    """Print ``message`` on stderr and exit with code 2 (bad input the user can fix)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def busy_note(sample_s: float = 0.5) -> tuple[float, str]:
    """CPUs that other processes keep busy (from /proc/stat; else the load average), and a note."""
    cpus = os.cpu_count() or 1

    def times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = times()
        time.sleep(sample_s)
        total1, idle1 = times()
        busy = cpus * (1 - (idle1 - idle0) / max(1, total1 - total0))
        note = f"{busy:.1f} of {cpus} CPUs busy before the start"
    except (OSError, ValueError, IndexError):
        busy = os.getloadavg()[0]
        note = f"load average {busy:.1f} on {cpus} CPUs"
    if busy > 0.25:
        note += " (other processes are running: CPU timings will be low and noisy)"
    return busy, note


def header(*parts: str) -> str:
    """``torch VERSION · N threads`` followed by ``parts``, joined by `` · ``: the first line of a report."""
    import torch

    return " · ".join([f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", *parts])


def training_start(
    rec: Recipe, out_dir: Path, began: dict[str, float], batch: str = ""
) -> Callable[[Trainer], None]:
    """The ``on_start`` hook of a benchmark that trains a recipe (:func:`tansuo.train.setup.train_recipe`):
    samples the busy CPUs (``began["busy"]``), prints the header and the run's plan (``batch`` follows the
    batch size, e.g. `` x 64 tokens``) and notes when the fit begins (``began["fit"]``)."""

    def start(trainer: Trainer) -> None:
        began["busy"], note = busy_note()
        print(
            f"{header(f'device {trainer.device}', note)}\n"
            f"{rec.model.name}: {trainer.model.num_params():,} parameters · {trainer.plan.total_steps} steps "
            f"of batch {rec.train.batch_size}{batch} · evaluate every {trainer.plan.eval_every} "
            f"· run folder {out_dir}",
            flush=True,
        )
        began["fit"] = time.perf_counter()

    return start


def pick_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when a number is given; torch's own choice otherwise."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ flags
def add_device(p: argparse.ArgumentParser) -> None:
    """``--device``: auto (CUDA if present), cpu or cuda."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_threads(p: argparse.ArgumentParser, help: str | None = None, default: int | None = None) -> None:
    """``--threads N``: torch threads (what they are used for is the script's to say in ``help``)."""
    p.add_argument("--threads", type=int, default=default, help=help)


def add_json(p: argparse.ArgumentParser, help: str, default: Path | None = None) -> None:
    """``--json PATH``: where the figures go."""
    p.add_argument("--json", type=Path, default=default, help=help)


def add_max_steps(p: argparse.ArgumentParser, help: str) -> None:
    """``--max-steps N``: cut a training recipe short (smoke tests); see :func:`check_positive`."""
    p.add_argument("--max-steps", type=int, default=None, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--progress``: the trainer's progress bar."""
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")


def add_sets(p: argparse.ArgumentParser, more_help: str = "") -> None:
    """``--set FIELD=VALUE`` (repeatable, into ``args.sets``): recipe overrides, as ``tansuo train`` takes
    them; ``more_help`` is appended to the flag's help."""
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field, as with `tansuo train --set` (repeatable)" + more_help,
    )


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit with a usage error when one of the named flags (attribute names) was given as zero or less."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")


# ------------------------------------------------------------------------------------------------ output
def setup_logging() -> None:
    """The library's INFO messages (the trainer's evaluations) on stderr, other libraries' warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tansuo").setLevel(logging.INFO)


def write_figures(path: Path, figures: dict[str, Any], *, atomic: bool = False) -> None:
    """Write ``figures`` as indented JSON, creating the folder; ``atomic``: as tansuo writes its own JSON
    files (a temporary name renamed over the old file, keys sorted)."""
    if atomic:
        from tansuo.atomic import atomic_write_json

        atomic_write_json(path, figures)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def bench_main(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any], argparse.Namespace], None] | None = None,
    *,
    figures: Callable[[dict[str, Any], argparse.Namespace], Path | None] | None = None,
    atomic: bool = False,
    written: str | None = "figures written to {}",
    library_logs: bool = False,
) -> dict[str, Any]:
    """A benchmark's ``main``: parse the flags, run it, write its figures, report them.

    Args:
        argv: the command line (None: ``sys.argv[1:]``).
        parse_args: ``argv`` -> the flags.
        run: measures; returns the figures. A :class:`~tansuo.errors.TansuoError` it raises (bad data, a
            missing device) becomes ``error: ...`` on stderr and exit code 2.
        report: prints the figures (None: ``run`` printed them already).
        figures: where the figures go as JSON (None, or a callback returning None: nowhere).
        atomic: write them as tansuo writes its JSON files (see :func:`write_figures`).
        written: printed after the report with the path (``{}``) when figures were written; None: nothing.
        library_logs: show tansuo's INFO log messages (see :func:`setup_logging`).
    """
    from tansuo.errors import TansuoError

    args = parse_args(argv)
    if library_logs:
        setup_logging()
    try:
        r = run(args)
    except TansuoError as e:
        fail(str(e))
    path = None if figures is None else figures(r, args)
    if path is not None:
        write_figures(path, r, atomic=atomic)
    if report is not None:
        report(r, args)
    if path is not None and written is not None:
        print(written.format(path))
    return r


def training_bench_main(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any], argparse.Namespace], None],
) -> dict[str, Any]:
    """:func:`bench_main` for a benchmark that trains a recipe: tansuo's log messages shown, the figures
    written to ``<out_dir>/bench.json`` (``out_dir`` from the figures) as tansuo writes its JSON files."""
    return bench_main(
        argv,
        parse_args,
        run,
        report,
        figures=lambda r, _: Path(r["out_dir"]) / "bench.json",
        atomic=True,
        library_logs=True,
    )
