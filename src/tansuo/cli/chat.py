"""``tansuo chat``: talk to a chat model in the terminal, the answer streamed as it is decoded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import CompileOption, console, setup_logging
from tansuo.errors import TansuoError

EXIT_WORDS = ("/exit", "/quit")


def chat(
    bundle: Annotated[Path, typer.Argument(help="an lm bundle of a chat model (imported with its template)")],
    system: Annotated[str | None, typer.Option(help="the system message that opens the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="most tokens per answer")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; higher = more random")] = 0.7,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="nucleus sampling")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for reproducible answers")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    adapter: Annotated[
        Path | None,
        typer.Option(help="a LoRA adapter folder (PEFT's layout) merged into the bundle's weights"),
    ] = None,
    compile_: CompileOption = False,
) -> None:
    """Chat with a bundle: each line you type is a turn, the history is kept; /reset forgets it, /exit
    (or end of input) leaves."""
    setup_logging(False)
    from tansuo.bundle import load_bundle
    from tansuo.device import resolve_device

    dev = resolve_device(device)
    b = load_bundle(bundle, device=dev, adapter=adapter)
    from tansuo.tasks import GENERATE

    if GENERATE not in b.task.abilities:
        raise TansuoError(f"{bundle} is a {b.task.name!r} bundle; chat needs an lm bundle of a chat model")
    if compile_:
        b.model.compile_decoding()
    opening = [] if system is None else [{"role": "system", "content": system}]
    b.task.chat_prompt([*opening, {"role": "user", "content": "hi"}])  # no template: refuse before reading
    history = list(opening)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/reset":
            history = list(opening)
            continue
        history.append({"role": "user", "content": text})
        answer = b.task.reply(
            b.model,
            history,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            device=dev,
            on_text=lambda piece: console.print(piece, end="", markup=False, highlight=False),
        )
        console.print()
        history.append({"role": "assistant", "content": answer})
