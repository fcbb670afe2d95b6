"""Machine translation (``translate``): an encoder-decoder Transformer maps a source sentence to a target one.

Data (:mod:`tansuo.data.parallel`, read by :mod:`.translate_data`): each of ``train`` / ``val`` / ``test``
is a prefix of aligned line files (``train`` for ``train.de`` and ``train.en``, the languages from
``src_lang`` / ``tgt_lang``, so ``--set data.src_lang=en --set data.tgt_lang=de`` turns the direction
around) or a CSV / TSV / JSONL table with a source and a target column. Without ``val`` (or ``test``),
they are cut from ``train`` by ``splits``, seeded, as the ``classify`` task does.

One joint subword vocabulary (BPE or unigram, Hugging Face ``tokenizers``) is trained once on both sides of
the training split (:func:`~tansuo.data.trained_once`: every rank and a resumed run read the same one). A
source is its pieces and ``</s>``; the decoder reads ``<s> y`` and predicts ``y </s>``. Training pairs with a
side longer than ``max_len`` tokens are left out (counted in the log); longer sources are cut when
translating.

Batches (fairseq's ``batch_by_size``): the training pairs are ordered once by length (ties in a seeded random
order) and cut into batches of at most ``batch_tokens`` tokens (padding included, the longer side counted)
or, without it, of ``train.batch_size`` pairs; each epoch visits these batches in an order shuffled by
``(seed, epoch)``, so batch ``n`` is a pure function of ``(seed, n)``. The loss is label-smoothed
cross-entropy (``label_smoothing``) over the target tokens.

Evaluation: the teacher-forced loss, then the split translated (greedy on ``val``, ``eval_beam_size``; beam
search on ``test``, ``beam_size``) and scored with sacreBLEU (:func:`~tansuo.tasks.metrics.
translation_metrics`: ``bleu``, ``chrf`` and the tokenized lower-cased ``bleu_tok_lc``).

With ``scrub_pii`` (as ``classify``), both sides of every split have their e-mail addresses, phone numbers
and so on replaced by typed placeholders (``<EMAIL>``) before the vocabulary is trained; the counts are in
the task's ``data_report``. Decoding, n-best lists and the predict options: :mod:`.translate_decode`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tokenizers import Tokenizer
from torch import nn

from tansuo.data import load_tokenizer, save_tokenizer, texts_digest, trained_once
from tansuo.data.parallel import ParallelText, is_table
from tansuo.data.textsets import iter_labelled_rows
from tansuo.data.tokenizers import SUBWORD_KINDS, SUBWORD_SPECIAL_TOKENS, train_subword_tokenizer
from tansuo.errors import DataError
from tansuo.tasks.base import Batch, TaskBase, batch_seed, register_task
from tansuo.tasks.metrics import translation_metrics
from tansuo.tasks.translate_data import SPLITS, TranslateDataConfig, case_text, read_splits
from tansuo.tasks.translate_decode import (
    TranslatePredictOptions,
    check_nbest,
    decode_batches,
    decode_settings,
    format_nbest,
    nbest_rows,
)

logger = logging.getLogger(__name__)


class _Encoded:
    """One split: source ids (with ``</s>``), target ids (without ``<s>`` / ``</s>``), raw targets."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], references: list[str], sources: list[str]):
        self.src, self.tgt, self.references, self.sources = src, tgt, references, sources
        self.src_len = np.array([len(s) for s in src], dtype=np.int64)
        self.tgt_len = np.array([len(t) + 1 for t in tgt], dtype=np.int64)  # with <s> or </s>

    def __len__(self) -> int:
        return len(self.src)


@register_task
class TranslateTask(TaskBase):
    """Translate sentences from ``src_lang`` to ``tgt_lang`` with an encoder-decoder Transformer."""

    name: ClassVar[str] = "translate"
    DataConfig: ClassVar[type[BaseModel]] = TranslateDataConfig
    default_metric: ClassVar[str] = "bleu"
    unit: ClassVar[str] = "tokens"
    heldout_split: ClassVar[str] = "test"
    quality_scale: ClassVar[float] = 100.0  # BLEU is in points already (reports show quality x100)
    PredictOptions: ClassVar[type[BaseModel]] = TranslatePredictOptions

    def __init__(self, data: TranslateDataConfig, seed: int, tokenizer: Tokenizer) -> None:
        self.data, self.seed, self.tokenizer = data, seed, tokenizer
        tokenizer.no_padding()
        tokenizer.no_truncation()
        names = dict(zip(("pad", "unk", "bos", "eos"), SUBWORD_SPECIAL_TOKENS, strict=True))
        ids = {name: tokenizer.token_to_id(token) for name, token in names.items()}
        lacking = [names[k] for k in ("pad", "bos", "eos") if ids[k] is None]
        if lacking:
            raise DataError(
                f"the tokenizer lacks the special tokens {lacking}; train one here (data.tokenizer: bpe)"
            )
        self.ids: dict[str, int] = {k: v for k, v in ids.items() if v is not None}
        has_test = data.test is not None or data.val is None
        self.heldout_split = "test" if has_test else "val"  # type: ignore[misc]
        self.splits = SPLITS if has_test else ("train", "val")
        self._encoded: dict[str, _Encoded] | None = None
        self._batches: dict[int, list[np.ndarray]] = {}

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> TranslateTask:
        assert isinstance(data, TranslateDataConfig)
        texts, report = read_splits(data, seed)
        train = texts["train"]
        work_dir.mkdir(parents=True, exist_ok=True)
        if data.tokenizer in SUBWORD_KINDS:
            both = [case_text(t, data) for t in train.sources + train.targets]
            tokenizer = trained_once(  # the same ids on every rank and after a resume
                work_dir / "tokenizer.json",
                [data.tokenizer, data.vocab_size, data.lowercase, texts_digest(both)],
                lambda: train_subword_tokenizer(iter(both), data.tokenizer, data.vocab_size),
            )
        else:
            tokenizer = load_tokenizer(Path(data.tokenizer).expanduser())
        task = cls(data, seed, tokenizer)
        task.data_report = report
        task._encoded = {split: task._encode(split, texts[split]) for split in task.splits}
        return task

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> TranslateTask:
        """Rebuild from a bundle; the data is read only when evaluation needs it. ``data_path``: a folder
        now holding the split files under their old names, or the training file / prefix."""
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = TranslateDataConfig.model_validate(info["data"])
        if data_path is not None:
            moved = Path(data_path).expanduser()
            if moved.is_dir():
                update = {k: str(moved / Path(v).name) for k in SPLITS if (v := getattr(data, k)) is not None}
            else:
                update = {"train": str(moved)}
            data = data.model_copy(update=update)
        return cls(data, info["seed"], load_tokenizer(bundle_dir / "tokenizer.json"))

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch([case_text(t, self.data) for t in texts])]

    def _encode(self, split: str, text: ParallelText) -> _Encoded:
        if not len(text):
            raise DataError(f"{text.origin}: the {split} split is empty; use more data or change data.splits")
        limit, eos = self.data.max_len, self.ids["eos"]
        src, tgt = self._pieces(text.sources), self._pieces(text.targets)
        keep = range(len(src))
        if split == "train":  # too long to learn from whole: left out, as fairseq skips them
            keep = [i for i in keep if len(src[i]) < limit and len(tgt[i]) < limit]
            if len(keep) < len(src):
                logger.info(
                    "%s: %d of %d training pairs have a side longer than data.max_len=%d tokens; left out",
                    text.origin,
                    len(src) - len(keep),
                    len(src),
                    limit,
                )
        return _Encoded(
            [src[i][: limit - 1] + [eos] for i in keep],
            [tgt[i][: limit - 1] for i in keep],
            [text.targets[i] for i in keep],
            [text.sources[i] for i in keep],
        )

    def size(self, split: str) -> int:
        """How many sentence pairs ``split`` holds (training pairs longer than ``max_len`` left out)."""
        return len(self._split(split))

    def _split(self, split: str) -> _Encoded:
        if split not in self.splits:
            raise DataError(f"this translate task has splits {self.splits}, not {split!r}")
        if self._encoded is None:
            texts = read_splits(self.data, self.seed)[0]
            self._encoded = {s: self._encode(s, texts[s]) for s in self.splits}
        return self._encoded[split]

    # ------------------------------------------------------------ batches
    def _collate(self, part: _Encoded, idx: list[int] | np.ndarray) -> Batch:
        """Sources ``(B, S)`` and decoder inputs / targets ``(B, T)``, padded to the longest."""
        idx = [int(i) for i in idx]
        pad, bos, eos = self.ids["pad"], self.ids["bos"], self.ids["eos"]
        S, T = max(int(part.src_len[i]) for i in idx), max(int(part.tgt_len[i]) for i in idx)
        src = torch.full((len(idx), S), pad, dtype=torch.long)
        tgt_in = torch.full((len(idx), T), pad, dtype=torch.long)
        tgt_out = torch.full((len(idx), T), pad, dtype=torch.long)
        for row, i in enumerate(idx):
            s, t = part.src[i], part.tgt[i]
            src[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            tgt_in[row, : len(t) + 1] = torch.tensor([bos, *t], dtype=torch.long)
            tgt_out[row, : len(t) + 1] = torch.tensor([*t, eos], dtype=torch.long)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}

    def batches(self, batch_size: int) -> list[np.ndarray]:
        """The training batches (pair indices), made once per run (see the module doc)."""
        if batch_size not in self._batches:
            part = self._split("train")
            g = torch.Generator().manual_seed(batch_seed(self.seed, 0, salt=41))
            ties = torch.randperm(len(part), generator=g).numpy()
            longer = np.maximum(part.src_len, part.tgt_len)
            order = ties[np.argsort(longer[ties], kind="stable")]
            out: list[np.ndarray] = []
            budget, start = self.data.batch_tokens, 0
            for end in range(1, len(order) + 1):
                if end == len(order):
                    full = True
                elif budget is None:
                    full = end - start >= batch_size
                else:  # sorted by length: the next pair would be the longest, padding the others to it
                    full = (end - start + 1) * int(longer[order[end]]) > budget
                if full:
                    out.append(order[start:end])
                    start = end
            self._batches[batch_size] = out
        return self._batches[batch_size]

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.get_vocab_size(), "pad_id": self.ids["pad"]}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return len(self.batches(batch_size))

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        part, batches = self._split("train"), self.batches(batch_size)
        epoch, order = -1, []
        for n in count(start):
            e, k = divmod(n, len(batches))
            if e != epoch:
                g = torch.Generator().manual_seed(batch_seed(self.seed, e, salt=43))
                epoch, order = e, torch.randperm(len(batches), generator=g).tolist()
            yield self._collate(part, batches[order[k]])

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        real = batch["tgt_out"] != self.ids["pad"]
        return logits[real], batch["tgt_out"][real]  # (N, V), (N,)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy per target token, label-smoothed as ``data.label_smoothing`` says (training;
        evaluation reports the plain loss)."""
        logits, targets = self.logits(model, batch)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.data.label_smoothing)

    def count(self, batch: Batch) -> int:
        return int((batch["tgt_out"] != self.ids["pad"]).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        """Loss, BLEU, chrF and the tokenized lower-cased BLEU of ``split``: greedy (``eval_beam_size``) on
        val, beam search (``beam_size``) on test."""
        beam = self.data.eval_beam_size if split == "val" else self.data.beam_size
        return self.evaluate_with(model, split, batch_size, device, beam)

    @torch.no_grad()
    def evaluate_with(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device, beam_size: int
    ) -> dict[str, Any]:
        """:meth:`evaluate` at a given beam size (1: greedy)."""
        part = self._split(split)
        model.eval()
        order = np.argsort(part.tgt_len, kind="stable")
        total, tokens = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in self._collate(part, order[i : i + batch_size]).items()}
            logits, targets = self.logits(model, batch)
            total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            tokens += len(targets)
        hypotheses = self._translate_encoded(model, part.src, device, beam_size)
        references = [case_text(t, self.data) for t in part.references]
        return {
            "loss": total / tokens,
            **translation_metrics(hypotheses, references),
            "beam_size": float(beam_size),
        }

    def _translate_encoded(
        self,
        model: nn.Module,
        sources: list[list[int]],
        device: torch.device,
        beam_size: int,
        max_len: int | None = None,
    ) -> list[str]:
        from tansuo.models.seq2seq_search import translate_ids

        settings = decode_settings(self.data, beam_size, self.ids, max_len)
        found = decode_batches(model, sources, device, settings, self.ids["pad"], translate_ids)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in found]

    def _sources(self, texts: list[str]) -> list[list[int]]:
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise DataError(f"input {empty[0] + 1} of {len(texts)} is empty; give a sentence to translate")
        limit, eos = self.data.max_len, self.ids["eos"]
        return [ids[: limit - 1] + [eos] for ids in self._pieces([t.strip() for t in texts])]

    def translate(
        self,
        model: nn.Module,
        texts: list[str],
        device: torch.device,
        beam_size: int | None = None,
        max_len: int | None = None,
    ) -> list[str]:
        """The translation of each text (``beam_size`` None: ``data.beam_size``; at most ``max_len``
        tokens when given, else ``max_len_ratio`` x source + ``max_len_extra``)."""
        sources = self._sources(texts)
        return self._translate_encoded(model, sources, device, beam_size or self.data.beam_size, max_len)

    def translate_nbest(
        self,
        model: nn.Module,
        texts: list[str],
        device: torch.device,
        nbest: int,
        beam_size: int | None = None,
        max_len: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The ``nbest`` best translations of each text with their scores, best first, by beam search at
        ``beam_size`` (None: ``data.beam_size``; at least ``nbest``); the first is :meth:`translate`'s."""
        from tansuo.models.seq2seq_search import beam_search_nbest

        beam = beam_size or self.data.beam_size
        check_nbest(nbest, beam)
        settings = decode_settings(self.data, beam, self.ids, max_len)
        found = decode_batches(
            model, self._sources(texts), device, settings, self.ids["pad"], beam_search_nbest
        )
        decode = self.tokenizer.decode
        return [[(decode(h.ids, skip_special_tokens=True), h.score) for h in hyps[:nbest]] for hyps in found]

    def predict(
        self,
        model: nn.Module,
        inputs: list[str],
        device: torch.device,
        beam_size: int | None = None,
        max_length: int | None = None,
        nbest: int | None = None,
    ) -> list[dict[str, Any]]:
        """Translate each text with beam search (``beam_size`` None: ``data.beam_size``; 1: greedy), at most
        ``max_length`` tokens when given (``tansuo predict -o beam_size=1 -o max_length=40``); with ``nbest``
        also the n best translations and their scores (``-o nbest=3``, at most the beam)."""
        if nbest is None:
            hyps = self.translate(model, inputs, device, beam_size, max_length)
            return [{"input": text, "translation": hyp} for text, hyp in zip(inputs, hyps, strict=True)]
        lists = self.translate_nbest(model, inputs, device, nbest, beam_size, max_length)
        return [
            {"input": text, "translation": hyps[0][0] if hyps else "", "alternatives": nbest_rows(hyps)}
            for text, hyps in zip(inputs, lists, strict=True)
        ]

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return format_nbest(row)

    def read_inputs(self, path: Path) -> list[str]:
        """Sentences to translate: a text file with one a line, or a table's source column."""
        path = Path(path).expanduser()
        if is_table(path, None):
            column = self.data.source_column or self.data.src_lang
            rows = iter_labelled_rows(path, text_column=column, label_column=None)
            texts = [(row.line, row.text) for row in rows]
        else:
            if not path.is_file():
                raise DataError(f"input file not found: {path}; pass a text file with one sentence a line")
            lines = path.read_text(encoding="utf-8").splitlines()
            texts = list(enumerate(lines, start=1))
        for line, text in texts:
            if not text.strip():
                raise DataError(f"{path}:{line}: empty line; remove it or give a sentence to translate")
        return [text.strip() for _, text in texts]

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return model.example_input(batch_size, seq_len=seq_len)

    def timed_call(
        self, model: nn.Module, batch_size: int, seq_len: int, calls: int
    ) -> tuple[str, Callable[[], object]]:
        """What a translation costs, at a fixed amount of work: encode a ``seq_len``-token source, then
        ``seq_len`` greedy decoding steps with the caches (no stop at ``</s>``, so every variant of a model
        does the same number of steps whatever it predicts)."""
        src, tgt = model.example_input(batch_size, seq_len=seq_len)
        steps = min(seq_len, model.config.max_seq_len - 1)

        @torch.inference_mode()
        def call() -> torch.Tensor:
            mask = model.source_mask(src)
            memory = model.encode(src, mask)
            state = model.init_state(batch_size, steps, memory)
            token = tgt[:, :1]
            for _ in range(steps):
                logits = model.step(token, memory, mask, state)
                token = logits.argmax(dim=-1, keepdim=True)
            return logits

        return f"translate: encode {seq_len} tokens, {steps} greedy steps", call

    def save_assets(self, bundle_dir: Path) -> None:
        save_tokenizer(self.tokenizer, bundle_dir / "tokenizer.json")
