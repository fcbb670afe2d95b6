"""The endpoint base class, its registry, the request limits and how items reach the model."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from tansuo.errors import TansuoError
from tansuo.plugins import load_plugins


@dataclass
class Limits:
    """What one request may ask for; every limit has a command-line flag of the same name."""

    max_body_bytes: int = 1_000_000
    max_text_chars: int = 10_000
    max_items: int = 64
    max_new_tokens: int = 256
    timeout_s: float = 30.0
    max_beam: int = 8  # beam search: the widest beam a request may ask for
    max_pixels: int = 16_777_216  # pictures: the most pixels (4096 x 4096), checked before decoding
    redact_output: tuple[str, ...] = ()  # PII types scrubbed from generated text (--redact-output)
    max_detections: int = 100  # detection: the most boxes a request may ask for per image


class ApiError(Exception):
    """A request the server will not run; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Submit:
    """How an endpoint hands items to the model: ``await submit(items)`` returns their results;
    ``submit.start(items)`` returns the future of them without waiting (for streaming). Both refuse while
    the model is not ready and time out after the ``--timeout``."""

    def __init__(
        self, ready: Callable[[], bool], submit: Callable[[list[Any]], Awaitable[list[Any]]], timeout: float
    ) -> None:
        self._ready, self._submit, self.timeout = ready, submit, timeout

    def start(self, items: list[Any]) -> asyncio.Future:
        if not self._ready():
            raise ApiError(503, "the model is not ready yet; poll GET /ready")
        return asyncio.ensure_future(asyncio.wait_for(self._submit(items), self.timeout))

    async def __call__(self, items: list[Any]) -> list[Any]:
        try:
            return await self.start(items)
        except TimeoutError:
            raise ApiError(504, f"the model did not answer within {self.timeout:g} s (--timeout)") from None


class Endpoint(abc.ABC):
    """Base class. Subclasses set ``path``, ``summary``, ``input_kind``, ``request_model`` and implement the
    abstract methods; ``answer`` is the route's handler."""

    path: str
    summary: str = "Predict"  # the route's title in the OpenAPI docs
    input_kind: str  # what the try-it page shows: text, image, prompt, masked-text
    request_model: type[BaseModel]
    #: items are GenerationJobs decoded by the server's shared decoder (continuous batching), not run()
    #: in batches of their own (run() still serves static batching and the warm-up)
    continuous: bool = False
    #: "plain" errors are {"error": message}; "openai" ones {"error": {"message", "type", ...}}
    error_style: str = "plain"
    #: the served model's name (the server sets it: the bundle folder's name or --model-name)
    model_id: str = "model"
    #: when the server started (Unix seconds; the server sets it)
    created: int = 0

    def __init__(self, task: Any, model: torch.nn.Module, device: torch.device, limits: Limits) -> None:
        self.task, self.model, self.device, self.limits = task, model, device, limits
        self.redact: Callable[[str], str] | None = None  # generated text's PII scrubber (--redact-output)
        if limits.redact_output:
            from tansuo.data.pii import Scrubber

            self.redact = Scrubber(limits.redact_output)

    @abc.abstractmethod
    def items(self, request: BaseModel) -> list[Any]:
        """The request's items, validated against the limits."""

    @abc.abstractmethod
    def run(self, items: list[Any]) -> list[Any]:
        """One result per item; runs on the worker thread."""

    @abc.abstractmethod
    def respond(self, request: BaseModel, results: list[Any]) -> dict[str, Any]:
        """The answer to one request, from its results."""

    @abc.abstractmethod
    def warm_up_items(self) -> list[Any]:
        """Items to run once before the server is ready."""

    async def answer(self, request: BaseModel, submit: Submit) -> Any:
        """The response to one request: its items through the model, then :meth:`respond`."""
        return self.respond(request, await submit(self.items(request)))

    def generated_tokens(self, results: list[Any]) -> int:
        """Tokens generated for these results (counted in ``/metrics``)."""
        return 0

    def fits(self, items: list[Any], more: list[Any]) -> bool:
        return True

    def card(self) -> dict[str, Any]:
        """Task-specific fields of ``GET /v1/model``."""
        return {}

    def get_routes(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        """Extra ``GET`` routes this endpoint serves (path -> handler without arguments)."""
        return {}

    def _count(self, items: list[Any]) -> None:
        if not items:
            raise ApiError(422, "inputs is empty; send one input or a list of them")
        if len(items) > self.limits.max_items:
            raise ApiError(
                413, f"{len(items)} inputs in one request; at most {self.limits.max_items} (--max-items)"
            )


E = TypeVar("E", bound=type[Endpoint])

ENDPOINTS: dict[str, list[type[Endpoint]]] = {}


def register_endpoint(task: str) -> Callable[[E], E]:
    """Registers an endpoint class for the bundles of ``task``. Use as a class decorator; a task's
    endpoints are served in the order they were registered (the first is its card's main endpoint)."""

    def register(cls: E) -> E:
        routes = ENDPOINTS.setdefault(task, [])
        if any(c.path == cls.path and c is not cls for c in routes):
            raise ValueError(f"task {task!r} already has an endpoint at {cls.path}")
        if cls not in routes:
            routes.append(cls)
        return cls

    return register


def endpoints_for(task: str) -> list[type[Endpoint]]:
    """The endpoint classes registered for ``task`` (plugins are loaded first when there are none)."""
    if task not in ENDPOINTS:
        load_plugins()
    if task not in ENDPOINTS:
        raise TansuoError(f"{task!r} bundles cannot be served yet; served tasks: {sorted(ENDPOINTS)}")
    return list(ENDPOINTS[task])
