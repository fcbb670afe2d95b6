"""``tansuo eval`` and ``tansuo generate``: use a bundle on its data, or sample from a language model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    CompileOption,
    console,
    metrics_table,
    print_class_report,
    setup_logging,
)
from tansuo.errors import TansuoError


def eval_(
    bundle: Annotated[Path, typer.Argument(help="bundle folder written by `tansuo train`")],
    split: Annotated[str | None, typer.Option(help="split to evaluate; default: the held-back split")] = None,
    data: Annotated[str | None, typer.Option("--data", help="where the data lives now, if it moved")] = None,
    batch_size: Annotated[int, typer.Option(help="evaluation batch size")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print metrics as JSON")] = False,
) -> None:
    """Evaluate a bundle on its held-back split (or another split)."""
    setup_logging(False)
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
        console.print(metrics_table(str(bundle), {split: metrics}))
        print_class_report(split, metrics)


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
    chat: Annotated[
        bool, typer.Option("--chat", help="the prompt is a user turn: apply the bundle's chat template")
    ] = False,
    system: Annotated[str | None, typer.Option(help="with --chat: a system message before it")] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="a LoRA adapter folder (PEFT's layout) merged into the bundle's weights"),
    ] = None,
    compile_: CompileOption = False,
) -> None:
    """Sample text from a language-model bundle, using a KV cache (--chat: a chat model's answer)."""
    setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device

    dev = resolve_device(device)
    b = load_bundle(bundle, device=dev, adapter=adapter)
    from tansuo.tasks import GENERATE

    if GENERATE not in b.task.abilities:
        raise TansuoError(f"{bundle} is a {b.task.name!r} bundle; generate needs an lm bundle (use predict)")
    if compile_:
        b.model.compile_decoding()
    if system is not None and not chat:
        raise TansuoError("--system goes with --chat (a system message opens a conversation)")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    sample = b.task.reply if chat else b.task.generate  # a chat turn's answer, or the prompt continued
    for i in range(num_samples):
        text = sample(
            b.model,
            messages if chat else prompt,
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
