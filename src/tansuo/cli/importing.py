"""``tansuo import hf`` and ``tansuo import gguf``: models from elsewhere as bundles."""

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
        Path,
        typer.Argument(
            help="a local Hugging Face folder (config.json, weights): BERT, GPT-2, Llama, Mistral, Qwen2"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the bundle folder to write")],
    labels: Annotated[
        str | None,
        typer.Option(help="class names of a classifier checkpoint, comma-separated (default: id2label)"),
    ] = None,
) -> None:
    """Import a Hugging Face folder (safetensors or .bin; vocab.txt or tokenizer.json) as a bundle."""
    setup_logging(False)
    from tansuo.importer import import_hf as run_import

    names = None if labels is None else [n.strip() for n in labels.split(",") if n.strip()]
    report = run_import(path, out, labels=names)
    what = {
        "classify": f"classify, labels {report.labels}",
        "mlm": "mlm: a pretrained encoder; fine-tune it with model.init_from",
        "lm": "lm: a pretrained decoder; try `tansuo generate`",
    }.get(report.task, report.task)
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


@import_app.command("gguf")
def import_gguf(
    path: Annotated[Path, typer.Argument(help="a .gguf file (llama.cpp): Llama, Mistral, SmolLM, Qwen2")],
    out: Annotated[Path, typer.Option("--out", help="the bundle folder to write")],
) -> None:
    """Import a GGUF file as an lm bundle: weights dequantized to float32, its tokenizer and chat template."""
    setup_logging(False)
    from tansuo.importer import import_gguf as run_import

    report = run_import(path, out)
    console.print(
        f"imported {path} -> {report.bundle} ({report.num_params:,} parameters; task lm: a pretrained "
        "decoder; try `tansuo generate`)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
