"""The outer ASGI layer of the server (:class:`Guard`) and the JSON error body every route answers with."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tansuo.serve.metrics import Metrics
from tansuo.serve.pages import DOCS_ASSETS
from tansuo.serve.security import SECURITY_HEADERS


class ErrorBody(BaseModel):
    error: str


class _OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIErrorBody(BaseModel):
    error: _OpenAIErrorDetail


_STATUSES = {
    400: "the body is not UTF-8 (or, on OpenAI's routes, not a valid request)",
    401: "a missing or wrong API key",
    404: "an unknown model (OpenAI's routes)",
    413: "a body, text or list over its limit",
    415: "a body that is not JSON",
    422: "a request the model cannot run, and why",
    429: "the key's (or client's) rate limit is reached; see Retry-After",
    503: "the model is loading or the queue is full; see Retry-After",
    504: "the request ran past --timeout",
}


def error_responses(openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """The error answers a ``/v1`` route may give, for its OpenAPI description (what clients and fuzzers
    check the server against)."""
    body = OpenAIErrorBody if openai else ErrorBody
    return {code: {"model": body, "description": why} for code, why in _STATUSES.items()}


def json_error(
    status: int, message: str, headers: dict[str, str] | None = None, openai: bool = False
) -> JSONResponse:
    """The JSON error body: ``{"error": message}``, or OpenAI's shape on the OpenAI-compatible routes."""
    if not openai:
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_busy"}
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


access = logging.getLogger("tansuo.serve.access")
_SECURITY = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def _is_json(scope: dict) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return False


class Guard:
    """Outer ASGI layer: refuses bodies over ``max_body_bytes`` (413, before the app parses anything), adds
    the security headers to every answer, records every request's status and duration and (``access_log``)
    logs one line for it: client, key name, method, route, status, milliseconds; never the body."""

    def __init__(
        self, app: FastAPI, metrics: Metrics, max_body_bytes: int, routes: set[str], access_log: bool = True
    ) -> None:
        self.app, self.metrics, self.max_body_bytes, self.routes = app, metrics, max_body_bytes, routes
        self.access_log = access_log

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"
        if route == "other" and scope["path"].startswith(DOCS_ASSETS + "/"):
            route = DOCS_ASSETS
        status = 500
        state = scope.setdefault("state", {})  # what Starlette's request.state writes to (the key's name)

        async def send_and_record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message = {**message, "headers": headers + [h for h in _SECURITY if h[0] not in present]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                seconds = time.perf_counter() - started
                self._record(route, status, seconds)
                if self.access_log:
                    client = scope.get("client") or ("-", 0)
                    access.info(
                        "%s %s key=%s %s %s %d %.1f ms",
                        datetime.now(UTC).isoformat(timespec="milliseconds"),
                        client[0],
                        state.get("key_name", "-"),
                        scope["method"],
                        route,
                        status,
                        seconds * 1000,
                    )

        body = await self._read_body(scope, receive)
        if body is None:
            limit = self.max_body_bytes
            response = json_error(413, f"the request body is over {limit} bytes (--max-body-bytes)")
            await response(scope, receive, send_and_record)
            return
        if body and scope["method"] == "POST" and not _is_json(scope):
            response = json_error(
                415, "send the body as JSON, with the header 'Content-Type: application/json'"
            )
            await response(scope, receive, send_and_record)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            response = json_error(400, f"the body is not valid UTF-8 (byte {e.start}); send JSON in UTF-8")
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
