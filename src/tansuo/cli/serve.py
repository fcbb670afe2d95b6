"""``tansuo serve``: a bundle behind HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    console,
    setup_logging,
)


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
    max_beam: Annotated[int, typer.Option(min=1, help="widest beam a translation request may ask for")] = 8,
    max_detections: Annotated[
        int, typer.Option(min=1, help="most boxes a detection request may ask for per image")
    ] = 100,
    timeout: Annotated[float, typer.Option(min=0.001, help="seconds a request may wait")] = 30.0,
    threads: Annotated[int | None, typer.Option(min=1, help="PyTorch threads (default: all cores)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log every request")] = False,
    adapter: Annotated[
        Path | None,
        typer.Option(help="a LoRA adapter folder (PEFT's layout) merged into the bundle's weights"),
    ] = None,
    batching: Annotated[
        str,
        typer.Option(
            help="generation: continuous (a request joins the running batch at the next step) or static "
            "(concurrent requests start together and run until the longest is done)"
        ),
    ] = "continuous",
    model_name: Annotated[
        str | None, typer.Option(help="the model's id in the OpenAI-compatible routes (default: folder name)")
    ] = None,
) -> None:
    """Serve a bundle over HTTP: the task's endpoint, /v1/model, /health, /ready, /metrics, a try-it page.

    Language models also answer OpenAI's API: /v1/completions, /v1/chat/completions and /v1/models.

    The API key may also come from the TANSUO_API_KEY environment variable.
    """
    setup_logging(verbose)
    import uvicorn

    from tansuo.serve.app import ServeConfig, read_api_key, serve_bundle
    from tansuo.serve.endpoints import Limits

    api_key = read_api_key(api_key_file)
    limits = Limits(
        max_body_bytes, max_text_chars, max_items, max_new_tokens, timeout, max_beam, max_detections
    )
    config = ServeConfig(
        backend,
        max_batch,
        max_wait_ms,
        api_key=api_key,
        limits=limits,
        batching=batching,
        model_name=model_name,
    )
    server, asgi = serve_bundle(bundle, config, device, threads, adapter=adapter)
    url = f"http://{host}:{port}"
    console.print(
        f"serving {bundle} ({server.bundle.task.name}, {backend}) at {url}  POST "
        f"{', '.join(e.path for e in server.endpoints)}, "
        f"try it at {url}/, docs at {url}/docs" + ("  (API key required)" if api_key else ""),
        highlight=False,
        markup=False,
    )
    uvicorn.run(asgi, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)
