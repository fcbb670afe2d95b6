"""The ``tansuo`` command line: train, eval, generate, predict, import, models.

The only module that prints. Every :class:`~tansuo.errors.TansuoError` becomes a one-paragraph message on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tansuo.errors import TansuoError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tansuo (探索): measure which Transformer to use, train it, and ship it.",
)
console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("tansuo").setLevel(logging.DEBUG if verbose else logging.INFO)


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
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


def _print_class_report(split: str, metrics: dict[str, Any]) -> None:
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


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/digits-vit.yaml")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a recipe field: --set train.lr=3e-4 (repeatable)"),
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="data file; same as --set data.path=PATH")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", help="folder in which the recipe's relative data file names are looked up"
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="run folder; same as --set train.out_dir=DIR")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (CUDA if present), cpu, cuda")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run folder's last checkpoint")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a model as a recipe says; write checkpoints, a metrics log and the best bundle."""
    _setup_logging(verbose)
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
    rec, data_cfg = load_recipe(recipe, sets, data_dir)
    out_dir = Path(rec.train.out_dir)

    def built(run: RunSetup) -> None:
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
        console.print(
            f"device {trainer.device} · {trainer.plan.total_steps} steps"
            f" · evaluate every {trainer.plan.eval_every}"
        )
        fitting.append(trainer)

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
    result, task = done.result, done.task
    console.print(_metrics_table(f"best at step {result.get('step')}", result))
    held = result.get(task.heldout_split, {})
    _print_class_report(task.heldout_split, held)
    headline = held.get(task.default_metric)
    if headline is not None:
        console.print(f"{task.heldout_split} {task.default_metric}: [bold]{headline:.4f}[/]")
    console.print(f"bundle written to [bold]{result['bundle']}[/]")


@app.command("eval")
def eval_(
    bundle: Annotated[Path, typer.Argument(help="bundle folder written by `tansuo train`")],
    split: Annotated[str | None, typer.Option(help="split to evaluate; default: the held-back split")] = None,
    data: Annotated[str | None, typer.Option("--data", help="where the data lives now, if it moved")] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print metrics as JSON")] = False,
) -> None:
    """Evaluate a bundle on its held-back split (or another split)."""
    _setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.device import autocast, resolve_device

    dev = resolve_device(device)
    b = load_bundle(bundle, device=dev, data_path=data)
    split = split or b.task.heldout_split
    with autocast(dev):
        metrics = b.task.evaluate(b.model, split, batch_size, dev)
    if as_json:
        console.print_json(json.dumps({split: metrics}))
    else:
        console.print(_metrics_table(str(bundle), {split: metrics}))
        _print_class_report(split, metrics)


@app.command()
def generate(
    bundle: Annotated[Path, typer.Argument(help="a language-model bundle")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to sample")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; higher = more random")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="sample only among the k likeliest tokens")] = 50,
    top_p: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="sample among the likeliest tokens worth top_p")
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="independent samples")] = 1,
    seed: Annotated[int | None, typer.Option(help="seed for reproducible samples")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Sample text from a language-model bundle, using a KV cache."""
    _setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device

    dev = resolve_device(device)
    b = load_bundle(bundle, device=dev)
    from tansuo.tasks import GENERATE

    if GENERATE not in b.task.abilities:
        raise TansuoError(f"{bundle} is a {b.task.name!r} bundle; generate needs an lm bundle (use predict)")
    for i in range(num_samples):
        text = b.task.generate(
            b.model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=None if seed is None else seed + i,
            device=dev,
        )
        console.print(text, markup=False, highlight=False)
        if i + 1 < num_samples:
            console.print("---")


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder")],
    inputs: Annotated[
        list[str] | None, typer.Argument(help="image files (.png .jpg .npy .npz .csv) or texts, per task")
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="a file of inputs: CSV/TSV/JSONL texts for text tasks")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="write one JSON object per input to this .jsonl file")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="inputs per batch")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per input")] = False,
    top: Annotated[int, typer.Option(min=1, help="classes to show per input")] = 3,
    backend: Annotated[
        str,
        typer.Option(help="torch, or onnxruntime (the model exported, checked and fused at start; CPU)"),
    ] = "torch",
) -> None:
    """Predict with a bundle: the label and class probabilities for each input."""
    _setup_logging(False)
    import tempfile

    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device
    from tansuo.export.onnx import model_for_backend

    dev = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
    b = load_bundle(bundle, device=dev)
    with tempfile.TemporaryDirectory(prefix="tansuo-predict-") as tmp:
        model = model_for_backend(b, backend, dev, Path(tmp))
        _predict(b, model, dev, inputs, input_file, output, batch_size, as_json, top)


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
) -> None:
    from tansuo.atomic import atomic_write_text

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
            rows += b.task.predict(model, items[i : i + batch_size], dev)
            bar.update(job, completed=len(rows))
    if output is not None:
        atomic_write_text(output, "".join(json.dumps(row) + "\n" for row in rows))
        console.print(f"{len(rows)} predictions written to {output}", highlight=False)
        return
    for row in rows:
        if as_json:
            print(json.dumps(row))
        else:
            console.print(b.task.format_prediction(row, top), highlight=False, markup=False, soft_wrap=True)


import_app = typer.Typer(no_args_is_help=True, help="Turn models from elsewhere into tansuo bundles.")
app.add_typer(import_app, name="import")


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
    _setup_logging(False)
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


def _parse_sets(values: list[str] | None, option: str) -> dict[str, Any]:
    """``key=value`` options to a mapping, values parsed as YAML scalars (numbers, true/false, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TansuoError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} num_layers=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def compress(
    bundle: Annotated[Path, typer.Argument(help="the bundle to compress (the teacher, for distillation)")],
    quantize: Annotated[
        str | None, typer.Option(help="int8: dynamic int8 Linear layers (CPU, fbgemm), as the last step")
    ] = None,
    quantize_backend: Annotated[
        str,
        typer.Option(help="int8 runtime: torch (fbgemm), onnxruntime, or auto (the faster, measured)"),
    ] = "auto",
    prune: Annotated[
        str | None,
        typer.Option(
            help="heads=F,ffn=F (structured: remove heads and neurons) or unstructured=F (sparsity)"
        ),
    ] = None,
    importance: Annotated[
        str, typer.Option(help="structured pruning scores: taylor (gradient x activation) or magnitude")
    ] = "taylor",
    finetune_steps: Annotated[int, typer.Option(min=0, help="fine-tuning steps after pruning")] = 0,
    distill_into: Annotated[
        str | None, typer.Option(help="student preset (`tansuo models`); trained on the teacher's task")
    ] = None,
    student: Annotated[
        list[str] | None, typer.Option(help="student architecture field, KEY=VALUE (repeatable)")
    ] = None,
    alpha: Annotated[float, typer.Option(help="weight of the hard-label loss in distillation")] = 0.5,
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = 2.0,
    hidden: Annotated[float, typer.Option(help="weight of hidden-state matching (0: off)")] = 0.0,
    train_set: Annotated[
        list[str] | None,
        typer.Option(
            "--train",
            help="override the bundle's train section for distillation and fine-tuning, "
            "KEY=VALUE (repeatable), e.g. --train epochs=1 --train lr=5e-5",
        ),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="a compression recipe YAML (steps, max_drop); replaces the step flags")
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(help="allowed quality drop in points: keep the most compressed variant within it"),
    ] = None,
    objective: Annotated[str, typer.Option(help="most compressed means: latency or size")] = "latency",
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/compress-<run name>)")] = None,
    data: Annotated[str | None, typer.Option("--data", help="where the data lives now, if it moved")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads while measuring")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Compress a bundle (distil, prune, quantize), measuring quality, size, speed and memory of each step."""
    _setup_logging(verbose)
    from tansuo.variants import HEADERS, load_compress_recipe, parse_prune, rows
    from tansuo.variants import compress as run_compress

    train = _parse_sets(train_set, "--train")
    if recipe is not None:
        if any(v is not None for v in (quantize, prune, distill_into)):
            raise TansuoError("give either --recipe or the step flags (--quantize, --prune, --distill-into)")
        spec = load_compress_recipe(recipe)
        steps_ = [
            s.model_copy(update={"train": {**s.train, **train}}) if hasattr(s, "train") else s
            for s in spec.steps
        ]
        update: dict[str, Any] = {"steps": steps_}
        if max_drop is not None:
            update["max_drop"] = max_drop
        spec = spec.model_copy(update=update)
    else:
        steps: list[dict[str, Any]] = []
        if distill_into is not None:
            steps.append(
                {
                    "step": "distill",
                    "into": distill_into,
                    "overrides": _parse_sets(student, "--student"),
                    "alpha": alpha,
                    "temperature": temperature,
                    "hidden": hidden,
                    "train": train,
                }
            )
        if prune is not None:
            spec_p = parse_prune(prune)
            steps.append(
                {
                    "step": "prune",
                    **spec_p,
                    "importance": importance,
                    "finetune_steps": finetune_steps,
                    "train": train,
                }
            )
        if quantize is not None:
            steps.append({"step": "quantize", "mode": quantize, "backend": quantize_backend})
        if not steps:
            raise TansuoError(
                "nothing to do: give --quantize int8, --prune ..., --distill-into PRESET or --recipe"
            )
        raw: dict[str, Any] = {"steps": steps, "max_drop": max_drop, "objective": objective}
        if threads:
            raw["threads"] = threads
        spec = load_compress_recipe(None, raw)
    source = bundle.resolve()
    name = source.parent.name if source.name == "bundle" else source.name  # runs/X/bundle -> X
    run_dir = out or Path("runs") / f"compress-{name}"

    def show(v: Any) -> None:
        f = v.figures
        q = f"{f.get('metric', 'quality')} {100 * f['quality']:.2f}" if "quality" in f else ""
        console.print(
            f"{v.name}: {q}  p50 {f['latency_ms_p50']:.2f} ms  size {f['size_bytes'] / 1e6:.1f} MB",
            highlight=False,
            markup=False,
        )

    report = run_compress(bundle, spec, run_dir, data_path=data, on_variant=show)
    # a narrow terminal gets the main columns under short names; report.md has every column
    shown = {"variant": "variant", "steps": "steps", "quality": "quality", "p50 ms": "p50 ms"}
    shown |= {
        "speed-up": "speed",
        "drop (pts)": "drop",
        "size MB": "MB",
        "params": "params",
        "peak MB": "RSS MB",
    }
    keep = [HEADERS.index(h) for h in shown]
    table = Table(title=f"compression of {bundle}", show_header=True, box=None, pad_edge=False)
    for h, title in shown.items():
        if h == "steps":
            table.add_column(title, overflow="fold", min_width=10, ratio=1)
        else:
            table.add_column(title, justify="left" if h == "variant" else "right", no_wrap=True)
    for r in rows(report):
        table.add_row(*(escape(r[i]) for i in keep))
    console.print(table)
    if any(getattr(s, "unstructured", None) for s in spec.steps):
        console.print(
            "unstructured pruning zeroes weights: the zipped size shrinks (zipped MB), but dense CPU kernels "
            "do the same work on zeros, so neither latency nor the size on disk improves",
            highlight=False,
        )
    console.print(f"report: {run_dir / 'report.md'}", highlight=False)
    if report["chosen"] is None:
        console.print(
            f"no variant stays within {spec.max_drop} points of the original's quality: the original stays "
            f"({bundle}); nothing was written as the result",
            highlight=False,
        )
        raise typer.Exit(1)
    console.print(
        f"chosen: {report['chosen']} -> [bold]{escape(report['chosen_bundle'])}[/]", highlight=False
    )


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder (bert, vit or resnet classifier)")],
    out: Annotated[Path, typer.Option(help="the .onnx file to write")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    tolerance: Annotated[float, typer.Option(help="largest allowed difference from PyTorch")] = 1e-4,
    portable: Annotated[
        bool,
        typer.Option(
            help="standard ONNX operators only, for runtimes other than ONNX Runtime (default: fused into "
            "ONNX Runtime's transformer operators, faster there)"
        ),
    ] = False,
) -> None:
    """Export a bundle's model to ONNX (dynamic batch and sequence axes), checked against PyTorch."""
    _setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.export.onnx import export_onnx

    if fmt != "onnx":
        raise TansuoError(f"--format {fmt!r} is not supported; use --format onnx")
    b = load_bundle(bundle, device="cpu")
    if getattr(b.model, "onnx_file", None) is not None:
        raise TansuoError(f"{bundle} already is an ONNX model: copy its model.onnx")
    if getattr(b.model, "compression", None) and any(r["step"] == "quantize" for r in b.model.compression):
        raise TansuoError(f"{bundle} holds int8 torch layers, which do not export; export the fp32 bundle")
    report = export_onnx(b.model, out, tolerance=tolerance, fuse=not portable)
    shapes = ", ".join("x".join(map(str, s)) for s in report["checked_shapes"])
    counts = report["fused"]
    fused = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in _SHOWN_FUSIONS if k in counts)
    console.print(
        f"wrote {out} (inputs {', '.join(report['inputs'])}; dynamic batch"
        f"{' and sequence' if 'input_ids' in report['inputs'] else ''} axes)\n"
        f"max abs difference from PyTorch: {report['max_abs_diff']:.2e} on inputs {shapes} "
        f"(allowed {tolerance:.0e})\n"
        + (
            f"fused for ONNX Runtime: {fused or 'nothing matched'} (--portable: standard operators only)"
            if not portable
            else "standard ONNX operators only"
        ),
        highlight=False,
        markup=False,
    )


# the fusions that end as a node of the file (the others are intermediate steps of these)
_SHOWN_FUSIONS = ("attention", "skip_layer_normalization", "bias_gelu")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    backend: Annotated[str, typer.Option(help="torch (eager PyTorch, int8 too) or onnxruntime")] = "torch",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (torch backend)")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="most items per model call; 1 = no batching")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="how long a batch waits for more")] = 5.0,
    api_key_file: Annotated[
        Path | None, typer.Option(help="require 'Authorization: Bearer KEY' with the key in this file")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 1_000_000,
    max_text_chars: Annotated[int, typer.Option(min=1, help="longest text or prompt")] = 10_000,
    max_items: Annotated[int, typer.Option(min=1, help="most inputs in one request")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="most tokens one request may generate")] = 256,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds a request may wait")] = 30.0,
    threads: Annotated[int | None, typer.Option(min=1, help="PyTorch threads (default: all cores)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every request")] = False,
) -> None:
    """Serve a bundle over HTTP: the task's endpoint, /v1/model, /health, /ready, /metrics, a try-it page.

    The API key may also come from the TANSUO_API_KEY environment variable.
    """
    _setup_logging(verbose)
    import torch
    import uvicorn

    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device
    from tansuo.serve.app import ServeConfig, Server, create_app
    from tansuo.serve.endpoints import Limits

    api_key = os.environ.get("TANSUO_API_KEY") or None
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise TansuoError(f"cannot read --api-key-file {api_key_file}: {e}") from e
        if not api_key:
            raise TansuoError(f"--api-key-file {api_key_file} is empty; write the key in it")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
    b = load_bundle(bundle, device=dev)
    limits = Limits(max_body_bytes, max_text_chars, max_items, max_new_tokens, timeout)
    config = ServeConfig(backend, max_batch, max_wait_ms, api_key=api_key, limits=limits)
    server = Server(b, config, dev)
    asgi = create_app(server)
    url = f"http://{host}:{port}"
    console.print(
        f"serving {bundle} ({b.task.name}, {backend}) at {url}  POST {server.endpoint.path}, "
        f"try it at {url}/, docs at {url}/docs" + ("  (API key required)" if api_key else ""),
        highlight=False,
        markup=False,
    )
    uvicorn.run(asgi, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)


def _recipe_sets(set_: list[str] | None, data: str | None, device: str | None) -> list[str]:
    sets = list(set_ or [])
    if data is not None:
        sets.append(f"data.path={json.dumps(data)}")
    if device is not None:
        sets.append(f"train.device={device}")
    return sets


def _finish_study(study: Any, spec: Any, storage: str, *, copy: bool = True) -> None:
    """Collect the study's results, write report.html/md and results.json, copy the pick, print the front."""
    from tansuo.explore.report import TABLE, TITLES, describe, fmt, pareto_rows, write_report
    from tansuo.explore.results import collect, copy_best

    results = collect(study, spec, storage)
    paths = write_report(results, spec.study_dir)
    best = copy_best(results, spec.study_dir) if copy else None
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


@app.command()
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
    _setup_logging(verbose)
    import warnings

    import optuna
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tansuo.explore.pareto import pareto_front, quality_text, value
    from tansuo.explore.schema import METRICS, load_explore_recipe
    from tansuo.explore.search import budget_used, open_study, redact, run_study
    from tansuo.recipe import apply_overrides, read_recipe_file

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not verbose:  # the explore progress display replaces the trainer's and compressor's per-step lines
        logging.getLogger("tansuo").setLevel(logging.WARNING)
        logging.getLogger("tansuo.explore").setLevel(logging.INFO)
    sets = _recipe_sets(set_, data, device)
    if out is not None:
        sets.append(f"explore.study={json.dumps(str(out))}")
    spec = load_explore_recipe(recipe, sets, data_dir)
    raw = apply_overrides(read_recipe_file(recipe), sets)
    study = open_study(spec, raw, storage=storage, resume=resume, worker=worker)
    label = redact(storage) if storage else str(spec.study_dir / "optuna.db")
    objectives = spec.explore.objectives
    seen: list[list[float]] = []  # objective values of the feasible variants finished so far
    best_q: list[float] = []

    def add(record: dict[str, Any]) -> None:
        for v in record.get("variants", []):
            if v["status"] == "ok" and v["feasible"]:
                seen.append([value(v["figures"], o) for o in objectives])
                best_q.append(value(v["figures"], "quality"))

    for t in study.get_trials(deepcopy=False):
        if "record" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE:
            add(t.user_attrs["record"])
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

    def best_text() -> str:
        if not seen:
            return "no feasible model yet"
        best = max(best_q) if spec.quality == "maximize" else min(best_q)
        q = f"best {METRICS['quality'].title} {quality_text(best, spec.quality)}" if best_q else ""
        if len(objectives) == 1:
            return q
        front = pareto_front(seen, spec.directions)
        return f"{q} · front {len(front)} models"

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
        job = progress.add_task("explore", total=total, completed=used, best=best_text(), now="")

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                s = info["settings"]
                shown = " ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in {**s["overrides"], **s["train"]}.items()
                )
                progress.update(job, now=f"trial {info['number']}: {s['candidate']} {shown}")
                return
            if kind == "done":
                add(info["record"])
            progress.update(job, advance=1, best=best_text(), now="")
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


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="a study folder written by tansuo explore")],
    storage: Annotated[
        str | None, typer.Option(help="the storage URL, when the study is not in the folder's SQLite file")
    ] = None,
) -> None:
    """Write a study's report.html, report.md and results.json again; copy the recommended bundle to best/."""
    _setup_logging(False)
    import warnings

    import optuna

    from tansuo.explore.schema import load_explore
    from tansuo.explore.search import load_study_folder, redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study, info = load_study_folder(study_dir, storage)
    spec = load_explore(info["recipe"], study_dir)
    spec.study_dir = Path(study_dir)
    _finish_study(study, spec, redact(storage) if storage else info["storage"])


@app.command()
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


def main() -> None:
    """Entry point: run the app, turning user errors into exit code 2."""
    try:
        app()
    except TansuoError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
