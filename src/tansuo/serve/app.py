"""``tansuo serve``: a bundle behind HTTP (FastAPI on Uvicorn).

Routes: the task's endpoints (``POST /v1/predict`` or ``POST /v1/generate``: whatever the endpoint classes
registered for the task declare, see ``endpoints.py``),
``GET /v1/model`` (the bundle's card), ``GET /health`` (the process answers), ``GET /ready`` (the model is
loaded and warmed up), ``GET /metrics`` (Prometheus text), ``GET /`` (a page to try the model), and
FastAPI's OpenAPI docs at ``/docs``. With an API key every ``/v1`` route needs
``Authorization: Bearer KEY`` (compared in constant time). Every error is JSON ``{"error": message}`` with a
4xx status for bad requests; the server keeps serving whatever a request holds.

Requests pass through one outer ASGI layer (:class:`_Guard`) that refuses bodies over the limit before they
are parsed and records each request's status and latency.
"""

import asyncio
import hmac
import logging
import os
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tansuo import __version__
from tansuo.bundle import Bundle, load_bundle
from tansuo.device import resolve_device
from tansuo.errors import TansuoError
from tansuo.export.onnx import BACKENDS, model_for_backend
from tansuo.models.generation import DecodeEngine
from tansuo.serve.batching import Batcher, BusyError, ContinuousBatcher
from tansuo.serve.endpoints import ApiError, Endpoint, Limits, Submit, endpoints_for
from tansuo.serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics

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
    api_key: str | None = None
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
            "auth": self.config.api_key is not None,
            "tansuo_version": __version__,
            **self.endpoint.card(),
        }


def read_api_key(api_key_file: Path | None) -> str | None:
    """The key every ``/v1`` request must send: the file's contents when a file is given, else the
    ``TANSUO_API_KEY`` environment variable, else None (no key)."""
    if api_key_file is None:
        return os.environ.get("TANSUO_API_KEY") or None
    try:
        key = Path(api_key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TansuoError(f"cannot read --api-key-file {api_key_file}: {e}") from e
    if not key:
        raise TansuoError(f"--api-key-file {api_key_file} is empty; write the key in it")
    return key


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


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, openai: bool = False
) -> JSONResponse:
    """The JSON error body: ``{"error": message}``, or OpenAI's shape on the OpenAI-compatible routes."""
    if not openai:
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


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
    )

    async def authorize(request: Request) -> None:
        key = server.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'")

    guarded = (
        [Depends(authorize)] if server.config.api_key is not None else []
    )  # no per-request cost without a key

    openai = {e.path for e in server.endpoints if e.error_style == "openai"}
    openai |= {path for e in server.endpoints if e.error_style == "openai" for path in e.get_routes()}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, e.message, headers, request.url.path in openai)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # OpenAI's clients expect 400 for a malformed request; the other routes have always said 422
        status = 400 if request.url.path in openai else 422
        return _error(status, _validation_message(e), None, request.url.path in openai)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), None, request.url.path in openai)

    @app.exception_handler(TansuoError)
    async def _bad_input(request: Request, e: TansuoError) -> JSONResponse:
        return _error(422, str(e), None, request.url.path in openai)

    @app.exception_handler(BusyError)
    async def _busy(request: Request, e: BusyError) -> JSONResponse:
        return _error(503, f"server busy: {e}", {"Retry-After": "1"}, request.url.path in openai)

    extra: set[str] = set()
    for endpoint in server.endpoints:
        _add_route(app, endpoint, server.submit(endpoint), guarded)
        for path, handler in endpoint.get_routes().items():
            if path not in extra:
                extra.add(path)
                app.get(path, dependencies=guarded, summary=(handler.__doc__ or "").strip())(handler)

    @app.get("/v1/model", dependencies=guarded, summary="The bundle's card")
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

    page = resources.files("tansuo.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_it() -> HTMLResponse:
        return HTMLResponse(page)

    routes = {
        *(e.path for e in server.endpoints),
        *extra,
        "/v1/model",
        "/health",
        "/ready",
        "/metrics",
        "/",
        "/docs",
        "/openapi.json",
    }
    return _Guard(app, server.metrics, server.config.limits.max_body_bytes, routes)


def _add_route(app: FastAPI, endpoint: Endpoint, submit: Submit, guarded: list[Any]) -> None:
    """``POST endpoint.path``: the body validated against the endpoint's request model, then its answer."""
    request_model = endpoint.request_model

    async def handle(body: request_model) -> Any:  # type: ignore[valid-type]
        return await endpoint.answer(body, submit)

    app.post(endpoint.path, dependencies=guarded, summary=endpoint.summary)(handle)


def _is_json(scope: dict) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return False


class _Guard:
    """Outer ASGI layer: refuses bodies over ``max_body_bytes`` (413, before the app parses anything) and
    records every request's status and duration."""

    def __init__(self, app: FastAPI, metrics: Metrics, max_body_bytes: int, routes: set[str]) -> None:
        self.app, self.metrics, self.max_body_bytes, self.routes = app, metrics, max_body_bytes, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(route, status, time.perf_counter() - started)

        body = await self._read_body(scope, receive)
        if body is None:
            limit = self.max_body_bytes
            response = _error(413, f"the request body is over {limit} bytes (--max-body-bytes)")
            await response(scope, receive, send_and_record)
            return
        if body and scope["method"] == "POST" and not _is_json(scope):
            response = _error(415, "send the body as JSON, with the header 'Content-Type: application/json'")
            await response(scope, receive, send_and_record)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            response = _error(400, f"the body is not valid UTF-8 (byte {e.start}); send JSON in UTF-8")
            await response(scope, receive, send_and_record)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send_and_record)

    async def _read_body(self, scope: dict, receive: Any) -> bytes | None:
        """The whole body, or None once it is known to be over the limit."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _record(self, route: str, status: int, seconds: float) -> None:
        self.metrics.inc("tansuo_requests_total", endpoint=route, status=str(status))
        if status >= 400:
            self.metrics.inc("tansuo_request_errors_total", endpoint=route)
        self.metrics.observe("tansuo_request_duration_seconds", seconds, endpoint=route)
