"""``tansuo serve``: a bundle behind HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tansuo.cli._app import (
    console,
    err_console,
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
        Path | None,
        typer.Option(help="require 'Authorization: Bearer KEY', KEY one of this file's (tansuo apikey)"),
    ] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(help="requests per key (per client without keys), as 10/s, 600/min or 10/s:20 (burst)"),
    ] = None,
    redact_output: Annotated[
        str | None,
        typer.Option(help="scrub this PII from generated text, e.g. email,phone,credit_card,iban,ip,url"),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="log a line per request: time, client, key name, route, status, ms")
    ] = True,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="largest request body")] = 1_000_000,
    max_text_chars: Annotated[int, typer.Option(min=1, help="longest text or prompt")] = 10_000,
    max_items: Annotated[int, typer.Option(min=1, help="most inputs in one request")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="most tokens one request may generate")] = 256,
    max_beam: Annotated[int, typer.Option(min=1, help="widest beam a translation request may ask for")] = 8,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="most pixels an uploaded picture may have (checked before decoding)")
    ] = 16_777_216,
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
    require_signature: Annotated[
        Path | None,
        typer.Option(
            metavar="PUBKEY",
            help="serve the bundle only if this Ed25519 public key signed it (tansuo sign; PEM, ssh-ed25519)",
        ),
    ] = None,
) -> None:
    """Serve a bundle over HTTP: the task's endpoint, /v1/model, /health, /ready, /metrics, a try-it page.

    Language models also answer OpenAI's API: /v1/completions, /v1/chat/completions and /v1/models.

    Without --api-key-file the one API key may come from the TANSUO_API_KEY environment variable.
    """
    setup_logging(verbose)
    import uvicorn

    from tansuo.serve.app import ServeConfig, read_api_keys, serve_bundle
    from tansuo.serve.endpoints import Limits
    from tansuo.serve.security import Rate

    api_keys = read_api_keys(api_key_file)
    redact = tuple(t.strip() for t in redact_output.split(",") if t.strip()) if redact_output else ()
    if redact:
        from tansuo.data.pii import check_types

        check_types(redact)
    limits = Limits(
        max_body_bytes,
        max_text_chars,
        max_items,
        max_new_tokens,
        timeout,
        max_beam,
        max_pixels=max_pixels,
        max_detections=max_detections,
        redact_output=redact,
    )
    config = ServeConfig(
        backend,
        max_batch,
        max_wait_ms,
        api_keys=api_keys,
        rate_limit=None if rate_limit is None else Rate.parse(rate_limit),
        access_log=access_log,
        limits=limits,
        batching=batching,
        model_name=model_name,
    )
    server, asgi = serve_bundle(
        bundle, config, device, threads, adapter=adapter, public_key=require_signature
    )
    url = f"http://{host}:{port}"
    console.print(
        f"serving {bundle} ({server.bundle.task.name}, {backend}) at {url}  POST "
        f"{', '.join(e.path for e in server.endpoints)}, "
        f"try it at {url}/, docs at {url}/docs"
        + (f"  ({len(api_keys)} API key{'s' if len(api_keys) > 1 else ''} accepted)" if api_keys else "")
        + (f"  (signature verified with {require_signature})" if require_signature else ""),
        highlight=False,
        markup=False,
    )
    uvicorn.run(asgi, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)


def apikey(
    key_file: Annotated[
        Path, typer.Argument(help="the key file (created if missing): names and hashes only")
    ],
    name: Annotated[str, typer.Argument(help="the key's name (it appears in the access log)")],
    rate_limit: Annotated[
        str | None, typer.Option(help="this key's own rate limit, as 10/s, 600/min or 10/s:20 (burst)")
    ] = None,
) -> None:
    """Make a new API key for `tansuo serve --api-key-file`: the file keeps its name and sha256 only, and the
    key is printed this once."""
    setup_logging(False)
    from tansuo.serve.security import add_key

    key = add_key(key_file, name, rate_limit)
    console.print(key, markup=False, highlight=False, soft_wrap=True)
    err_console.print(f"added {name!r} to {key_file}; the key above is shown only now", markup=False)
