"""``tansuo import hf``: models from elsewhere as bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    console,
    setup_logging,
)

import_app = typer.Typer(no_args_is_help=True, help="Turn models from elsewhere into tansuo bundles.")


@import_app.command("hf")
def import_hf(
    path: Annotated[
        Path, typer.Argument(help="a local Hugging Face BERT-family folder (config.json, weights)")
    ],
    out: Annotated[Path, typer.Option("--out", help="the bundle folder to write")],
    labels: Annotated[
        str | None,
        typer.Option(help="class names of a classifier checkpoint, comma-separated (default: id2label)"),
    ] = None,
) -> None:
    """Import a Hugging Face BERT folder (safetensors or .bin; vocab.txt or tokenizer.json) as a bundle."""
    setup_logging(False)
    from tansuo.importer import import_hf as run_import

    names = None if labels is None else [n.strip() for n in labels.split(",") if n.strip()]
    report = run_import(path, out, labels=names)
    what = (
        f"classify, labels {report.labels}"
        if report.task == "classify"
        else "mlm: a pretrained encoder; fine-tune it with model.init_from"
    )
    console.print(
        f"imported {path} -> {report.bundle} ({report.num_params:,} parameters; task {what})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if report.fresh:
        console.print(
            f"not in the checkpoint, so freshly initialised: {', '.join(report.fresh)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
