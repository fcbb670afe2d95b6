"""The ``tansuo`` command line: one module per command, each parsing its options, calling one library
function and printing the result; the commands are registered below.

The only package that prints. Every :class:`~tansuo.errors.TansuoError` becomes a one-paragraph message on
stderr and exit code 2; anything else is a bug and keeps its traceback. Plugins (:mod:`tansuo.plugins`) are
loaded before the command runs, so their tasks, models and endpoints are there for every command.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from tansuo.cli import (
    audit,
    chat,
    compress,
    evaluate,
    explore,
    export,
    importing,
    lr_find,
    merge,
    models,
    plan,
    predict,
    scrub,
    serve,
    sign,
    train,
)
from tansuo.cli._app import app, console, err_console
from tansuo.errors import TansuoError

# the commands, in the order `tansuo --help` lists them
app.command()(train.train)
app.command("lr-find")(lr_find.lr_find)
app.command("eval")(evaluate.eval_)
app.command()(evaluate.generate)
app.command()(chat.chat)
app.command()(predict.predict)
app.command()(merge.merge)
app.command()(scrub.scrub)
app.command()(compress.compress)
app.command()(audit.audit)
app.command()(export.export)
app.command()(serve.serve)
app.command()(serve.apikey)
app.command()(sign.sign)
app.command()(sign.keygen)
app.command()(sign.manifest)
app.command()(explore.explore)
app.command()(explore.report)
app.command()(plan.plan)
app.command()(models.models)
app.add_typer(importing.import_app, name="import")

__all__ = ["app", "console", "err_console", "main"]


def main() -> None:
    """Entry point: run the app, turning user errors into exit code 2."""
    try:
        from tansuo.plugins import load_plugins

        load_plugins()
        app()
    except TansuoError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
