"""``POST /v1/recommend`` for recommend bundles: the top ``k`` next items after a history (item ids or
titles), with their scores and probabilities, the history's own items left out unless ``exclude_seen`` is
false, and optionally the probability of each of ``candidates`` being picked next. Histories of concurrent
requests are scored in one call of the model; an unknown item is a 422 naming it."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from tansuo.errors import DataError
from tansuo.serve.endpoints.base import ApiError, Endpoint, register_endpoint
from tansuo.tasks.recommend_inputs import answer, item_index, score_histories, split_history

Names = StrictStr | list[StrictStr | StrictInt]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: Names = Field(
        description="the items, oldest first: item ids or titles, as a list or a comma-separated string"
    )
    k: int = Field(10, ge=1, description="how many items to recommend")
    exclude_seen: bool = Field(True, description="leave the history's items out of the recommendations")
    candidates: Names | None = Field(None, description="items to score as the next one (ids or titles)")


class _Item(NamedTuple):
    history: list[int]
    k: int
    exclude_seen: bool
    candidates: list[int] | None


@register_endpoint("recommend")
class Recommend(Endpoint):
    """``POST /v1/recommend``: the next items for one history."""

    path = "/v1/recommend"
    summary = "Recommend"
    input_kind = "history"
    request_model = RecommendRequest

    def _indices(self, names: StrictStr | list[Any], field: str) -> list[int]:
        listed = split_history(names if isinstance(names, str) else [str(n) for n in names])
        if not listed:
            raise ApiError(422, f"{field} is empty; give item ids or titles")
        if len(listed) > self.limits.max_text_chars:
            raise ApiError(
                413,
                f"{field} has {len(listed)} items; at most {self.limits.max_text_chars} (--max-text-chars)",
            )
        try:
            return item_index(self.task, listed, field)
        except DataError as e:
            raise ApiError(422, str(e)) from None

    def items(self, request: RecommendRequest) -> list[_Item]:
        if request.k > self.task.num_items:
            raise ApiError(
                422, f"k {request.k} is more than the {self.task.num_items} items this model knows"
            )
        history = self._indices(request.history, "history")
        candidates = None if request.candidates is None else self._indices(request.candidates, "candidates")
        return [_Item(history, request.k, request.exclude_seen, candidates)]

    def run(self, items: list[_Item]) -> list[dict[str, Any]]:
        scores = score_histories(self.task, self.model, [item.history for item in items], self.device)
        return [
            answer(self.task, scores[i], item.history, item.k, item.candidates, item.exclude_seen)
            for i, item in enumerate(items)
        ]

    def respond(self, request: RecommendRequest, results: list[Any]) -> dict[str, Any]:
        return results[0]

    def warm_up_items(self) -> list[_Item]:
        return [_Item([1], 1, True, None)]

    def card(self) -> dict[str, Any]:
        return {"items": self.task.num_items, "max_history": self.task.data.max_len}
