"""What every command shares: the Typer app, the consoles, logging, metric tables, ``KEY=VALUE`` options."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tansuo.errors import TansuoError

#: ``--compile`` of the decoding commands (generate, chat)
CompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="decode with a torch.compile'd step: faster per token after a first compile of tens of "
        "seconds to minutes (cached on disk for later runs)",
    ),
]

#: the options of the commands that take a recipe (train, lr-find)
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a recipe field: --set train.lr=3e-4 (repeatable)"),
]
DataOption = Annotated[str | None, typer.Option("--data", help="data file; same as --set data.path=PATH")]
DataDirOption = Annotated[
    str | None,
    typer.Option("--data-dir", help="folder in which the recipe's relative data file names are looked up"),
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tansuo (探索): measure which Transformer to use, train it, and ship it.",
)
console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("tansuo").setLevel(logging.DEBUG if verbose else logging.INFO)


def metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("split")
    names = sorted(
        {
            k
            for v in metrics.values()
            if isinstance(v, dict)
            for k, x in v.items()
            if isinstance(x, int | float)
        }
    )
    for name in names:
        table.add_column(name, justify="right")
    for split, values in metrics.items():
        if isinstance(values, dict):
            table.add_row(split, *(f"{values[n]:.4f}" if n in values else "" for n in names))
    return table


def print_class_report(split: str, metrics: dict[str, Any]) -> None:
    """Per-class precision/recall/F1 and the confusion matrix of a classification split, if present."""
    per_class, confusion = metrics.get("per_class"), metrics.get("confusion_matrix")
    if not isinstance(per_class, dict) or not isinstance(confusion, dict) or len(per_class) > 20:
        return  # not a classifier, or too many classes to show: they are in metrics.json
    table = Table(title=f"{split}: per class (rows: true label, columns: predicted)", show_header=True)
    table.add_column("label")
    for name in ("precision", "recall", "f1", "support"):
        table.add_column(name, justify="right")
    labels = [str(x) for x in confusion["labels"]]
    for label in labels:
        table.add_column(f"→ {label}", justify="right")
    for label, row in zip(labels, confusion["matrix"], strict=True):
        c = per_class[label]
        cells = [f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"])]
        table.add_row(escape(label), *cells, *(str(n) for n in row))
    console.print(table)


def parse_sets(values: list[str] | None, option: str) -> dict[str, Any]:
    """``key=value`` options to a mapping, values parsed as YAML scalars (numbers, true/false, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TansuoError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} num_layers=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def recipe_sets(set_: list[str] | None, data: str | None, device: str | None) -> list[str]:
    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={json.dumps(data)}")
    if device is not None:
        sets.append(f"train.device={device}")
    return sets
