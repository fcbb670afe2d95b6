"""``POST /v1/translate`` for translation bundles: one text or a list, beam size and length capped by the
server's limits (``--max-beam``, ``--max-new-tokens``: the bundle's beam and length ratio apply within them,
a request asking for more is refused). Texts of concurrent requests with the same decoding
settings are translated as one batch."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint
from tansuo.serve.endpoints.text import checked_texts


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(description="a text to translate, or a list of texts")
    beam_size: int | None = Field(None, ge=1, description="beam width (1: greedy); default the bundle's")
    max_length: int | None = Field(
        None, ge=1, description="most tokens of a translation; default the bundle's ratio of the source"
    )


class _Item(NamedTuple):
    text: str
    beam_size: int
    max_length: int


@register_endpoint("translate")
class Translate(Endpoint):
    """``POST /v1/translate``: the translation of each text."""

    path = "/v1/translate"
    summary = "Translate"
    input_kind = "text"
    request_model = TranslateRequest

    def items(self, request: TranslateRequest) -> list[_Item]:
        texts = checked_texts(self, request.inputs)
        # the bundle's beam, within the server's limit; a request asking for more is refused
        beam = (
            min(self.task.data.beam_size, self.limits.max_beam)
            if request.beam_size is None
            else request.beam_size
        )
        if beam > self.limits.max_beam:
            raise ApiError(422, f"beam_size {beam} is above this server's limit of {self.limits.max_beam}")
        length = self.limits.max_new_tokens if request.max_length is None else request.max_length
        if length > self.limits.max_new_tokens:
            raise ApiError(
                422, f"max_length {length} is above this server's limit of {self.limits.max_new_tokens}"
            )
        return [_Item(text, beam, length) for text in texts]

    def fits(self, items: list[_Item], more: list[_Item]) -> bool:
        """Items decoded with other settings wait for a batch of their own."""
        return not items or not more or items[0][1:] == more[0][1:]

    def run(self, items: list[_Item]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.beam_size, item.max_length), []).append(i)
        results: list[str] = [""] * len(items)
        for (beam, length), idx in groups.items():
            texts = [items[i].text for i in idx]
            for i, hyp in zip(
                idx, self.task.translate(self.model, texts, self.device, beam, length), strict=True
            ):
                results[i] = hyp
        for item, hyp in zip(items, results, strict=True):
            out.append({"input": item.text, "translation": hyp})
        return out

    def respond(self, request: TranslateRequest, results: list[Any]) -> dict[str, Any]:
        return {"translations": results}

    def warm_up_items(self) -> list[_Item]:
        return [_Item("warm up", min(self.task.data.beam_size, self.limits.max_beam), 8)]

    def card(self) -> dict[str, Any]:
        data = self.task.data
        return {
            "source_language": data.src_lang,
            "target_language": data.tgt_lang,
            "beam_size": data.beam_size,
        }
