"""Text classification (``classify``): a BERT encoder labels a text (or a pair of texts), e.g. sentiment.

Data: CSV, TSV (GLUE / SST-2 layout: header ``sentence<TAB>label``) or JSONL files with a text column, an
optional second text column and a label column (see :mod:`tansuo.data.textsets`). With only ``train`` given,
it is split once with a seeded permutation into train/val/test by ``splits``; with ``train`` and ``test``,
val is cut from train by the first two fractions; with ``train`` and ``val``, there is no test split and
``tansuo eval`` uses val. The label names are the sorted labels of the training split; a val/test label the
training split lacks is an error naming its file and line, and so is an empty text.

Texts are encoded once with a BERT-style tokenizer (WordPiece or byte-level BPE trained on the training
split, or a given ``tokenizer.json`` / ``vocab.txt``) into ``[CLS] a [SEP] (b [SEP])``, truncated to
``max_seq_len`` tokens (the number of cut texts is logged per split and kept in ``truncated``).
Training batches are bucketed by length to waste little on padding: each epoch shuffles the examples, cuts
them into chunks of ``50 * batch_size``, sorts each chunk by length, cuts it into batches and shuffles the
batches, all seeded by ``(seed, epoch)``; so batch ``n`` is a pure function of ``(seed, n)`` and every
example is seen once an epoch. Batches are padded to their longest text.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from tokenizers import Tokenizer
from torch import nn

from tansuo.data import (
    TRAINED_ENCODER_TOKENIZERS,
    LabelledRow,
    encoder_tokenizer,
    iter_labelled_rows,
    load_tokenizer,
    save_tokenizer,
    split_indices,
    texts_digest,
    trained_once,
)
from tansuo.data.pii import SCRUB_HELP, Scrubber, ScrubTypes
from tansuo.errors import DataError
from tansuo.tasks.base import EXAMPLES, ONNX, Batch, TaskBase, batch_seed, format_probabilities, register_task
from tansuo.tasks.metrics import classifier_metrics

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: training batches are sorted by length within chunks of this many batches
BUCKET_BATCHES = 50
PREDICT_BATCH = 64
#: prediction runs texts sorted by length in calls of at most this many tokens (padding included): on a CPU,
#: short calls of similar lengths are 1.8x faster per text than one padded call of 32 SST-2 sentences
PREDICT_TOKENS = {"cpu": 256}
PREDICT_TOKENS_OTHER = 16384
DATA_HINT = "pass --data PATH to a .csv, .tsv or .jsonl file of labelled texts (e.g. SST-2's train.tsv)"


class ClassifyDataConfig(BaseModel):
    """The ``data:`` section of a ``classify`` recipe."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = ("path", "train", "val", "test")

    train: str | None = Field(
        None,
        validation_alias=AliasChoices("train", "path"),
        description="training file (.csv/.tsv/.jsonl); --data PATH sets it (data.path is an alias)",
    )
    val: str | None = Field(None, description="validation file; None: cut from train by splits")
    test: str | None = Field(None, description="test file; None: cut from train when val is not given")
    text_column: str = Field("sentence", description="column (or JSON key) holding the text")
    text_pair_column: str | None = Field(None, description="column holding a second text, for pair tasks")
    label_column: str = Field("label", description="column holding the label")
    format: str | None = Field(None, description="csv, tsv or jsonl; None: from each file's extension")
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test fractions, used when val is not given"
    )
    tokenizer: str = Field(
        "wordpiece",
        description="wordpiece or bpe (trained here), or a tokenizer.json / vocab.txt / folder holding one",
    )
    vocab_size: int = Field(8000, gt=5, description="target vocabulary size of a trained tokenizer")
    max_seq_len: int = Field(
        128, ge=4, description="longest encoding in tokens (longer texts are cut); at most the model's"
    )
    lowercase: bool = Field(True, description="lower-case texts (WordPiece training and vocab.txt)")
    scrub_pii: ScrubTypes = Field([], description=SCRUB_HELP)
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="training loss against (1 - e) * one-hot + e / classes; 0 turns it off"
    )

    @field_validator("splits")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"the three fractions must be positive and sum to 1 (they sum to {sum(v):.4f})")
        return v

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        if v is not None and v not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"must be csv, tsv or jsonl (got {v!r})")
        return v


class _Encoded:
    """One split, encoded: token ids, segment ids and label ids per example."""

    def __init__(self, ids: list[list[int]], types: list[list[int]], labels: list[int]) -> None:
        self.ids, self.types = ids, types
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.lengths = np.array([len(i) for i in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


@register_task
class ClassifyTask(TaskBase):
    """Label texts (or text pairs) with one of a fixed set of classes, using a BERT encoder."""

    name: ClassVar[str] = "classify"
    DataConfig: ClassVar[type[BaseModel]] = ClassifyDataConfig
    default_metric: ClassVar[str] = "accuracy"
    unit: ClassVar[str] = "samples"
    #: the class default; each instance says "val" when it has no test split (train and val files only)
    heldout_split: ClassVar[str] = "test"
    abilities: ClassVar[frozenset[str]] = frozenset({ONNX, EXAMPLES})

    def __init__(self, data: ClassifyDataConfig, seed: int, tokenizer: Tokenizer, labels: list[str]) -> None:
        self.data, self.seed, self.tokenizer, self.labels = data, seed, tokenizer, labels
        self.label_ids = {label: i for i, label in enumerate(labels)}
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=data.max_seq_len)
        has_test = data.test is not None or data.val is None
        self.heldout_split = "test" if has_test else "val"  # type: ignore[misc]
        self.splits = SPLITS if has_test else ("train", "val")
        self._encoded: dict[str, _Encoded] | None = None
        self.truncated: dict[str, int] = {}  # texts cut to max_seq_len, per split (once encoded)

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> ClassifyTask:
        assert isinstance(data, ClassifyDataConfig)
        rows, report = _read_splits(data, seed)
        train = rows["train"][1]
        if not train:
            raise DataError(f"{rows['train'][0]}: the training split is empty; {DATA_HINT}")
        labels = sorted({row.label for row in train})
        work_dir.mkdir(parents=True, exist_ok=True)
        texts = [t for row in train for t in (row.text, row.pair) if t]
        tokenizer = trained_once(  # the same token ids on every rank of a distributed run
            work_dir / "tokenizer.json",
            [data.tokenizer, data.vocab_size, data.lowercase, texts_digest(texts)],
            lambda: encoder_tokenizer(
                data.tokenizer, lambda: iter(texts), data.vocab_size, lowercase=data.lowercase
            ),
        )
        task = cls(data, seed, tokenizer, labels)
        task.data_report = report
        if data.tokenizer in TRAINED_ENCODER_TOKENIZERS:
            task.training_statistics = (
                f"its {data.tokenizer} tokenizer is trained on the training texts (a rare word there can "
                "become a token); give data.tokenizer a tokenizer learned from public text (a pretrained "
                "model's folder, a tokenizer.json or vocab.txt)"
            )
        task._encode_all(rows)
        return task

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> ClassifyTask:
        """Rebuild from a bundle; the data is read only when :meth:`evaluate` or training needs it.

        ``data_path`` says where the data lives now: a folder holds the ``train`` / ``val`` / ``test`` files
        under their old file names (the data moved); a file replaces ``train`` (as ``--data`` does when
        training), so the same seeded split of it is rebuilt.
        """
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = ClassifyDataConfig.model_validate(info["data"])
        if data_path is not None:
            moved = Path(data_path).expanduser()
            if moved.is_dir():
                update = {k: str(moved / Path(v).name) for k in SPLITS if (v := getattr(data, k)) is not None}
            else:
                update = {"train": str(moved)}
            data = data.model_copy(update=update)
        return cls(data, info["seed"], load_tokenizer(bundle_dir / "tokenizer.json"), info["labels"])

    def _encode_all(self, rows: dict[str, tuple[Path, list[LabelledRow]]]) -> None:
        encoded = {}
        for split in self.splits:
            source, part = rows[split]
            if not part:
                raise DataError(f"{source}: the {split} split is empty; use more data or change data.splits")
            encoded[split] = self._encode_rows(source, split, part)
        self._encoded = encoded

    def _encode_rows(self, source: Path, split: str, rows: list[LabelledRow]) -> _Encoded:
        for row in rows:
            if row.label not in self.label_ids:
                raise DataError(
                    f"{source}:{row.line}: label {row.label!r} does not occur in the training split "
                    f"(labels {self.labels}); fix the label or add training examples of it"
                )
        empty = [row.line for row in rows if not row.text.strip()]
        if empty:
            more = f" (and {len(empty) - 1} more rows)" if len(empty) > 1 else ""
            raise DataError(
                f"{source}:{empty[0]}: the text ({self.data.text_column!r}) is empty{more}; "
                "remove such rows or fill them in"
            )
        if self.data.text_pair_column is None:
            encodings = self.tokenizer.encode_batch([row.text for row in rows])
        else:
            encodings = self.tokenizer.encode_batch([(row.text, row.pair or "") for row in rows])
        truncated = sum(1 for e in encodings if e.overflowing)
        if truncated:
            logger.info(
                "%s (%s): %d of %d texts were cut to max_seq_len=%d tokens",
                source,
                split,
                truncated,
                len(rows),
                self.data.max_seq_len,
            )
        self.truncated[split] = truncated
        return _Encoded(
            [e.ids for e in encodings],
            [e.type_ids for e in encodings],
            [self.label_ids[row.label] for row in rows],
        )

    def _split(self, split: str) -> _Encoded:
        if split not in self.splits:
            raise DataError(f"this classify task has splits {self.splits}, not {split!r}")
        if self._encoded is None:
            self._encode_all(_read_splits(self.data, self.seed)[0])
        assert self._encoded is not None
        return self._encoded[split]

    def _collate(self, part: _Encoded, idx: list[int] | np.ndarray) -> Batch:
        """Pad the examples ``idx`` of ``part`` to the longest among them."""
        idx = [int(i) for i in idx]
        width = max(1, max(int(part.lengths[i]) for i in idx))
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = int(part.lengths[i])
            ids[row, :n] = torch.tensor(part.ids[i], dtype=torch.long)
            types[row, :n] = torch.tensor(part.types[i], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "y": part.labels[idx]}

    def epoch_order(self, batch_size: int, epoch: int) -> list[np.ndarray]:
        """The training batches (example indices) of one epoch, bucketed by length (see the module doc)."""
        part = self._split("train")
        g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, salt=31))
        perm = torch.randperm(len(part), generator=g).numpy()
        chunk = BUCKET_BATCHES * batch_size
        batches = []
        for start in range(0, len(perm), chunk):
            piece = perm[start : start + chunk]
            piece = piece[np.argsort(part.lengths[piece], kind="stable")]
            batches.extend(piece[i : i + batch_size] for i in range(0, len(piece), batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        # not max_seq_len: data.max_seq_len truncates texts, the model's position table only has to cover it
        # (and a pretrained table of 512 positions must keep its shape to load)
        return {"vocab_size": self.tokenizer.get_vocab_size(), "num_classes": len(self.labels)}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return math.ceil(len(self._split("train")) / batch_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        part = self._split("train")
        per_epoch = self.steps_per_epoch(batch_size)
        assert per_epoch is not None
        epoch, batches = -1, []
        for n in count(start):
            e, k = divmod(n, per_epoch)
            if e != epoch:
                epoch, batches = e, self.epoch_order(batch_size, e)
            yield self._collate(part, batches[k])

    # ------------------------------------------------------------ examples (DP-SGD, membership audit)
    def split_size(self, split: str) -> int:
        return len(self._split(split))

    def examples(self, split: str, indices: torch.Tensor, step: int | None = None) -> Batch:
        """Texts ``indices`` of ``split``, padded to the longest of them (no augmentation: ``step`` is
        accepted for the protocol and changes nothing)."""
        return self._collate(self._split(split), indices.tolist())

    def example_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).float(), batch["y"], reduction="none")

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logits(model, batch), batch["y"]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy, label-smoothed as ``data.label_smoothing`` says (training only: evaluation
        reports the plain loss)."""
        logits = self._logits(model, batch).float()
        return F.cross_entropy(logits, batch["y"], label_smoothing=self.data.label_smoothing)

    @staticmethod
    def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
        if limit is not None and batch["input_ids"].shape[1] > limit:
            raise DataError(
                f"texts are encoded to up to {batch['input_ids'].shape[1]} tokens but the model has "
                f"{limit} positions; lower data.max_seq_len or raise model.overrides.max_seq_len"
            )
        return model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"].bool(),
            token_type_ids=batch["token_type_ids"],
        )

    def count(self, batch: Batch) -> int:
        return len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        part = self._split(split)
        model.eval()
        order = np.argsort(part.lengths, kind="stable")
        logits = torch.empty(len(part), len(self.labels))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = {k: v.to(device) for k, v in self._collate(part, idx).items()}
            logits[torch.from_numpy(idx)] = self._logits(model, batch).float().cpu()
        return classifier_metrics(logits, part.labels, self.labels)

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def save_assets(self, bundle_dir: Path) -> None:
        save_tokenizer(self.tokenizer, bundle_dir / "tokenizer.json")

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return format_probabilities(row, top)

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return (model.example_input(batch_size, seq_len=seq_len),)

    @torch.no_grad()
    def read_inputs(self, path: str | Path) -> list[str]:
        """Texts to predict on from a CSV/TSV/JSONL file with the training data's text column(s); labels,
        if present, are ignored. Pairs come back joined by a tab, as `predict` takes them."""
        rows = iter_labelled_rows(
            path,
            text_column=self.data.text_column,
            label_column=None,
            text_pair_column=self.data.text_pair_column,
            format=self.data.format,
        )
        return [r.text if r.pair is None else f"{r.text}\t{r.pair}" for r in rows]

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        """Label each text; for pair tasks a tab in an input separates the two texts."""
        empty = [i for i, text in enumerate(inputs) if not text.strip()]
        if empty:
            raise DataError(f"input {empty[0] + 1} of {len(inputs)} is an empty text; give some words")
        if self.data.text_pair_column is None:
            encodings = self.tokenizer.encode_batch(list(inputs))
        else:
            encodings = self.tokenizer.encode_batch([tuple((t.split("\t", 1) + [""])[:2]) for t in inputs])
        part = _Encoded([e.ids for e in encodings], [e.type_ids for e in encodings], [0] * len(inputs))
        model.eval()
        out: list[dict[str, Any]] = [{} for _ in inputs]
        for idx in _length_chunks(
            part.ids, PREDICT_TOKENS.get(torch.device(device).type, PREDICT_TOKENS_OTHER)
        ):
            batch = {k: v.to(device) for k, v in self._collate(part, idx).items()}
            probs = self._logits(model, batch).float().softmax(-1).cpu()
            for j, p in zip(idx, probs, strict=True):
                top = int(p.argmax())
                out[j] = {
                    "input": inputs[j],
                    "label": self.labels[top],
                    "probability": float(p[top]),
                    "probabilities": {name: float(v) for name, v in zip(self.labels, p, strict=True)},
                }
        return out


def _length_chunks(ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of the texts sorted by length, cut into calls of at most ``PREDICT_BATCH`` texts and
    ``max_tokens`` padded tokens (a text longer than that gets a call of its own)."""
    chunks: list[list[int]] = [[]]
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        current = chunks[-1]
        if current and (len(current) == PREDICT_BATCH or (len(current) + 1) * len(ids[i]) > max_tokens):
            chunks.append([])
        chunks[-1].append(i)
    return [c for c in chunks if c]


def _read(data: ClassifyDataConfig, path: str | None) -> tuple[Path, list[LabelledRow]]:
    if path is None:
        raise DataError(f"data.train is not set; {DATA_HINT}")
    source = Path(path).expanduser()
    rows = list(
        iter_labelled_rows(
            source,
            text_column=data.text_column,
            label_column=data.label_column,
            text_pair_column=data.text_pair_column,
            format=data.format,
        )
    )
    return source, rows


def _read_splits(
    data: ClassifyDataConfig, seed: int
) -> tuple[dict[str, tuple[Path, list[LabelledRow]]], dict[str, Any]]:
    """The rows of each split, with the file they come from (for error messages); with ``data.scrub_pii``
    their texts scrubbed, and the report of it (the count per type)."""
    out = _split_rows(data, seed)
    if not data.scrub_pii:
        return out, {}
    scrub = Scrubber(data.scrub_pii)
    for name, (source, rows) in out.items():
        rows = [r._replace(text=scrub(r.text), pair=r.pair and scrub(r.pair)) for r in rows]
        out[name] = (source, rows)
    counts = {t: scrub.counts.get(t, 0) for t in scrub.types}
    logger.info("scrubbed %s: %s", data.train, ", ".join(f"{n} {t}" for t, n in counts.items()))
    return out, {"pii_scrubbed": counts}


def _split_rows(data: ClassifyDataConfig, seed: int) -> dict[str, tuple[Path, list[LabelledRow]]]:
    source, rows = _read(data, data.train)
    out = {}
    if data.val is not None:
        out["train"] = (source, rows)
        out["val"] = _read(data, data.val)
        if data.test is not None:
            out["test"] = _read(data, data.test)
        return out
    if data.test is None:
        parts = split_indices(len(rows), data.splits, seed)
        for name, idx in zip(SPLITS, parts, strict=True):
            out[name] = (source, [rows[i] for i in idx])
        return out
    a, b, _ = data.splits
    parts = split_indices(len(rows), (a / (a + b), b / (a + b)), seed)
    for name, idx in zip(("train", "val"), parts, strict=True):
        out[name] = (source, [rows[i] for i in idx])
    out["test"] = _read(data, data.test)
    return out
