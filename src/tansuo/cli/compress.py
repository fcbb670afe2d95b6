"""``tansuo compress``: distil, prune and quantize a bundle, measuring every variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from tansuo.cli._app import (
    console,
    parse_sets,
    setup_logging,
)


def compress(
    bundle: Annotated[Path, typer.Argument(help="the bundle to compress (the teacher, for distillation)")],
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: dynamic int8 Linear layers (CPU, fbgemm); int8-weight / int4-weight: weight-only "
            "(decoders; see --activations); as the last step"
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="inputs per int4 group for int4-weight: 32 (default), 64 or 128")
    ] = None,
    quantize_head: Annotated[
        bool,
        typer.Option(
            help="weight-only: quantize the output head too (a head tied to the embedding becomes an int "
            "copy; the embedding stays fp32)"
        ),
    ] = True,
    activations: Annotated[
        str,
        typer.Option(
            help="weight-only: fp32 (exact) or int8 (inputs quantized per block of 32 on the fly, as "
            "llama.cpp does: integer dot products when decoding)"
        ),
    ] = "fp32",
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
    finetune_epochs: Annotated[
        float | None, typer.Option(min=0, help="the fine-tuning budget after pruning in epochs instead")
    ] = None,
    schedule: Annotated[
        str,
        typer.Option(help="pruning schedule: gradual (cuts spread over the fine-tuning) or one-shot"),
    ] = "gradual",
    distill_into: Annotated[
        str | None, typer.Option(help="student preset (`tansuo models`); trained on the teacher's task")
    ] = None,
    student: Annotated[
        list[str] | None, typer.Option(help="student architecture field, KEY=VALUE (repeatable)")
    ] = None,
    alpha: Annotated[float, typer.Option(help="weight of the hard-label loss in distillation")] = 0.5,
    temperature: Annotated[float, typer.Option(help="distillation temperature")] = 2.0,
    hidden: Annotated[
        float | None,
        typer.Option(
            help="weight of matching the teacher's hidden states (distill: default 0, off; prune: default 1, "
            "every layer)"
        ),
    ] = None,
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
        typer.Option(
            help="allowed quality drop in points: keep the most compressed variant within it; int8 then "
            "keeps its most sensitive layers in fp32 and pruning searches the largest ratio within it"
        ),
    ] = None,
    objective: Annotated[str, typer.Option(help="most compressed means: latency or size")] = "latency",
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/compress-<run name>)")] = None,
    data: Annotated[str | None, typer.Option("--data", help="where the data lives now, if it moved")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads while measuring")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Compress a bundle (distil, prune, quantize), measuring quality, size, speed and memory of each step."""
    setup_logging(verbose)
    from tansuo.variants import HEADERS, default_out, recipe_from_options, rows
    from tansuo.variants import compress as run_compress

    spec = recipe_from_options(
        recipe=recipe,
        quantize=quantize,
        quantize_backend=quantize_backend,
        group_size=group_size,
        quantize_head=quantize_head,
        activations=activations,
        prune=prune,
        importance=importance,
        finetune_steps=finetune_steps,
        finetune_epochs=finetune_epochs,
        schedule=schedule,
        distill_into=distill_into,
        student=parse_sets(student, "--student"),
        alpha=alpha,
        temperature=temperature,
        hidden=hidden,
        train=parse_sets(train_set, "--train"),
        max_drop=max_drop,
        objective=objective,
        threads=threads,
    )
    run_dir = out or default_out(bundle)

    def show(v: Any) -> None:
        f = v.figures
        q = f"{f.get('metric', 'quality')} {100 * f['quality']:.2f}" if "quality" in f else ""
        if "perplexity" in f.get("metrics", {}):  # a language model: perplexity says more than 100 x loss
            q = f"perplexity {f['metrics']['perplexity']:.2f}"
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
