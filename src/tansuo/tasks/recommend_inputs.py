"""What a person gives a ``recommend`` bundle and gets back: histories as item ids or titles, the top items
with their scores and probabilities, candidates scored, and the printed lines. Shared by ``predict`` and the
server's ``POST /v1/recommend``."""

from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tansuo.errors import DataError

if TYPE_CHECKING:
    from tansuo.tasks.recommend import RecommendTask


class UnknownItems(DataError):
    """Items of a history or candidate list that the bundle does not know (``names`` lists them)."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


def split_history(text: str | list[str]) -> list[str]:
    """The items of a history: a list, a JSON list, or a string split on ``|`` when it holds one (titles
    such as "Usual Suspects, The (1995)" hold commas), else on commas."""
    if isinstance(text, list):
        return [str(t).strip() for t in text if str(t).strip()]
    text = text.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"the history {text!r} starts like a JSON list but is not one ({e.msg})"
            ) from None
        return split_history([str(t) for t in parsed])
    parts = text.split("|") if "|" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def item_index(task: RecommendTask, names: list[str], where: str) -> list[int]:
    """Indices of items given by raw id or (case-insensitively) by title.

    Raises:
        UnknownItems: Naming every unknown item, with the closest titles for the first.
    """
    out, unknown = [], []
    for name in names:
        index = task.index.get(name, task.by_title.get(name.casefold()))
        if index is None:
            unknown.append(name)
        else:
            out.append(index)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(task.titles.values()), n=3, cutoff=0.5)
        hint = f" (closest titles: {close})" if close else ""
        raise UnknownItems(
            f"{where}: unknown item{'s' if len(unknown) > 1 else ''} {unknown}{hint}; give item ids of the "
            f"training data or exact titles",
            unknown,
        )
    return out


def parse_history(task: RecommendTask, text: str | list[str], where: str) -> list[int]:
    """A history (or candidate list) as item indices; see :func:`split_history` and :func:`item_index`."""
    names = split_history(text)
    if not names:
        raise DataError(f"{where} is empty; give item ids or titles separated by commas, e.g. 50,172,133")
    return item_index(task, names, where)


def describe(task: RecommendTask, index: int, score: float, probability: float) -> dict[str, Any]:
    row: dict[str, Any] = {"item": task.items[index - 1], "score": score, "probability": probability}
    title = task.title(index)
    if title is not None:
        row["title"] = title
    return row


@torch.no_grad()
def score_histories(
    task: RecommendTask, model: nn.Module, histories: list[list[int]], device: torch.device
) -> torch.Tensor:
    """The model's scores ``(B, V)`` of every item as the next one after each history (cut to its last
    ``max_len`` items), in one call of the model."""
    from tansuo.tasks.recommend import left_pad

    model.eval()
    cut = [h[-task.data.max_len :] for h in histories]
    return model.next_item_scores(left_pad(cut).to(device)).float().cpu()


def answer(
    task: RecommendTask,
    scores: torch.Tensor,
    history: list[int],
    k: int,
    candidates: list[int] | None,
    exclude_seen: bool,
) -> dict[str, Any]:
    """From one history's scores ``(V,)``: ``items``, the top ``k`` (item, title, score, probability: the
    softmax over the items that may be recommended, padding and with ``exclude_seen`` the history's items
    left out), ties in item order as the metrics rank them; given ``candidates``, each one's score and
    probability of being picked next (0 for a seen item with ``exclude_seen``)."""
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    allowed = scores.clone()
    allowed[0] = float("-inf")
    if exclude_seen:
        allowed[history] = float("-inf")
    logp = allowed.log_softmax(dim=-1)
    order = logp.sort(descending=True, stable=True).indices[:k].tolist()  # ties: lower item index first
    top = [j for j in order if logp[j] > float("-inf")]
    row: dict[str, Any] = {
        "history": [task.items[j - 1] for j in history],
        "items": [describe(task, j, float(scores[j]), float(logp[j].exp())) for j in top],
    }
    if candidates is not None:
        row["candidates"] = [describe(task, j, float(scores[j]), float(logp[j].exp())) for j in candidates]
    return row


def recommend(
    task: RecommendTask,
    model: nn.Module,
    inputs: list[Any],
    histories: list[list[int]],
    device: torch.device,
    k: int,
    candidates: list[int] | None,
    exclude_seen: bool,
) -> list[dict[str, Any]]:
    """One row per history (see :func:`answer`), with its ``input``."""
    scores = score_histories(task, model, histories, device)
    return [
        {"input": text, **answer(task, scores[i], history, k, candidates, exclude_seen)}
        for i, (text, history) in enumerate(zip(inputs, histories, strict=True))
    ]


def format_recommendation(row: dict[str, Any]) -> str:
    """The history, then one line per recommended item (and per candidate) with its probability."""
    lines = [f"history: {', '.join(row['history'])}"]
    for rank, item in enumerate(row["items"], start=1):
        name = f"{item['title']} [{item['item']}]" if "title" in item else item["item"]
        lines.append(f"  {rank:>2}. {name}  p={item['probability']:.4f}  score={item['score']:.3f}")
    for item in row.get("candidates", []):
        name = f"{item['title']} [{item['item']}]" if "title" in item else item["item"]
        lines.append(f"  candidate {name}  p={item['probability']:.4f}")
    return "\n".join(lines)
