"""The generation endpoint: ``POST /v1/generate`` for language models, batched, optionally streamed.

Generation endpoints (this one and the OpenAI-compatible ones in ``openai.py``) share one decoder: with
continuous batching (the default) a request joins the running batch at the next step; with static batching
(``tansuo serve --batching static``) concurrent requests start together and run until the longest is done.
Either way a request's result is its :class:`~tansuo.models.generation.GenerationJob`, whose ``output``
holds the new tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tansuo.data.tokenizers import decode, encode
from tansuo.errors import TansuoError
from tansuo.models.generation import GenerationJob, batch_fits, generate_batch
from tansuo.serve.endpoints.base import ApiError, Endpoint, Submit, register_endpoint


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


@register_endpoint("lm")
class Generate(Endpoint):
    """``POST /v1/generate`` for language models; concurrent requests decode as one batch."""

    path = "/v1/generate"
    summary = "Continue a prompt"
    input_kind = "prompt"
    request_model = GenerateRequest
    continuous = True

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

    async def answer(self, request: GenerateRequest, submit: Submit) -> Any:
        (job,) = self.items(request)
        if not request.stream:
            return self.respond(request, await submit([job]))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int] = asyncio.Queue()
        job.on_token = lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)
        done = submit.start([job])
        return StreamingResponse(
            self.stream(job, done, tokens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    def generated_tokens(self, results: list[GenerationJob]) -> int:
        return sum(len(job.output) for job in results)

    def fits(self, items: list[GenerationJob], more: list[GenerationJob]) -> bool:
        return batch_fits(items + more, self.model.config.max_seq_len)

    def run(self, items: list[GenerationJob]) -> list[GenerationJob]:
        generate_batch(self.model, items, self.device)
        return items

    def text(self, job: GenerationJob, new: list[int]) -> str:
        """The continuation's text (decoded with the prompt, so merged tokens come out right)."""
        tok = self.task.tokenizer
        return decode(tok, job.ids + new)[len(decode(tok, job.ids)) :]

    def respond(self, request: GenerateRequest, results: list[GenerationJob]) -> dict[str, Any]:
        (job,) = results
        return {"completion": self._final(self.text(job, job.output)), "tokens": len(job.output)}

    def _final(self, text: str) -> str:
        return text if self.redact is None else self.redact(text)

    def warm_up_items(self) -> list[GenerationJob]:
        return [GenerationJob(ids=[0], max_new_tokens=2, temperature=0.0)]

    def card(self) -> dict[str, Any]:
        return {"max_seq_len": self.model.config.max_seq_len, "vocab_size": self.model.config.vocab_size}

    async def stream(
        self, job: GenerationJob, done: asyncio.Future, tokens: asyncio.Queue
    ) -> AsyncIterator[str]:
        """Server-sent events: one ``{"token": text}`` per new piece of text, then ``{"done": true, ...}``.
        A client that goes away stops its request's decoding."""
        try:
            async for event in self._events(job, done, tokens):
                yield event
        finally:
            job.stop()

    async def _events(
        self, job: GenerationJob, done: asyncio.Future, tokens: asyncio.Queue
    ) -> AsyncIterator[str]:
        new: list[int] = []
        sent = ""
        while True:
            getter = asyncio.ensure_future(tokens.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                new.append(getter.result())
                if self.redact is not None:  # PII may span pieces: the text goes out whole, scrubbed
                    continue
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
            text = self._final(self.text(job, new))
            if len(text) > len(sent):
                yield _event({"token": text[len(sent) :]})
            yield _event({"done": True, "completion": text, "tokens": len(new)})
            return


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
