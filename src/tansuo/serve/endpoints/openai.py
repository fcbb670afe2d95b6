"""OpenAI-compatible routes for language models, so every OpenAI client (the ``openai`` package, LangChain,
curl scripts written for vLLM) talks to a tansuo bundle unchanged.

- ``POST /v1/completions``: a prompt (or a list of them) continued.
- ``POST /v1/chat/completions``: the conversation rendered with the bundle's chat template, the assistant's
  reply decoded until its end-of-turn token.
- ``GET /v1/models``: the one model this server serves (its id is the bundle folder's name, or
  ``tansuo serve --model-name``); a request naming another model is a 404, as vLLM answers.

Both generation routes answer whole (``usage`` counts the prompt and completion tokens) or, with
``stream: true``, as server-sent chunks ending in ``data: [DONE]`` (``stream_options.include_usage`` adds a
last chunk with the usage). Sampling: ``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``,
``top_k`` (vLLM's extension), ``stop`` (up to 4 strings; the text ends before the first one found, and text
that may start one is held back while streaming), ``seed``. Fields that would change the answer and are not
supported (``n`` > 1, ``logprobs``, ``echo``, penalties, ``logit_bias``...) are refused by name rather than
ignored. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Requests decode through the same batcher as ``/v1/generate`` (continuous batching by default).
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tansuo.data.tokenizers import decode, encode
from tansuo.errors import TansuoError
from tansuo.models.generation import GenerationJob, batch_fits, generate_batch
from tansuo.serve.endpoints.base import ApiError, Endpoint, Submit, register_endpoint

Number = StrictFloat | StrictInt

#: request fields clients may send that this server does not support, with the value that means "off"
UNSUPPORTED = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields both generation routes share."""

    model_config = ConfigDict(extra="allow")  # checked against UNSUPPORTED; the rest (user, ...) is ignored
    model: StrictStr = Field(description="the served model's id (GET /v1/models)")
    max_tokens: Annotated[StrictInt | None, Field(ge=1, description="tokens to generate at most")] = None
    temperature: Annotated[Number, Field(ge=0, le=2, description="0 = greedy")] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1, description="nucleus sampling")] = 1.0
    top_k: Annotated[StrictInt | None, Field(description="the k likeliest only (-1 or none: all)")] = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: Annotated[StrictInt, Field(ge=1, le=1, description="choices per prompt (only 1)")] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id... are not used by the templates here
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt | None, Field(ge=1)] = None


class _Detokenizer:
    """A request's text as its tokens arrive (on the decoding thread): what may be sent now, holding back
    half-spelled characters and text that could be the start of a stop string; a stop string found stops
    the request and ends the text before it."""

    def __init__(
        self,
        decode_new: Callable[[list[int]], str],
        job: GenerationJob,
        stops: list[str],
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self.decode_new, self.job, self.stops = decode_new, job, [s for s in stops if s]
        self.text, self.sent, self.cut, self.finished = "", 0, False, False
        self.redact = redact  # PII may span pieces: with a scrubber the text goes out whole at the end

    def push(self) -> str:
        """The piece of text that became final with the job's latest token ('' if none)."""
        if self.cut:
            return ""
        text = self.decode_new(self.job.output)
        if text.endswith("\ufffd"):  # a character spelled over several tokens
            return ""
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.cut = text[:at], True
                self.job.stop()
        if self.redact is not None:
            return ""
        if self.cut:
            return self._emit(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold)

    def finish(self) -> str:
        """The rest of the text, once decoding is over."""
        if self.finished:
            return ""
        self.finished = True
        if not self.cut:
            self.text = self.decode_new(self.job.output)
        if self.redact is not None:
            self.text = self.redact(self.text)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class _OpenAI(Endpoint):
    """What the completion and chat routes share: sampling fields into jobs, answers whole or streamed."""

    input_kind = "prompt"
    continuous = True
    error_style = "openai"
    kind: str  # "text_completion" or "chat.completion"

    # ------------------------------------------------------------ subclasses
    @abc.abstractmethod
    def prompts(self, request: Any) -> list[list[int]]:
        """The prompts' token ids."""

    @abc.abstractmethod
    def default_max_tokens(self, request: Any, prompt_len: int) -> int:
        """New tokens when the request does not say."""

    @abc.abstractmethod
    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        """One choice of the whole answer."""

    @abc.abstractmethod
    def delta(self, index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any] | None:
        """One choice of a streamed chunk (``first``: the opening chunk, None if there is none)."""

    def requested_max_tokens(self, request: Any) -> int | None:
        return request.max_tokens

    # ------------------------------------------------------------ requests
    def check(self, request: _Sampling) -> None:
        if request.model != self.model_id:
            raise ApiError(
                404, f"the model `{request.model}` does not exist; this server serves `{self.model_id}`"
            )
        for name, value in (request.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ApiError(400, f"`{name}` is not supported by this server; leave it out")

    def stop_tokens(self) -> frozenset[int]:
        eos = (self.task.chat or {}).get("eos_token") if hasattr(self.task, "chat") else None
        eos_id = None if not eos else self.task.tokenizer.token_to_id(eos)
        return frozenset() if eos_id is None else frozenset({eos_id})

    def items(self, request: Any) -> list[GenerationJob]:
        self.check(request)
        L = self.model.config.max_seq_len
        top_k = request.top_k if request.top_k is not None and request.top_k > 0 else None
        jobs = []
        for ids in self.prompts(request):
            if not ids:
                raise ApiError(400, "the prompt is empty; send at least one token of text")
            wanted = self.requested_max_tokens(request)
            new = wanted if wanted is not None else self.default_max_tokens(request, len(ids))
            if new > self.limits.max_new_tokens:
                raise ApiError(
                    400,
                    f"max_tokens is {new}; this server generates at most {self.limits.max_new_tokens} "
                    "(--max-new-tokens)",
                )
            if len(ids) + new > L:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {L} tokens; the prompt has {len(ids)} tokens "
                    f"and max_tokens asks for {new} more. Shorten the prompt or lower max_tokens",
                )
            jobs.append(
                GenerationJob(
                    ids=ids,
                    max_new_tokens=new,
                    temperature=float(request.temperature),
                    top_k=top_k,
                    top_p=None if request.top_p >= 1 else float(request.top_p),
                    seed=request.seed,
                    stop_tokens=self.stop_tokens(),
                )
            )
        return jobs

    def encode(self, text: str) -> list[int]:
        if len(text) > self.limits.max_text_chars:
            raise ApiError(
                413,
                f"the prompt is {len(text)} characters long; at most {self.limits.max_text_chars} "
                "(--max-text-chars)",
            )
        try:
            return encode(self.task.tokenizer, text)
        except TansuoError as e:
            raise ApiError(400, f"prompt: {e}") from e

    def decoder(self, job: GenerationJob) -> Callable[[list[int]], str]:
        """Decodes a job's new tokens with a few prompt tokens before them, so word boundaries come out as
        in the whole text."""
        tok, context = self.task.tokenizer, job.ids[-4:]
        prefix = decode(tok, context)
        return lambda new: decode(tok, context + new)[len(prefix) :]

    # ------------------------------------------------------------ batching
    def run(self, items: list[GenerationJob]) -> list[GenerationJob]:
        generate_batch(self.model, items, self.device)
        return items

    def fits(self, items: list[GenerationJob], more: list[GenerationJob]) -> bool:
        return batch_fits(items + more, self.model.config.max_seq_len)

    def generated_tokens(self, results: list[GenerationJob]) -> int:
        return sum(len(job.output) for job in results)

    def warm_up_items(self) -> list[GenerationJob]:
        return []

    # ------------------------------------------------------------ answers
    def head(self) -> dict[str, Any]:
        """The fields every answer and chunk of one request starts with."""
        prefix = "chatcmpl" if self.kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_id}

    def respond(self, request: Any, results: list[_Detokenizer]) -> dict[str, Any]:
        """The whole answer, once every prompt's decoding is over."""
        for t in results:
            t.finish()
        choices = [self.choice(i, t.text, t.job.finish_reason) for i, t in enumerate(results)]
        usage = _usage([t.job for t in results])
        return {**self.head(), "object": self.kind, "choices": choices, "usage": usage}

    async def answer(self, request: Any, submit: Submit) -> Any:
        jobs = self.items(request)
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        texts = [_Detokenizer(self.decoder(job), job, stops, self.redact) for job in jobs]
        if not request.stream:
            for text in texts:
                text.job.on_token = lambda _t, text=text: text.push()
            await submit(jobs)
            return self.respond(request, texts)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for i, text in enumerate(texts):

            def on_token(_t: int, i: int = i, text: _Detokenizer = text) -> None:
                piece = text.push()
                if piece:
                    loop.call_soon_threadsafe(pieces.put_nowait, (i, piece))

            text.job.on_token = on_token
        done = submit.start(jobs)
        usage = request.stream_options is not None and request.stream_options.include_usage
        return StreamingResponse(
            self.stream(self.head(), texts, done, pieces, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def stream(
        self,
        head: dict[str, Any],
        texts: list[_Detokenizer],
        done: asyncio.Future,
        pieces: asyncio.Queue,
        usage: bool,
    ) -> AsyncIterator[str]:
        """The chunks, then ``[DONE]``; a client that goes away stops its requests' decoding."""
        chunk = {**head, "object": f"{self.kind}.chunk" if self.kind == "chat.completion" else self.kind}
        try:
            for i in range(len(texts)):
                first = self.delta(i, None, None, first=True)
                if first is not None:
                    yield _event({**chunk, "choices": [first]})
            while True:
                getter = asyncio.ensure_future(pieces.get())
                finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter in finished:
                    i, piece = getter.result()
                    yield _event({**chunk, "choices": [self.delta(i, piece, None, first=False)]})
                    continue
                getter.cancel()
                while not pieces.empty():
                    i, piece = pieces.get_nowait()
                    yield _event({**chunk, "choices": [self.delta(i, piece, None, first=False)]})
                error = done.exception()
                if error is not None:
                    message = error.message if isinstance(error, ApiError) else str(error) or "failed"
                    yield _event({"error": {"message": message, "type": "server_error", "code": None}})
                    break
                for i, text in enumerate(texts):
                    rest = text.finish()
                    if rest:
                        yield _event({**chunk, "choices": [self.delta(i, rest, None, first=False)]})
                    reason = text.job.finish_reason or "length"
                    yield _event({**chunk, "choices": [self.delta(i, None, reason, first=False)]})
                if usage:
                    yield _event({**chunk, "choices": [], "usage": _usage([t.job for t in texts])})
                break
            yield "data: [DONE]\n\n"
        finally:
            for text in texts:
                text.job.stop()


@register_endpoint("lm")
class Completions(_OpenAI):
    """``POST /v1/completions`` (OpenAI's legacy completions); also serves ``GET /v1/models``."""

    path = "/v1/completions"
    summary = "Complete a prompt (OpenAI-compatible)"
    request_model = CompletionRequest
    kind = "text_completion"

    def prompts(self, request: CompletionRequest) -> list[list[int]]:
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(texts) > self.limits.max_items:
            raise ApiError(413, f"{len(texts)} prompts in one request; at most {self.limits.max_items}")
        return [self.encode(t) for t in texts]

    def default_max_tokens(self, request: CompletionRequest, prompt_len: int) -> int:
        return 16  # OpenAI's default for completions

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish or "length"}

    def delta(self, index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any] | None:
        if first:
            return None
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def get_routes(self) -> dict[str, Callable[[], Any]]:
        return {"/v1/models": self.models}

    async def models(self) -> dict[str, Any]:
        """The served model, as OpenAI's model list."""
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tansuo"}
        return {"object": "list", "data": [{**card, "max_model_len": self.model.config.max_seq_len}]}


@register_endpoint("lm")
class ChatCompletions(_OpenAI):
    """``POST /v1/chat/completions``: needs a bundle with a chat template (imported instruct models)."""

    path = "/v1/chat/completions"
    summary = "Answer a conversation (OpenAI-compatible)"
    request_model = ChatRequest
    kind = "chat.completion"

    def requested_max_tokens(self, request: ChatRequest) -> int | None:
        return request.max_completion_tokens or request.max_tokens

    def prompts(self, request: ChatRequest) -> list[list[int]]:
        messages = []
        for m in request.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else ""
            if isinstance(m.content, list):
                content = "".join(part.text for part in m.content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        if not getattr(self.task, "chat", None):
            raise ApiError(
                400,
                "this model has no chat template (it was not imported from an instruct model); "
                "use /v1/completions",
            )
        try:
            prompt = self.task.chat_prompt(messages)
        except TansuoError as e:
            raise ApiError(400, f"messages: {e}") from e
        if len(prompt) > self.limits.max_text_chars:
            raise ApiError(
                413,
                f"the conversation is {len(prompt)} characters long; at most "
                f"{self.limits.max_text_chars} (--max-text-chars)",
            )
        return [self.task.tokenizer.encode(prompt, add_special_tokens=False).ids]

    def default_max_tokens(self, request: ChatRequest, prompt_len: int) -> int:
        room = self.model.config.max_seq_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.model.config.max_seq_len} tokens; the "
                f"conversation has {prompt_len}. Shorten it",
            )
        return min(self.limits.max_new_tokens, room)

    def decoder(self, job: GenerationJob) -> Callable[[list[int]], str]:
        tok = self.task.tokenizer
        return lambda new: tok.decode(new)  # special tokens are skipped

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish or "length"}

    def delta(self, index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        if first:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _usage(jobs: list[GenerationJob]) -> dict[str, int]:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(len(j.output) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
