"""``tansuo models``: the registered models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from tansuo.cli._app import (
    console,
)


def models(
    pattern: Annotated[str | None, typer.Argument(help="filter, e.g. 'vit*'")] = None,
) -> None:
    """List the registered models with their family and size."""
    from tansuo.models import list_models, model_info

    table = Table(show_header=True)
    for col in ("name", "family", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for name in list_models(pattern):
        info = model_info(name)
        table.add_row(name, info["family"], f"{info['num_params']:,}")
    console.print(table)
