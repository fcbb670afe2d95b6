"""Masked language modelling (``mlm``): pre-train a BERT encoder on a plain-text corpus.

The corpus is encoded once into a memory-mapped token file (as the ``lm`` task does) with a BERT WordPiece
tokenizer, trained here on the corpus or given as a ``tokenizer.json`` / ``vocab.txt`` / folder. The first
``train_fraction`` of tokens trains, the rest validates. A training example is a random window of
``max_seq_len - 2`` tokens wrapped as ``[CLS] window [SEP]``, corrupted as BERT does (15% of the tokens
chosen; of those 80% become ``[MASK]``, 10% a random token, 10% stay; :func:`tansuo.data.mask_tokens`).
Batch ``n`` (windows and corruption) is a pure function of ``(seed, n)``. The loss is the cross-entropy of
the MLM head at the chosen positions only; evaluation reports it over ``eval_windows`` fixed windows with a
fixed corruption, with its perplexity and the share of chosen tokens predicted exactly.

A bundle of this task is a pre-trained encoder: fine-tune it with ``model.init_from: BUNDLE`` and
``data.tokenizer: BUNDLE`` in a ``classify`` recipe. ``tansuo predict BUNDLE "a [MASK] film"`` fills masks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer
from torch import nn

from tansuo.atomic import atomic_write_text
from tansuo.data import (
    TRAINED_ENCODER_TOKENIZERS,
    encoder_tokenizer,
    iter_labelled_rows,
    iter_text_chunks,
    lm_batch,
    load_tokenizer,
    mask_tokens,
    save_tokenizer,
)
from tansuo.data.pii import SCRUB_HELP, ScrubTypes, scrubbed_copy
from tansuo.errors import DataError, TansuoError
from tansuo.tasks.base import Batch, batch_seed, register_task
from tansuo.tasks.corpus import TokenCorpusTask, tokens_are_current

DATA_HINT = "pass --data PATH to a UTF-8 plain-text file (any corpus: one document after another)"
IGNORE = -100
TOP_K = 5
_SALT = 4_242


class MLMDataConfig(BaseModel):
    """The ``data:`` section of an ``mlm`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: str | None = Field(
        None, description="plain-text corpus, or a .csv/.tsv/.jsonl file of texts; --data PATH sets it"
    )
    text_column: str = Field("sentence", description="for .csv/.tsv/.jsonl: the column holding the text")
    scrub_pii: ScrubTypes = Field([], description=SCRUB_HELP)
    tokenizer: str = Field(
        "wordpiece",
        description="wordpiece or bpe (trained here), or a tokenizer.json / vocab.txt / folder holding one",
    )
    vocab_size: int = Field(8000, gt=5, description="target vocabulary size of a trained tokenizer")
    lowercase: bool = Field(True, description="lower-case texts (WordPiece training and vocab.txt)")
    max_seq_len: int = Field(128, ge=8, description="tokens per example, [CLS] and [SEP] included")
    train_fraction: float = Field(0.95, gt=0, lt=1, description="leading share of tokens used for training")
    mask_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens chosen for prediction")
    eval_windows: int = Field(512, gt=0, description="fixed windows per evaluation")


@register_task
class MLMTask(TokenCorpusTask):
    """Masked-token prediction with a BERT encoder and its MLM head."""

    name: ClassVar[str] = "mlm"
    DataConfig: ClassVar[type[BaseModel]] = MLMDataConfig
    default_metric: ClassVar[str] = "loss"

    def __init__(self, data: MLMDataConfig, seed: int, tokenizer: Tokenizer, work_dir: Path | None) -> None:
        super().__init__(data, seed, tokenizer, work_dir)
        ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")}
        missing = [t for t, i in ids.items() if i is None and t != "[PAD]"]
        if missing:
            raise DataError(
                f"the tokenizer lacks {missing}; the mlm task needs a BERT WordPiece tokenizer "
                "(data.tokenizer: wordpiece, or a BERT tokenizer.json / vocab.txt)"
            )
        self.cls_id, self.sep_id, self.mask_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.pad_id = ids["[PAD]"] if ids["[PAD]"] is not None else 0

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> MLMTask:
        assert isinstance(data, MLMDataConfig)
        work_dir.mkdir(parents=True, exist_ok=True)
        source = _corpus(data, work_dir)
        report = {"pii_scrubbed": _scrub_counts(data, work_dir)} if data.scrub_pii else {}
        tok_path, tokens_path = work_dir / "tokenizer.json", work_dir / "tokens.bin"
        trained = data.tokenizer in TRAINED_ENCODER_TOKENIZERS
        wanted = [data.tokenizer, data.vocab_size, data.lowercase]
        spec_path = work_dir / "tokenizer-spec.json"
        same = spec_path.is_file() and json.loads(spec_path.read_text(encoding="utf-8")) == wanted
        cached = load_tokenizer(tok_path) if trained and same and tok_path.is_file() else None
        if cached is not None and tokens_are_current(source, tokens_path, cached):
            tokenizer = cached  # same corpus and settings: reuse vocabulary and tokens
        else:
            tokenizer = encoder_tokenizer(
                data.tokenizer,
                lambda: iter_text_chunks(source, hint=DATA_HINT),
                data.vocab_size,
                lowercase=data.lowercase,
            )
        save_tokenizer(tokenizer, tok_path)
        atomic_write_text(spec_path, json.dumps(wanted))
        task = cls(data, seed, tokenizer, work_dir)
        task.data_report = report
        task._prepare(source)
        return task

    def corpus(self, work_dir: Path) -> Path:
        return _corpus(self.data, work_dir)

    def window(self) -> tuple[int, str, int]:
        # a window of max_seq_len - 2 tokens, plus lm_batch's one more
        return self.data.max_seq_len - 1, "max_seq_len", self.data.max_seq_len

    def _batch(self, tokens: np.ndarray, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` random windows as ``[CLS] window [SEP]``, corrupted; all from ``generator``."""
        window, _ = lm_batch(tokens, batch_size, self.data.max_seq_len - 2, generator)  # (B, T-2)
        B = window.shape[0]
        ids = torch.cat(
            [torch.full((B, 1), self.cls_id), window, torch.full((B, 1), self.sep_id)], dim=1
        )  # (B, T)
        special = torch.zeros_like(ids, dtype=torch.bool)
        special[:, 0] = special[:, -1] = True
        corrupted, labels = mask_tokens(
            ids,
            mask_token_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_mask=special,
            generator=generator,
            probability=self.data.mask_probability,
            ignore_index=IGNORE,
        )
        return {"input_ids": corrupted, "labels": labels}

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        # not max_seq_len: a pretrained table of 512 positions must keep its shape to load; _features checks
        return {"vocab_size": self.vocab_size, "num_classes": 0}  # no classification head to train

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        tokens = self._split("train")
        for n in count(start):
            g = torch.Generator().manual_seed(batch_seed(self.seed, n, salt=_SALT))
            yield self._batch(tokens, batch_size, g)

    def _scores(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM logits ``(N, V)`` at the N chosen positions, and their labels ``(N,)``."""
        if not hasattr(model, "mlm_logits"):
            raise TansuoError(
                f"the mlm task needs a BERT-family model with an MLM head (see `tansuo models`), "
                f"not {getattr(model, 'model_name', type(model).__name__)!r}"
            )
        ids = batch["input_ids"]
        limit = model.config.max_seq_len
        if ids.shape[1] > limit:
            raise DataError(
                f"examples are {ids.shape[1]} tokens long but the model has {limit} positions; lower "
                "data.max_seq_len or raise model.overrides.max_seq_len"
            )
        features = model.forward_features(ids)  # (B, T, C); windows are full, nothing is padding
        chosen = batch["labels"] != IGNORE  # (B, T)
        return model.mlm_logits(features[chosen]), batch["labels"][chosen]  # only where it is scored

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scores(model, batch)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, labels = self._scores(model, batch)
        if labels.numel() == 0:  # nothing chosen in this batch (tiny batches only): a zero loss, no NaN
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels)

    def count(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        tokens = self._split(split)
        model.eval()
        g = torch.Generator().manual_seed(batch_seed(0, 10**9 + (split == "val"), salt=_SALT))
        batch = self._batch(tokens, self.data.eval_windows, g)  # the same windows and masks every time
        total, correct, n = 0.0, 0, 0
        for i in range(0, self.data.eval_windows, batch_size):
            chunk = {k: v[i : i + batch_size].to(device) for k, v in batch.items()}
            logits, labels = self._scores(model, chunk)
            total += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            n += labels.numel()
        loss = total / max(1, n)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(1, n)}

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        lines = [f"{row['input']}  ->  {row['text']}"]
        for i, candidates in enumerate(row["masks"], 1):
            shown = "  ".join(f"{c['token']}: {c['probability']:.3f}" for c in candidates[:top])
            lines.append(f"  [MASK] {i}: {shown}")
        return "\n".join(lines)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        """Fill each ``[MASK]`` of each text: the top tokens and their probabilities, per mask."""
        model.eval()
        out = []
        for text in inputs:
            ids = self.tokenizer.encode(text).ids
            positions = [i for i, t in enumerate(ids) if t == self.mask_id]
            if not positions:
                raise DataError(f"{text!r} has no [MASK]; write [MASK] where a word should be predicted")
            if len(ids) > model.config.max_seq_len:
                raise DataError(
                    f"{text[:40]!r}... is {len(ids)} tokens long; the model takes {model.config.max_seq_len}"
                )
            x = torch.tensor([ids], dtype=torch.long, device=device)
            probs = model.mlm_logits(model.forward_features(x)[0, positions]).float().softmax(-1).cpu()
            masks = []
            for p in probs:
                top = p.topk(min(TOP_K, len(p)))
                masks.append(
                    [
                        {"token": self.tokenizer.id_to_token(int(i)), "probability": float(v)}
                        for v, i in zip(top.values, top.indices, strict=True)
                    ]
                )
            filled = list(ids)
            for pos, candidates in zip(positions, masks, strict=True):
                filled[pos] = self.tokenizer.token_to_id(candidates[0]["token"])
            out.append(
                {
                    "input": text,
                    "text": self.tokenizer.decode(filled, skip_special_tokens=True),
                    "masks": masks,
                }
            )
        return out


def _scrub_counts(data: MLMDataConfig, work_dir: Path) -> dict[str, int]:
    return scrubbed_copy(_source(data.path), data.scrub_pii, work_dir)[1]  # the copy _corpus made


def _corpus(data: MLMDataConfig, work_dir: Path) -> Path:
    """The plain-text corpus: ``data.path`` itself, or for a table of texts, its text column written to
    ``work_dir/corpus.txt`` one text per line (rewritten only when the table is newer); with
    ``data.scrub_pii``, of the file's scrubbed copy."""
    source = _source(data.path)
    if data.scrub_pii:
        source = scrubbed_copy(source, data.scrub_pii, work_dir)[0]
    if source.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        return source
    corpus = work_dir / "corpus.txt"
    if corpus.is_file() and corpus.stat().st_mtime >= source.stat().st_mtime:
        recorded = corpus.with_suffix(".json")
        if recorded.is_file() and json.loads(recorded.read_text()) == [str(source), data.text_column]:
            return corpus
    rows = iter_labelled_rows(source, text_column=data.text_column, label_column=None)
    atomic_write_text(corpus, "".join(" ".join(row.text.split()) + "\n" for row in rows))
    atomic_write_text(corpus.with_suffix(".json"), json.dumps([str(source), data.text_column]))
    return corpus


def _source(path: str | None) -> Path:
    if path is None:
        raise DataError(f"data.path is not set; {DATA_HINT}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}; {DATA_HINT}")
    return p
