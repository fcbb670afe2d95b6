"""``tansuo merge``: a bundle and its LoRA adapter folded into one plain bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import console, setup_logging


def merge(
    bundle: Annotated[Path, typer.Argument(help="the base bundle (or a bundle trained with train.lora)")],
    out: Annotated[Path, typer.Option("--out", help="the merged bundle folder to write")],
    adapter: Annotated[
        Path | None,
        typer.Argument(
            help="a LoRA adapter folder (PEFT's layout, from tansuo or PEFT); default: the bundle's own"
        ),
    ] = None,
) -> None:
    """Merge a LoRA adapter into the bundle's weights (W + alpha / r * B A): a plain bundle without adapters
    that computes what the adapted model computes, as fast as the base."""
    setup_logging(False)
    from tansuo.bundle import merge_bundle

    path = merge_bundle(bundle, out, adapter)
    what = f"{bundle} + {adapter}" if adapter is not None else f"{bundle} and its adapters"
    console.print(f"merged {what} -> {path}", markup=False, highlight=False, soft_wrap=True)
