"""``POST /v1/translate`` for translation bundles: one text or a list, beam size and length capped by the
server's limits (``--max-beam``, ``--max-new-tokens``: the bundle's beam and length ratio apply within them,
a request asking for more is refused), and with ``n_best`` the best translations of each text with their
scores (at most the beam). Texts of concurrent requests with the same decoding settings are translated as
one batch."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint
from tansuo.serve.endpoints.text import checked_texts
from tansuo.tasks.translate_decode import nbest_rows


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(description="a text to translate, or a list of texts")
    beam_size: int | None = Field(None, ge=1, description="beam width (1: greedy); default the bundle's")
    max_length: int | None = Field(
        None, ge=1, description="most tokens of a translation; default the bundle's ratio of the source"
    )
    n_best: int | None = Field(
        None,
        ge=1,
        description="also answer the n best translations of each text with their scores, best first "
        "(at most the beam size)",
    )


class _Item(NamedTuple):
    text: str
    beam_size: int
    max_length: int
    n_best: int | None = None

    @property
    def setting(self) -> tuple[int, int, bool]:
        """What decodes alike: items of one setting share a batch (n-best lists need beam search's scores)."""
        return self.beam_size, self.max_length, self.n_best is not None


@register_endpoint("translate")
class Translate(Endpoint):
    """``POST /v1/translate``: the translation of each text (with ``n_best``, its alternatives too)."""

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
        if request.n_best is not None and request.n_best > beam:
            raise ApiError(
                422,
                f"n_best {request.n_best} is above the beam size {beam}: beam search keeps at most beam_size "
                f"hypotheses; ask for fewer, or a beam_size of at least {request.n_best} (this server allows "
                f"up to {self.limits.max_beam})",
            )
        return [_Item(text, beam, length, request.n_best) for text in texts]

    def fits(self, items: list[_Item], more: list[_Item]) -> bool:
        """Items decoded with other settings wait for a batch of their own."""
        return not items or not more or items[0].setting == more[0].setting

    def run(self, items: list[_Item]) -> list[dict[str, Any]]:
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.setting, []).append(i)
        out: list[dict[str, Any]] = [{} for _ in items]
        for (beam, length, nbest), idx in groups.items():
            texts = [items[i].text for i in idx]
            if not nbest:
                hyps = self.task.translate(self.model, texts, self.device, beam, length)
                for i, hyp in zip(idx, hyps, strict=True):
                    out[i] = {"input": items[i].text, "translation": hyp}
                continue
            most = max(items[i].n_best or 1 for i in idx)  # one search; each item keeps its own n
            lists = self.task.translate_nbest(self.model, texts, self.device, most, beam, length)
            for i, hyps in zip(idx, lists, strict=True):
                kept = hyps[: items[i].n_best]
                out[i] = {
                    "input": items[i].text,
                    "translation": kept[0][0] if kept else "",
                    "alternatives": nbest_rows(kept),  # best first: the first is the translation
                }
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
