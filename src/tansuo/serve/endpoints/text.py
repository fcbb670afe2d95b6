"""Text endpoints: ``POST /v1/predict`` for text classifiers and masked-language models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint


# ------------------------------------------------------------------------------------------- text
def checked_texts(endpoint: Endpoint, inputs: str | list[str]) -> list[str]:
    """A request's texts as a list, refused when empty, not valid Unicode, too long or too many."""
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    endpoint._count(texts)
    for i, text in enumerate(texts):
        if not text.strip():
            raise ApiError(422, f"inputs[{i}] is an empty text; send some words")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" is valid JSON
            raise ApiError(422, f"inputs[{i}]: lone surrogate at {e.start}; send valid Unicode") from e
        if len(text) > endpoint.limits.max_text_chars:
            raise ApiError(
                413,
                f"inputs[{i}] is {len(text)} characters long; at most {endpoint.limits.max_text_chars} "
                "(--max-text-chars)",
            )
    return texts


class TextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr] = Field(
        description="a text, or a list of texts; for sentence-pair models a tab separates the two texts"
    )


@register_endpoint("classify")
class TextPredict(Endpoint):
    """``POST /v1/predict`` for text classifiers: label and class probabilities per text."""

    path = "/v1/predict"
    input_kind = "text"
    request_model = TextRequest

    def items(self, request: TextRequest) -> list[str]:
        return checked_texts(self, request.inputs)

    def run(self, items: list[str]) -> list[dict[str, Any]]:
        return self.task.predict(self.model, items, self.device)

    def respond(self, request: TextRequest, results: list[Any]) -> dict[str, Any]:
        return {"predictions": results}

    def warm_up_items(self) -> list[str]:
        return ["warm up"]

    def card(self) -> dict[str, Any]:
        return {"labels": list(self.task.labels)}


@register_endpoint("mlm")
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
