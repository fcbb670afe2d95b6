"""``tansuo predict``: a bundle's predictions for inputs given as arguments or in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tansuo.cli._app import (
    console,
    err_console,
    setup_logging,
)
from tansuo.errors import TansuoError


def predict(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder")],
    inputs: Annotated[
        list[str] | None, typer.Argument(help="image files (.png .jpg .npy .npz .csv) or texts, per task")
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="a file of inputs: CSV/TSV/JSONL texts for text tasks")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="write the predictions to this file: one JSON object per input for .jsonl (or .json), "
            "else the printed line per input (a translation per line for translate bundles)",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="inputs per batch")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per input")] = False,
    top: Annotated[int, typer.Option(min=1, help="classes to show per input")] = 3,
    backend: Annotated[
        str,
        typer.Option(help="torch, or onnxruntime (the model exported, checked and fused at start; CPU)"),
    ] = "torch",
    options: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="NAME=VALUE, a task's own prediction option (repeatable); e.g. for recommend bundles "
            "-o k=20 -o candidates=50,172 -o exclude_seen=false. A wrong name lists the task's options",
        ),
    ] = None,
    draw: Annotated[
        Path | None,
        typer.Option(
            "--draw",
            help="write a picture of the prediction here (image tasks that draw: the mask or boxes over the "
            "image; with several inputs, one file per input named after it); the same as -o draw=PATH",
        ),
    ] = None,
) -> None:
    """Predict with a bundle: the label and class probabilities for each input (per task: a translation; for
    recommend bundles each input is a history of item ids or titles, e.g. "50,172,133", answered with the
    top items not seen yet)."""
    setup_logging(False)
    import tempfile

    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device
    from tansuo.export.onnx import model_for_backend
    from tansuo.tasks.base import NoOptions

    dev = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
    b = load_bundle(bundle, device=dev)
    with tempfile.TemporaryDirectory(prefix="tansuo-predict-") as tmp:
        model = model_for_backend(b, backend, dev, Path(tmp))
        options = list(options or [])
        if draw is not None:
            if "draw" not in getattr(b.task, "PredictOptions", NoOptions).model_fields:
                raise TansuoError(
                    f"--draw: {b.task.name!r} bundles have no picture to draw; it is for image tasks whose "
                    "predictions are masks or boxes"
                )
            options.append(f"draw={draw}")
        _predict(b, model, dev, inputs, input_file, output, batch_size, as_json, top, options)


def _predict(
    b: Any,
    model: Any,
    dev: Any,
    inputs: list[str] | None,
    input_file: Path | None,
    output: Path | None,
    batch_size: int,
    as_json: bool,
    top: int,
    options: list[str],
) -> None:
    from tansuo.atomic import atomic_write_text
    from tansuo.tasks.base import predict_options

    extra = predict_options(b.task, options)
    items = list(inputs or [])
    if input_file is not None:
        items += b.task.read_inputs(input_file)
    if not items:
        raise TansuoError("nothing to predict: give inputs as arguments or --input FILE")
    rows: list[dict[str, Any]] = []
    from rich.progress import Progress

    with Progress(console=err_console, transient=True, disable=len(items) <= batch_size) as bar:
        job = bar.add_task("predict", total=len(items))
        for i in range(0, len(items), batch_size):
            rows += b.task.predict(model, items[i : i + batch_size], dev, **extra)
            bar.update(job, completed=len(rows))
    if output is not None:
        if output.suffix.lower() in (".jsonl", ".json"):
            lines = [json.dumps(row) for row in rows]
        else:
            lines = [b.task.format_prediction(row, top) for row in rows]
        atomic_write_text(output, "".join(line + "\n" for line in lines))
        console.print(f"{len(rows)} predictions written to {output}", highlight=False)
        return
    for row in rows:
        if as_json:
            print(json.dumps(row))
        else:
            console.print(b.task.format_prediction(row, top), highlight=False, markup=False, soft_wrap=True)
