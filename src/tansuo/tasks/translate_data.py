"""The ``data:`` section of a ``translate`` recipe and reading its splits: aligned line files or pair tables
(:mod:`tansuo.data.parallel`), val and test cut from train by ``splits`` (seeded) where not given, and with
``scrub_pii`` both sides of every split scrubbed of personal data (:mod:`tansuo.data.pii`, as ``classify``
does), the count per type reported."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from tansuo.data import split_indices
from tansuo.data.parallel import ParallelText, read_parallel
from tansuo.data.pii import SCRUB_HELP, Scrubber, ScrubTypes
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATA_HINT = "set data.train to a prefix of aligned line files (train for train.de + train.en) or a pair table"


class TranslateDataConfig(BaseModel):
    """The ``data:`` section of a ``translate`` recipe."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    path_fields: ClassVar[tuple[str, ...]] = ("path", "train", "val", "test")

    train: str | None = Field(
        None,
        validation_alias=AliasChoices("train", "path"),
        description="training pairs: a prefix of line files (train: train.de + train.en) or a table",
    )
    val: str | None = Field(None, description="validation pairs, as train; None: cut from train by splits")
    test: str | None = Field(
        None, description="test pairs, as train; None: cut from train when val is not given"
    )
    src_lang: str = Field("de", min_length=1, description="source language: file suffix and table column")
    tgt_lang: str = Field("en", min_length=1, description="target language: file suffix and table column")
    source_column: str | None = Field(None, description="a table's source column; None: src_lang")
    target_column: str | None = Field(None, description="a table's target column; None: tgt_lang")
    format: Literal["lines", "csv", "tsv", "jsonl"] | None = Field(
        None, description="None: a table when the file ends in .csv/.tsv/.jsonl, else line files"
    )
    splits: tuple[float, float, float] = Field(
        (0.9, 0.05, 0.05), description="train/val/test fractions, used when val is not given"
    )
    tokenizer: str = Field(
        "bpe", description="bpe or unigram (a joint vocabulary trained here), or a tokenizer.json"
    )
    vocab_size: int = Field(8000, ge=100, description="size of a trained vocabulary, special tokens included")
    lowercase: bool = Field(False, description="lower-case all text (vocabulary, training and references)")
    max_len: int = Field(128, ge=4, description="tokens per side: longer training pairs are left out")
    batch_tokens: int | None = Field(
        None, gt=0, description="tokens per training batch (padding included); None: train.batch_size pairs"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="of the training loss (Szegedy et al. 2016)")
    beam_size: int = Field(5, ge=1, description="beam of test evaluation and predictions (1: greedy)")
    eval_beam_size: int = Field(1, ge=1, description="beam of validation during training (1: greedy, fast)")
    length_penalty: float = Field(1.0, ge=0, description="beam scores are divided by length ** this")
    max_len_ratio: float = Field(
        1.5, ge=0, description="a translation has at most ratio * source + extra tokens"
    )
    max_len_extra: int = Field(10, ge=0, description="see max_len_ratio")
    scrub_pii: ScrubTypes = Field([], description=SCRUB_HELP + " (source and target sides)")

    @field_validator("splits")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"the three fractions must be positive and sum to 1 (they sum to {sum(v):.4f})")
        return v


def case_text(text: str, data: TranslateDataConfig) -> str:
    return text.lower() if data.lowercase else text


def _read(data: TranslateDataConfig, path: str | None) -> ParallelText:
    if path is None:
        raise DataError(f"data.train is not set; {DATA_HINT}")
    return read_parallel(
        path,
        data.src_lang,
        data.tgt_lang,
        source_column=data.source_column,
        target_column=data.target_column,
        format=data.format,
    )


def _subset(text: ParallelText, idx: np.ndarray) -> ParallelText:
    return ParallelText([text.sources[i] for i in idx], [text.targets[i] for i in idx], text.origin)


def read_splits(data: TranslateDataConfig, seed: int) -> tuple[dict[str, ParallelText], dict[str, Any]]:
    """Each split's pairs (val and test cut from train by ``data.splits`` where not given); with
    ``data.scrub_pii`` both sides scrubbed, and the report of it (the count per type)."""
    texts = _split_texts(data, seed)
    if not data.scrub_pii:
        return texts, {}
    scrub = Scrubber(data.scrub_pii)
    for name, text in texts.items():
        texts[name] = ParallelText(scrub.scrub_all(text.sources), scrub.scrub_all(text.targets), text.origin)
    counts = {t: scrub.counts.get(t, 0) for t in scrub.types}
    logger.info("scrubbed %s: %s", data.train, ", ".join(f"{n} {t}" for t, n in counts.items()))
    return texts, {"pii_scrubbed": counts}


def _split_texts(data: TranslateDataConfig, seed: int) -> dict[str, ParallelText]:
    train = _read(data, data.train)
    if data.val is not None:
        out = {"train": train, "val": _read(data, data.val)}
        if data.test is not None:
            out["test"] = _read(data, data.test)
        return out
    if data.test is None:
        parts = split_indices(len(train), data.splits, seed)
        return {name: _subset(train, idx) for name, idx in zip(SPLITS, parts, strict=True)}
    a, b, _ = data.splits
    parts = split_indices(len(train), (a / (a + b), b / (a + b)), seed)
    out = {name: _subset(train, idx) for name, idx in zip(("train", "val"), parts, strict=True)}
    out["test"] = _read(data, data.test)
    return out
