"""``tansuo serve``: a bundle behind HTTP (FastAPI on Uvicorn).

Routes: the task's endpoints (``POST /v1/predict`` or ``POST /v1/generate``: whatever the endpoint classes
registered for the task declare, see ``endpoints.py``),
``GET /v1/model`` (the bundle's card), ``GET /health`` (the process answers), ``GET /ready`` (the model is
loaded and warmed up), ``GET /metrics`` (Prometheus text), ``GET /`` (a page to try the model), and
FastAPI's OpenAPI docs at ``/docs``. With an API key every ``/v1`` route needs
``Authorization: Bearer KEY`` (compared in constant time). Every error is JSON ``{"error": message}`` with a
4xx status for bad requests; the server keeps serving whatever a request holds.

Requests pass through one outer ASGI layer (``guard.py``) that refuses bodies over the limit before they are
parsed, adds the security headers and records each request's status and latency; ``security.py`` checks API
keys (kept as hashes) and rate limits; ``pages.py`` serves the try-it page and the API docs from local files.
"""

import asyncio
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tansuo import __version__
from tansuo.bundle import Bundle, load_bundle
from tansuo.device import resolve_device
from tansuo.errors import TansuoError
from tansuo.export.onnx import BACKENDS, model_for_backend
from tansuo.models.generation import DecodeEngine
from tansuo.serve.batching import Batcher, BusyError, ContinuousBatcher
from tansuo.serve.endpoints import ApiError, Endpoint, Limits, Submit, endpoints_for
from tansuo.serve.guard import Guard, error_responses, json_error
from tansuo.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics
from tansuo.serve.pages import add_pages
from tansuo.serve.security import (
    ApiKey,
    KeyRing,
    Rate,
    RateLimiter,
    hash_key,
    read_key_file,
)

log = logging.getLogger(__name__)

#: how generation requests are batched (``tansuo serve --batching``)
BATCHING = ("continuous", "static")


@dataclass
class ServeConfig:
    """How the server runs; the command line's flags."""

    backend: str = "torch"
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    api_key: str | None = None  # one key in plain text (TANSUO_API_KEY), named "default"
    api_keys: tuple[ApiKey, ...] = ()  # keys by name and hash (--api-key-file)
    rate_limit: Rate | None = None  # per key (per client address without keys), unless a key has its own
    access_log: bool = True  # one line per request on the logger tansuo.serve.access
    limits: Limits = field(default_factory=Limits)
    #: generation: "continuous" (a request joins the running batch at the next step) or "static"
    batching: str = "continuous"
    #: the model's id in the OpenAI-compatible routes; default: the bundle folder's name
    model_name: str | None = None


class Server:
    """The loaded model, its endpoints (each with its batcher: one worker thread owns the model per route)
    and metrics (one per process). ``endpoint`` is the task's main endpoint (the first registered)."""

    def __init__(self, bundle: Bundle, config: ServeConfig, device: torch.device) -> None:
        classes = endpoints_for(bundle.task.name)
        if config.backend not in BACKENDS:
            raise TansuoError(f"--backend {config.backend!r} is unknown; use {' or '.join(BACKENDS)}")
        self.bundle, self.config, self.device = bundle, config, device
        plain = [ApiKey("default", hash_key(config.api_key))] if config.api_key else []
        self.keys = KeyRing([*plain, *config.api_keys])
        self.signed_by: str | None = None  # the public key file a verified signature was checked with
        self._tmp: Path | None = None
        if config.backend == "onnxruntime" and getattr(bundle.model, "onnx_file", None) is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="tansuo-serve-"))  # the export goes here
        if config.batching not in BATCHING:
            raise TansuoError(f"--batching {config.batching!r} is unknown; use {' or '.join(BATCHING)}")
        model = model_for_backend(bundle, config.backend, device, self._tmp)
        self.endpoints: list[Endpoint] = [cls(bundle.task, model, device, config.limits) for cls in classes]
        self.model_id = config.model_name or Path(bundle.path).name
        for e in self.endpoints:
            e.model_id, e.created = self.model_id, int(time.time())
        self.endpoint = self.endpoints[0]
        self.metrics = _metrics()
        self.decoder: ContinuousBatcher | None = None  # shared by the generation routes
        if config.batching == "continuous" and any(e.continuous for e in self.endpoints):
            self.decoder = self._decoder(model, device)
        self.batchers = {e.path: self._batcher(e) for e in self.endpoints}
        self.batcher = self.batchers[self.endpoint.path]
        self.ready = False

    def _decoder(self, model: torch.nn.Module, device: torch.device) -> ContinuousBatcher:
        engine = DecodeEngine(model, device, slots=self.config.max_batch)

        def on_step(rows: int) -> None:
            self.metrics.observe("tansuo_batch_size", rows, endpoint="decode")
            self.metrics.inc("tansuo_generated_tokens_total", rows)

        return ContinuousBatcher(
            engine,
            on_step=on_step,
            on_admit=lambda: self.metrics.inc("tansuo_generated_tokens_total", 1),
            max_queue=self.config.max_queue,
        )

    def _batcher(self, endpoint: Endpoint) -> Batcher | ContinuousBatcher:
        if endpoint.continuous and self.decoder is not None:
            return self.decoder
        return Batcher(
            lambda items: self._run(endpoint, items),
            max_batch=self.config.max_batch,
            max_wait_ms=self.config.max_wait_ms,
            fits=endpoint.fits,
            on_batch=lambda n: self.metrics.observe("tansuo_batch_size", n, endpoint=endpoint.path),
            max_queue=self.config.max_queue,
            name="tansuo-model",
        )

    def _run(self, endpoint: Endpoint, items: list[Any]) -> list[Any]:
        with torch.inference_mode():
            results = endpoint.run(items)
        tokens = endpoint.generated_tokens(results)
        if tokens:
            self.metrics.inc("tansuo_generated_tokens_total", tokens)
        self.metrics.inc("tansuo_items_total", len(items), endpoint=endpoint.path)
        return results

    def submit(self, endpoint: Endpoint) -> Submit:
        """How ``endpoint``'s requests reach its batcher."""
        return Submit(lambda: self.ready, self.batchers[endpoint.path].submit, self.config.limits.timeout_s)

    def start(self) -> None:
        """Warms the model up (first calls are slow) and starts the workers; then the server is ready."""
        started = time.perf_counter()
        for endpoint in self.endpoints:
            self._run(endpoint, endpoint.warm_up_items())
        for batcher in set(self.batchers.values()):
            batcher.start()
        self.ready = True
        log.info("ready in %.2f s", time.perf_counter() - started)

    def stop(self) -> None:
        self.ready = False
        for batcher in set(self.batchers.values()):
            batcher.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def card(self) -> dict[str, Any]:
        cfg = self.bundle.config
        return {
            "task": self.bundle.task.name,
            "endpoint": self.endpoint.path,
            "endpoints": [e.path for e in self.endpoints],
            "input": self.endpoint.input_kind,
            "model_name": cfg.get("model_name"),
            "family": cfg.get("family"),
            "num_params": cfg.get("num_params"),
            "config": cfg.get("config"),
            "compression": cfg.get("compression", []),
            "runtime": cfg.get("runtime", "torch"),
            "backend": self.config.backend,
            "device": str(self.device),
            "metrics": self.bundle.metrics,
            "batching": {
                "max_batch": self.config.max_batch,
                "max_wait_ms": self.config.max_wait_ms,
                **({"generation": self.config.batching} if any(e.continuous for e in self.endpoints) else {}),
            },
            "model_id": self.model_id,
            "limits": asdict(self.config.limits),
            "auth": bool(self.keys),
            "rate_limit": None if self.config.rate_limit is None else self.config.rate_limit.text,
            "signed_by": self.signed_by,
            "tansuo_version": __version__,
            **self.endpoint.card(),
        }


def read_api_keys(api_key_file: Path | None) -> tuple[ApiKey, ...]:
    """The keys ``/v1`` requests may send: those of the key file (:mod:`tansuo.serve.security`) when one is
    given, else the ``TANSUO_API_KEY`` environment variable's (named ``default``), else none."""
    if api_key_file is None:
        key = os.environ.get("TANSUO_API_KEY")
        return (ApiKey("default", hash_key(key)),) if key else ()
    return tuple(read_key_file(api_key_file))


def serve_bundle(
    path: Path,
    config: ServeConfig,
    device: str = "auto",
    threads: int | None = None,
    adapter: Path | None = None,
    public_key: Path | None = None,
) -> tuple[Server, Any]:
    """Load a bundle for serving on ``config.backend`` (ONNX Runtime runs on the CPU) and build the ASGI
    application around it; returns the server and the application (what ``tansuo serve`` runs).
    ``adapter``: a LoRA adapter folder merged into the bundle's weights first. ``public_key``: serve the
    bundle only if that Ed25519 key signed it (``tansuo sign``)."""
    if public_key is not None and adapter is not None:
        raise TansuoError(
            "--require-signature covers the bundle's files, not an --adapter folder; merge the adapter "
            "(tansuo merge), sign the merged bundle and serve that"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device("cpu" if config.backend == "onnxruntime" and device == "auto" else device)
    server = Server(load_bundle(path, device=dev, adapter=adapter, public_key=public_key), config, dev)
    server.signed_by = None if public_key is None else str(public_key)
    return server, create_app(server)


def _metrics() -> Metrics:
    m = Metrics()
    m.counter("tansuo_requests_total", "HTTP requests answered, by route and status.")
    m.counter("tansuo_request_errors_total", "Requests answered with a 4xx or 5xx status, by route.")
    m.histogram(
        "tansuo_request_duration_seconds", "Time from request to the end of the answer.", LATENCY_BUCKETS
    )
    m.histogram("tansuo_batch_size", "Items per model call (micro-batching).", BATCH_BUCKETS)
    m.counter("tansuo_items_total", "Items (texts, images, prompts) run through the model.")
    m.counter("tansuo_generated_tokens_total", "Tokens generated.")
    return m


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return "; ".join(parts)


def create_app(server: Server) -> Any:
    """The ASGI application serving ``server`` (FastAPI inside the body-limit and metrics layer)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        yield
        server.stop()

    app = FastAPI(
        title=f"tansuo: {server.bundle.config.get('model_name')} ({server.bundle.task.name})",
        version=__version__,
        lifespan=lifespan,
        description=f"Serving {server.bundle.path.name}. Errors are JSON objects with an 'error' message.",
        docs_url=None,  # pages.py serves Swagger UI from local files
        redoc_url=None,
    )

    limiter = RateLimiter()

    async def authorize(request: Request) -> None:
        rate = server.config.rate_limit
        if server.keys.keys:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            key = server.keys.match(given.strip()) if scheme.lower() == "bearer" else None
            if key is None:
                raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'")
            name, rate = key.name, key.rate or rate
            request.state.key_name = name  # for the access log
        else:
            name = f"client {request.client.host if request.client else '?'}"
        if rate is not None:
            wait = limiter.allow(name, rate)
            if wait > 0:
                raise ApiError(
                    429,
                    f"rate limit {rate.text} reached for {name if server.keys.keys else 'this client'}; "
                    f"retry in {wait:.1f} s",
                    {"Retry-After": str(math.ceil(wait))},
                )

    # no per-request cost without keys or limits
    guarded = [Depends(authorize)] if server.keys.keys or server.config.rate_limit is not None else []

    openai = {e.path for e in server.endpoints if e.error_style == "openai"}
    openai |= {path for e in server.endpoints if e.error_style == "openai" for path in e.get_routes()}

    @app.exception_handler(ApiError)
    async def _apijson_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
        return json_error(e.status, e.message, headers, request.url.path in openai)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # OpenAI's clients expect 400 for a malformed request; the other routes have always said 422
        status = 400 if request.url.path in openai else 422
        return json_error(status, _validation_message(e), None, request.url.path in openai)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return json_error(e.status_code, str(e.detail), None, request.url.path in openai)

    @app.exception_handler(TansuoError)
    async def _bad_input(request: Request, e: TansuoError) -> JSONResponse:
        return json_error(422, str(e), None, request.url.path in openai)

    @app.exception_handler(BusyError)
    async def _busy(request: Request, e: BusyError) -> JSONResponse:
        return json_error(503, f"server busy: {e}", {"Retry-After": "1"}, request.url.path in openai)

    extra: set[str] = set()
    for endpoint in server.endpoints:
        _add_route(app, endpoint, server.submit(endpoint), guarded)
        for path, handler in endpoint.get_routes().items():
            if path not in extra:
                extra.add(path)
                summary = (handler.__doc__ or "").strip()
                responses = error_responses(endpoint.error_style == "openai")
                app.get(path, dependencies=guarded, summary=summary, responses=responses)(handler)

    @app.get("/v1/model", dependencies=guarded, summary="The bundle's card", responses=error_responses())
    async def model_card() -> dict[str, Any]:
        return server.card()

    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and warmed up")
    async def ready() -> JSONResponse:
        if server.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    pages = add_pages(app)
    routes = {
        *(e.path for e in server.endpoints),
        *extra,
        "/v1/model",
        "/health",
        "/ready",
        "/metrics",
        *pages,
        "/openapi.json",
    }
    return Guard(app, server.metrics, server.config.limits.max_body_bytes, routes, server.config.access_log)


def _add_route(app: FastAPI, endpoint: Endpoint, submit: Submit, guarded: list[Any]) -> None:
    """``POST endpoint.path``: the body validated against the endpoint's request model, then its answer."""
    request_model = endpoint.request_model

    async def handle(body: request_model) -> Any:  # type: ignore[valid-type]
        return await endpoint.answer(body, submit)

    responses = error_responses(endpoint.error_style == "openai")
    if "stream" in request_model.model_fields:  # "stream": true answers with server-sent events
        event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
        responses[200] = {"content": {"text/event-stream": {"schema": event}}}  # each event: a JSON line
    app.post(endpoint.path, dependencies=guarded, summary=endpoint.summary, responses=responses)(handle)
