"""One endpoint per task: how a request becomes items for the model, and results become the answer.

An :class:`Endpoint` turns a validated request into a list of items (rejecting bad input with an
:class:`ApiError` before anything reaches the model), runs batches of items from many requests on the
model (``run``, called on the batcher's worker thread), and shapes each request's results into its
response. ``ENDPOINTS`` maps a task name to its endpoint class: a new task adds one class and one line.

Inputs are always data in the request body (texts, base64-encoded pictures, pixel arrays, prompts); no
request can name a file path.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tansuo.data.images import decode_picture, image_from_array
from tansuo.data.tokenizers import decode, encode
from tansuo.errors import TansuoError
from tansuo.serve.generation import GenerationJob, batch_fits, generate_batch


@dataclass
class Limits:
    """What one request may ask for; every limit has a command-line flag of the same name."""

    max_body_bytes: int = 1_000_000
    max_text_chars: int = 10_000
    max_items: int = 64
    max_new_tokens: int = 256
    timeout_s: float = 30.0


class ApiError(Exception):
    """A request the server will not run; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Endpoint(abc.ABC):
    """Base class. Subclasses set ``path``, ``input_kind``, ``request_model`` and implement the methods."""

    path: str
    input_kind: str  # what the try-it page shows: text, image, prompt, masked-text
    request_model: type[BaseModel]

    def __init__(self, task: Any, model: torch.nn.Module, device: torch.device, limits: Limits) -> None:
        self.task, self.model, self.device, self.limits = task, model, device, limits

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

    def fits(self, items: list[Any], more: list[Any]) -> bool:
        return True

    def card(self) -> dict[str, Any]:
        """Task-specific fields of ``GET /v1/model``."""
        return {}

    def _count(self, items: list[Any]) -> None:
        if not items:
            raise ApiError(422, "inputs is empty; send one input or a list of them")
        if len(items) > self.limits.max_items:
            raise ApiError(
                413, f"{len(items)} inputs in one request; at most {self.limits.max_items} (--max-items)"
            )


# ------------------------------------------------------------------------------------------- text
class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(
        description="a text, or a list of texts; for sentence-pair models a tab separates the two texts"
    )


class TextPredict(Endpoint):
    """``POST /v1/predict`` for text classifiers: label and class probabilities per text."""

    path = "/v1/predict"
    input_kind = "text"
    request_model = TextRequest

    def items(self, request: TextRequest) -> list[str]:
        texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
        self._count(texts)
        for i, text in enumerate(texts):
            if not text.strip():
                raise ApiError(422, f"inputs[{i}] is an empty text; send some words")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" is valid JSON
                raise ApiError(422, f"inputs[{i}]: lone surrogate at {e.start}; send valid Unicode") from e
            if len(text) > self.limits.max_text_chars:
                raise ApiError(
                    413,
                    f"inputs[{i}] is {len(text)} characters long; at most {self.limits.max_text_chars} "
                    "(--max-text-chars)",
                )
        return texts

    def run(self, items: list[str]) -> list[dict[str, Any]]:
        return self.task.predict(self.model, items, self.device)

    def respond(self, request: TextRequest, results: list[Any]) -> dict[str, Any]:
        return {"predictions": results}

    def warm_up_items(self) -> list[str]:
        return ["warm up"]

    def card(self) -> dict[str, Any]:
        return {"labels": list(self.task.labels)}


class FillMask(TextPredict):
    """``POST /v1/predict`` for masked-language models: the likeliest tokens for each ``[MASK]``."""

    input_kind = "masked-text"

    def items(self, request: TextRequest) -> list[str]:
        texts = super().items(request)
        for i, text in enumerate(texts):
            if "[MASK]" not in text:
                raise ApiError(
                    422, f"inputs[{i}] has no [MASK]; write [MASK] where a word should be predicted"
                )
        return texts

    def warm_up_items(self) -> list[str]:
        return ["a [MASK] ."]

    def card(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------ image
class ImageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr | None = Field(None, description="a PNG/JPEG/BMP file, base64-encoded (a data: URL too)")
    pixels: list[Any] | None = Field(
        None, description="pixel values in the training data's units: (H, W), (C, H, W), (H, W, C) or flat"
    )


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: ImageInput | list[ImageInput] = Field(description="an image, or a list of images")


class ImagePredict(Endpoint):
    """``POST /v1/predict`` for image classifiers."""

    path = "/v1/predict"
    input_kind = "image"
    request_model = ImageRequest

    def items(self, request: ImageRequest) -> list[np.ndarray]:
        images = [request.inputs] if isinstance(request.inputs, ImageInput) else list(request.inputs)
        self._count(images)
        c, h, _ = self.task.image_shape
        out = []
        for i, image in enumerate(images):
            name = f"inputs[{i}]"
            if (image.image is None) == (image.pixels is None):
                raise ApiError(422, f"{name}: give exactly one of 'image' (base64 picture) or 'pixels'")
            try:
                if image.image is not None:
                    data = image.image.split(",", 1)[1] if image.image.startswith("data:") else image.image
                    try:
                        raw = base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError) as e:
                        raise ApiError(422, f"{name}.image is not valid base64 ({e})") from e
                    array = decode_picture(
                        raw, image_size=h, channels=c, pixel_max=self.task.pixel_max, name=name
                    )
                else:
                    try:
                        pixels = np.asarray(image.pixels, dtype=np.float64)
                    except (ValueError, TypeError) as e:
                        raise ApiError(
                            422, f"{name}.pixels is not a rectangular array of numbers ({e})"
                        ) from e
                    array = image_from_array(pixels, image_size=h, channels=c, name=f"{name}.pixels")
            except TansuoError as e:
                raise ApiError(422, str(e)) from e
            out.append(array)
        return out

    def run(self, items: list[np.ndarray]) -> list[dict[str, Any]]:
        results = self.task.predict_arrays(self.model, np.stack(items), [""] * len(items), self.device)
        for r in results:
            del r["input"]
        return results

    def respond(self, request: ImageRequest, results: list[Any]) -> dict[str, Any]:
        return {"predictions": results}

    def warm_up_items(self) -> list[np.ndarray]:
        return [np.zeros(self.task.image_shape, dtype=np.float32)]

    def card(self) -> dict[str, Any]:
        c, h, w = self.task.image_shape
        return {
            "labels": list(self.task.class_names),
            "image_shape": [c, h, w],
            "pixel_max": self.task.pixel_max,
        }


# ------------------------------------------------------------------------------------- generation
class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr = Field("", description="text to continue; empty starts from the first token")
    max_new_tokens: Annotated[
        StrictInt | None,
        Field(ge=1, description="tokens to add (default 64, or fewer if the context is short)"),
    ] = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=100, description="0 = greedy")] = 0.8
    top_k: Annotated[StrictInt | None, Field(ge=1, description="sample among the k likeliest tokens")] = 50
    top_p: Annotated[
        StrictFloat | StrictInt | None, Field(gt=0, le=1, description="sample among tokens worth top_p")
    ] = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1, description="for reproducible samples")
    stream: StrictBool = Field(False, description="send tokens as server-sent events as they are made")


class Generate(Endpoint):
    """``POST /v1/generate`` for language models; concurrent requests decode as one batch."""

    path = "/v1/generate"
    input_kind = "prompt"
    request_model = GenerateRequest

    def items(self, request: GenerateRequest) -> list[GenerationJob]:
        L = self.model.config.max_seq_len
        cap = min(self.limits.max_new_tokens, L - 1)
        if request.max_new_tokens is None:
            request.max_new_tokens = min(64, cap)
        if request.max_new_tokens > cap:
            why = (
                "(--max-new-tokens)" if cap == self.limits.max_new_tokens else f"(the model's context is {L})"
            )
            raise ApiError(422, f"max_new_tokens is {request.max_new_tokens}; at most {cap} {why}")
        if len(request.prompt) > self.limits.max_text_chars:
            raise ApiError(
                413,
                f"prompt is {len(request.prompt)} characters long; at most {self.limits.max_text_chars} "
                "(--max-text-chars)",
            )
        try:
            ids = encode(self.task.tokenizer, request.prompt) if request.prompt else []
        except TansuoError as e:
            raise ApiError(422, f"prompt: {e}") from e
        ids = (ids or [0])[-(L - request.max_new_tokens) :]  # the context keeps the prompt's end
        return [
            GenerationJob(
                ids=ids,
                max_new_tokens=request.max_new_tokens,
                temperature=float(request.temperature),
                top_k=request.top_k,
                top_p=None if request.top_p is None else float(request.top_p),
                seed=request.seed,
            )
        ]

    def fits(self, items: list[GenerationJob], more: list[GenerationJob]) -> bool:
        return batch_fits(items + more, self.model.config.max_seq_len)

    def run(self, items: list[GenerationJob]) -> list[dict[str, Any]]:
        new = generate_batch(self.model, items, self.device)
        return [
            {"completion": self.text(job, ids), "tokens": len(ids)}
            for job, ids in zip(items, new, strict=True)
        ]

    def text(self, job: GenerationJob, new: list[int]) -> str:
        """The continuation's text (decoded with the prompt, so merged tokens come out right)."""
        tok = self.task.tokenizer
        return decode(tok, job.ids + new)[len(decode(tok, job.ids)) :]

    def respond(self, request: GenerateRequest, results: list[Any]) -> dict[str, Any]:
        return results[0]

    def warm_up_items(self) -> list[GenerationJob]:
        return [GenerationJob(ids=[0], max_new_tokens=2, temperature=0.0)]

    def card(self) -> dict[str, Any]:
        return {"max_seq_len": self.model.config.max_seq_len, "vocab_size": self.model.config.vocab_size}

    async def stream(
        self, job: GenerationJob, done: asyncio.Future, tokens: asyncio.Queue
    ) -> AsyncIterator[str]:
        """Server-sent events: one ``{"token": text}`` per new piece of text, then ``{"done": true, ...}``."""
        new: list[int] = []
        sent = ""
        while True:
            getter = asyncio.ensure_future(tokens.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                new.append(getter.result())
                text = self.text(job, new)
                if len(text) > len(sent) and not text.endswith("\ufffd"):  # hold back half a character
                    yield _event({"token": text[len(sent) :]})
                    sent = text
                continue
            getter.cancel()
            while not tokens.empty():
                new.append(tokens.get_nowait())
            error = done.exception()
            if error is not None:
                message = error.message if isinstance(error, ApiError) else str(error) or type(error).__name__
                yield _event({"error": message})
                return
            text = self.text(job, new)
            if len(text) > len(sent):
                yield _event({"token": text[len(sent) :]})
            yield _event({"done": True, "completion": text, "tokens": len(new)})
            return


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


ENDPOINTS: dict[str, type[Endpoint]] = {
    "classify": TextPredict,
    "mlm": FillMask,
    "image": ImagePredict,
    "lm": Generate,
}
