"""Decoding for the ``translate`` task: the settings a recipe's ``data:`` section and a request give, sources
decoded in batches (shortest first, at most :data:`DECODE_ROWS` hypotheses at once, answers in input order),
the n best translations with their scores, and the options of ``tansuo predict`` on translation bundles.

An n-best list is beam search's finished hypotheses of a sentence, best first, cut to ``nbest``
(fairseq's ``--nbest``, Marian's ``--n-best``, transformers' ``num_return_sequences``): at most the beam,
since beam search keeps no more; its first entry is the plain translation. A score is the hypothesis'
log-probability (the sum over its tokens, ``</s>`` included) divided by ``length ** length_penalty``, as
beam search ranks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tansuo.errors import TansuoError

if TYPE_CHECKING:
    from tansuo.models.seq2seq_search import DecodeSettings
    from tansuo.tasks.translate_data import TranslateDataConfig

#: decoding runs at most this many hypotheses (sentences x beam) at once
DECODE_ROWS = 320
T = TypeVar("T")


class TranslatePredictOptions(BaseModel):
    """``tansuo predict -o NAME=VALUE`` for translation bundles."""

    model_config = ConfigDict(extra="forbid")
    beam_size: int | None = Field(None, ge=1, description="beam width, 1 for greedy; default the bundle's")
    max_length: int | None = Field(
        None, ge=1, description="most tokens of a translation; default the bundle's ratio of the source"
    )
    nbest: int | None = Field(
        None, ge=1, description="the n best translations with their scores (at most the beam size)"
    )


def decode_settings(
    data: TranslateDataConfig, beam_size: int, ids: dict[str, int], max_len: int | None = None
) -> DecodeSettings:
    """The decoding settings of a translate task's ``data`` section at ``beam_size`` (the model's bos / eos
    ids in ``ids``; at most ``max_len`` tokens when given)."""
    from tansuo.models.seq2seq_search import DecodeSettings

    return DecodeSettings(
        beam_size=beam_size,
        length_penalty=data.length_penalty,
        max_len_ratio=data.max_len_ratio,
        max_len_extra=data.max_len_extra,
        max_len=max_len,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
    )


def check_nbest(nbest: int, beam_size: int) -> None:
    """Refuse an n-best list longer than the beam (beam search keeps no more hypotheses than that).

    Raises:
        TansuoError: ``nbest`` is above ``beam_size``, saying how to fix it.
    """
    if nbest < 1:
        raise TansuoError(f"nbest must be at least 1, got {nbest}")
    if nbest > beam_size:
        raise TansuoError(
            f"nbest {nbest} is above the beam size {beam_size}: beam search keeps at most beam_size "
            f"hypotheses; ask for fewer, or a wider beam (-o beam_size={nbest})"
        )


def decode_batches(
    model: nn.Module,
    sources: Sequence[list[int]],
    device: torch.device,
    settings: DecodeSettings,
    pad_id: int,
    search: Callable[[nn.Module, torch.Tensor, DecodeSettings], list[T]],
) -> list[T]:
    """``search(model, src, settings)`` over ``sources`` (token ids with ``</s>``), batched shortest first
    with at most :data:`DECODE_ROWS` hypotheses a batch; one result per source, in the order given."""
    rows = max(1, DECODE_ROWS // settings.beam_size)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[Any] = [None] * len(sources)
    model.eval()
    for start in range(0, len(order), rows):
        idx = order[start : start + rows]
        width = max(len(sources[i]) for i in idx)
        src = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            src[row, : len(sources[i])] = torch.tensor(sources[i], dtype=torch.long)
        for i, result in zip(idx, search(model, src.to(device), settings), strict=True):
            out[i] = result
    return out


def nbest_rows(hypotheses: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """An n-best list as answers give it (the ``alternatives`` of a predict row and of a ``/v1/translate``
    answer): ``[{"translation": ..., "score": ...}, ...]``, best first."""
    return [{"translation": text, "score": score} for text, score in hypotheses]


def format_nbest(row: dict[str, Any]) -> str:
    """A prediction row as ``tansuo predict`` prints it and writes it to a text file: the translation, or
    with its ``alternatives`` (``-o nbest=N``) one line per hypothesis, best first:
    ``score<TAB>translation`` (as fairseq's ``H-`` lines)."""
    if "alternatives" not in row:
        return row["translation"]
    return "\n".join(f"{h['score']:.4f}\t{h['translation']}" for h in row["alternatives"])
