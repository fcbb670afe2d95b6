"""Language modelling (``lm``): next-token prediction on a plain-text corpus, as in nanoGPT, or on
instruction data (supervised fine-tuning of a chat model).

Text (``data.format: text``, or ``auto`` with any path not ending in ``.jsonl``): the corpus is encoded once
into a memory-mapped token file (so a corpus of gigabytes never becomes gigabytes of Python objects); the
first ``train_fraction`` of tokens trains, the rest validates. Training batches are random windows of
``block_size`` tokens; validation loss is the mean over ``eval_windows`` random windows drawn with a fixed
seed, so every evaluation (and ``tansuo eval`` later, at any batch size) sees the same windows. nanoGPT's
``estimate_loss`` averages 200 batches of 12 such windows.

Instructions (``data.format: instructions``, or ``auto`` with a ``.jsonl`` path): one conversation a line,
rendered with the chat template and labelled on the assistant's tokens only (:mod:`tansuo.data.instructions`
says how). A seeded ``train_fraction`` of the examples trains, packed into rows of ``block_size`` tokens
(``data.packing``, the default) or one example a row; the rest is held back. An epoch is one pass over the
rows in a seeded order. Evaluation is the mean loss per assistant token over the held-back examples, each in
a row of its own (so no packing neighbour helps), and its perplexity. The chat template is the tokenizer
bundle's (``data.tokenizer`` naming a bundle folder, e.g. an imported SmolLM2) unless ``data.chat`` gives
one; without either, :data:`~tansuo.data.instructions.PLAIN_TEMPLATE` (``role: content`` lines, the answer
ended by ``<|endoftext|>``). The template goes into the bundle, so the fine-tuned model chats.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tansuo.data import (
    decode,
    encode,
    iter_text_chunks,
    lm_batch,
    load_tokenizer,
    save_tokenizer,
    texts_digest,
    trained_once,
)
from tansuo.data.chat import render_chat
from tansuo.data.instructions import (
    IGNORE_INDEX,
    Example,
    Rows,
    chat_in_effect,
    encode_segments,
    fit_length,
    named_tokenizer,
    one_per_row,
    pack,
    render_file,
    trained_tokenizer,
)
from tansuo.data.pii import SCRUB_HELP, ScrubTypes, scrubbed_copy
from tansuo.errors import DataError
from tansuo.tasks.base import GENERATE, Batch, batch_seed, register_task
from tansuo.tasks.corpus import TokenCorpusTask, tokens_are_current

logger = logging.getLogger(__name__)

DATA_HINT = (
    "pass --data PATH to a UTF-8 plain-text file (e.g. tiny shakespeare's input.txt) or a .jsonl file of "
    "instructions"
)


class ChatConfig(BaseModel):
    """A chat template given in the recipe (``data.chat``); each field set replaces the tokenizer bundle's."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(None, description="Jinja chat template, as transformers renders it")
    bos_token: str | None = Field(None, description="the template's bos_token")
    eos_token: str | None = Field(
        None, description="the template's eos_token: the end of the assistant's turn"
    )


class LMDataConfig(BaseModel):
    """The ``data:`` section of an ``lm`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: str | None = Field(
        None, description="plain-text corpus or .jsonl instructions; --data PATH sets it"
    )
    format: Literal["auto", "text", "instructions"] = Field(
        "auto", description="auto: instructions when path ends in .jsonl, else text"
    )
    scrub_pii: ScrubTypes = Field([], description=SCRUB_HELP)
    tokenizer: str = Field(
        "char",
        description="char, bpe, a tokenizer.json, or a bundle folder (its tokenizer and chat template)",
    )
    vocab_size: int = Field(4096, ge=256, description="target vocabulary size for bpe (>= 256 bytes)")
    block_size: int = Field(64, gt=0, description="context length; sets the model's max_seq_len")
    train_fraction: float = Field(
        0.9, gt=0, lt=1, description="text: leading share of tokens; instructions: seeded share of examples"
    )
    eval_windows: int = Field(
        2400, gt=0, description="text: random windows per evaluation (nanoGPT: 200 x 12)"
    )
    packing: bool = Field(True, description="instructions: pack examples into rows of block_size tokens")
    chat: ChatConfig | None = Field(None, description="chat template (else the tokenizer bundle's)")

    def instructions(self) -> bool:
        """Whether the data is instruction JSONL (``format``, or with ``auto`` a ``.jsonl`` path)."""
        if self.format == "auto":
            return self.path is not None and self.path.lower().endswith(".jsonl")
        return self.format == "instructions"


#: most logits (floats) one evaluation forward may produce: 2**27 floats, 512 MB in float32
EVAL_LOGITS_BUDGET = 1 << 27


@register_task
class LMTask(TokenCorpusTask):
    """Next-token prediction with a causal decoder (GPT)."""

    name: ClassVar[str] = "lm"
    DataConfig: ClassVar[type[BaseModel]] = LMDataConfig
    default_metric: ClassVar[str] = "loss"
    abilities: ClassVar[frozenset[str]] = frozenset({GENERATE})

    def __init__(
        self, data: Any, seed: int, tokenizer: Any, work_dir: Path | None, chat: dict[str, Any] | None = None
    ) -> None:
        super().__init__(data, seed, tokenizer, work_dir)
        #: a chat model's template and special tokens ({"template", "bos_token", "eos_token"}), or None
        self.chat = chat
        self._rows: Rows | None = None  # instructions: training rows (packed or not)
        self._heldout: Rows | None = None  # instructions: held-back examples, one a row, shortest first

    # ------------------------------------------------------------ building
    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> LMTask:
        task = super().from_bundle(bundle_dir, data_path)
        task.chat = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8")).get("chat")
        return task

    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> LMTask:
        assert isinstance(data, LMDataConfig)
        work_dir.mkdir(parents=True, exist_ok=True)
        source, report = _input(data, work_dir)
        given, inherited = named_tokenizer(data.tokenizer)
        chat = chat_in_effect(
            inherited, None if data.chat is None else data.chat.model_dump(), plain=data.instructions()
        )
        if data.instructions():
            pieces = render_file(source, chat)
            texts = [text for p in pieces for text, _ in p]
            tokenizer = given or trained_once(  # the same token ids on every rank of a distributed run
                work_dir / "tokenizer.json",
                [data.tokenizer, data.vocab_size, chat, texts_digest(texts)],
                lambda: trained_tokenizer(data.tokenizer, data.vocab_size, iter(texts), chat),
            )
            task = cls(data, seed, tokenizer, work_dir, chat)
            task.data_report = report
            task._prepare_instructions(pieces)
            return task
        tok_path, tokens_path = work_dir / "tokenizer.json", work_dir / "tokens.bin"
        if given is not None:
            tokenizer = given
        elif tok_path.is_file() and tokens_are_current(source, tokens_path, load_tokenizer(tok_path)):
            tokenizer = load_tokenizer(tok_path)  # same corpus as last time: reuse vocabulary and tokens
        else:
            tokenizer = trained_tokenizer(
                data.tokenizer, data.vocab_size, iter_text_chunks(source, hint=DATA_HINT), chat
            )
        save_tokenizer(tokenizer, tok_path)
        task = cls(data, seed, tokenizer, work_dir, chat)
        task.data_report = report
        task._prepare(source)
        return task

    def corpus(self, work_dir: Path) -> Path:
        return _input(self.data, work_dir)[0]

    def window(self) -> tuple[int, str, int]:
        return self.data.block_size + 1, "block_size", self.data.block_size

    def _prepare_instructions(self, pieces: list[list[tuple[str, bool]]] | None = None) -> None:
        """Tokenized, labelled, split and (when ``data.packing``) packed examples of ``data.path``."""
        source = _input(self.data, self._work_dir)[0]
        if pieces is None:  # loaded from a bundle: render with the bundle's template
            pieces = render_file(source, self.chat or {})
        n = len(pieces)
        if n < 2:
            raise DataError(
                f"{source} holds {n} example; at least 2 are needed (one to train, one held back)"
            )
        eos = (self.chat or {}).get("eos_token")
        eos_id = self.tokenizer.token_to_id(eos) if eos else None
        g = torch.Generator().manual_seed(batch_seed(self.seed, 0, salt=27_183))
        order = torch.randperm(n, generator=g).tolist()
        n_train = min(n - 1, max(1, round(self.data.train_fraction * n)))
        block = self.data.block_size
        train = fit_length(
            (encode_segments(pieces[i], self.tokenizer, eos_id) for i in order[:n_train]), block
        )
        held = fit_length(
            (encode_segments(pieces[i], self.tokenizer, eos_id) for i in order[n_train:]), block
        )
        for name, part in (("training", train), ("held-back", held)):
            if not part.examples:
                raise DataError(
                    f"{source}: no {name} example keeps a token of the assistant's answer within "
                    f"data.block_size={block}; raise data.block_size"
                )
        if eos and eos_id is None:
            logger.warning(
                "end-of-turn token %r is not one token of the tokenizer: the model will not learn to stop",
                eos,
            )
        if self.data.packing:
            perm = torch.randperm(len(train.examples), generator=g).tolist()
            self._rows = pack(train.examples, block, perm)
        else:
            self._rows = one_per_row(train.examples, block)
        self._heldout = one_per_row(sorted(held.examples, key=_length), block)
        filled = self._rows.lengths.sum() / (len(self._rows) * block)
        logger.info(
            "%s: %d examples (%d train, %d held back); %d cut to block_size=%d, %d dropped (no answer left); "
            "%d training rows, %.0f%% filled; %d labelled tokens train, %d held back",
            source,
            n,
            len(train.examples),
            len(held.examples),
            train.truncated + held.truncated,
            block,
            train.dropped + held.dropped,
            len(self._rows),
            100 * filled,
            int((self._rows.y != IGNORE_INDEX).sum()),
            int((self._heldout.y != IGNORE_INDEX).sum()),
        )
        if train.truncated + held.truncated:
            logger.warning(
                "%d of %d examples are longer than data.block_size=%d and were cut",
                train.truncated + held.truncated,
                n,
                block,
            )

    def _instruction_rows(self) -> tuple[Rows, Rows]:
        if self._rows is None or self._heldout is None:
            self._prepare_instructions()
        assert self._rows is not None and self._heldout is not None
        return self._rows, self._heldout

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "max_seq_len": self.data.block_size}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        if not self.data.instructions():
            return None  # windows are sampled at random: no epochs
        return math.ceil(len(self._instruction_rows()[0]) / batch_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        if self.data.instructions():
            yield from self._instruction_batches(batch_size, start)
            return
        tokens = self._split("train")
        for n in count(start):
            g = torch.Generator().manual_seed(batch_seed(self.seed, n, salt=12_345))
            x, y = lm_batch(tokens, batch_size, self.data.block_size, g)
            yield {"x": x, "y": y}

    def _instruction_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        """Epochs over the training rows, each in its own seeded order (a pure function of seed and step)."""
        rows = self._instruction_rows()[0]
        per_epoch = math.ceil(len(rows) / batch_size)
        epoch, perm = -1, []
        for n in count(start):
            e, k = divmod(n, per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(batch_seed(self.seed, e, salt=31_415))
                epoch, perm = e, torch.randperm(len(rows), generator=g).numpy()
            yield rows.batch(perm[k * batch_size : (k + 1) * batch_size])

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets = model(batch["x"]).flatten(0, 1), batch["y"].flatten()  # (B * T, V), (B * T,)
        if not self.data.instructions():
            return logits, targets
        keep = targets != IGNORE_INDEX  # the assistant's tokens only
        return logits[keep], targets[keep]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["x"]).flatten(0, 1)  # (B * T, V)
        return F.cross_entropy(logits.float(), batch["y"].flatten(), ignore_index=IGNORE_INDEX)

    def count(self, batch: Batch) -> int:
        if self.data.instructions():
            return int((batch["y"] != IGNORE_INDEX).sum())  # the tokens that count: the assistant's
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        if self.data.instructions():
            return self._evaluate_instructions(model, split, batch_size, device)
        tokens = self._split(split)
        model.eval()
        g = torch.Generator().manual_seed(batch_seed(0, 10**9 + (split == "val"), salt=12_345))
        x, y = lm_batch(tokens, self.data.eval_windows, self.data.block_size, g)  # (N, T) each
        rows = self._rows_per_forward(model, batch_size, x.shape[1])
        total = 0.0
        for i in range(0, len(x), rows):
            chunk = {"x": x[i : i + rows].to(device), "y": y[i : i + rows].to(device)}
            total += self.loss(model, chunk).item() * len(chunk["x"])
        loss = total / len(x)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def _rows_per_forward(self, model: nn.Module, batch_size: int, length: int) -> int:
        """At most ``batch_size``, and fewer when the logits (rows x T x V floats) would pass
        EVAL_LOGITS_BUDGET (a 49k-token vocabulary over 1,024 positions is 200 MB a row)."""
        vocab = getattr(getattr(model, "config", None), "vocab_size", self.vocab_size)
        return max(1, min(batch_size, EVAL_LOGITS_BUDGET // (length * vocab)))

    def _evaluate_instructions(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        """Mean loss per assistant token of the held-back examples, each alone in its row."""
        if split not in ("train", "val"):
            raise DataError(f"the lm task has splits 'train' and 'val', not {split!r}")
        train, heldout = self._instruction_rows()
        rows = heldout if split == "val" else train
        model.eval()
        step = self._rows_per_forward(model, batch_size, self.data.block_size)
        total, tokens = 0.0, 0
        for i in range(0, len(rows), step):
            batch = rows.batch(range(i, min(i + step, len(rows))))
            x, y = batch["x"].to(device), batch["y"].to(device)
            logits = model(x).flatten(0, 1).float()  # (B * T, V)
            total += F.cross_entropy(logits, y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((y != IGNORE_INDEX).sum())
        loss = total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def state(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, **({"chat": self.chat} if self.chat else {})}

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return row["text"]

    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        return [{"prompt": p, "text": self.generate(model, p, device=device)} for p in inputs]

    # ------------------------------------------------------------ chat
    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The conversation rendered with the bundle's chat template, the assistant's turn opened.

        Raises:
            ChatError: The bundle has no template (not a chat model) or the messages are malformed.
        """
        chat = self.chat or {}
        return render_chat(
            chat.get("template"), messages, bos_token=chat.get("bos_token"), eos_token=chat.get("eos_token")
        )

    def reply(
        self,
        model: nn.Module,
        messages: list[dict[str, Any]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The assistant's answer to ``messages``, decoded until the end-of-turn token; ``on_text`` gets
        each new piece of text as it is decoded (streaming)."""
        prompt = self.chat_prompt(messages)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        eos = (self.chat or {}).get("eos_token")
        eos_id = self.tokenizer.token_to_id(eos) if eos else None
        stops = [] if eos_id is None else [eos_id]
        new: list[int] = []
        shown = ""

        def stream(token: torch.Tensor) -> None:
            nonlocal shown
            t = int(token[0, 0])
            if t in stops:
                return
            new.append(t)
            text = self.tokenizer.decode(new)
            if on_text is not None and not text.endswith("\ufffd"):  # a character still being spelled
                on_text(text[len(shown) :])
                shown = text

        g = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        model.generate(
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=g,
            stop_tokens=stops,
            on_token=stream,
        )
        text = self.tokenizer.decode(new)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown) :])
        return text

    # ------------------------------------------------------------ generation
    def timed_call(
        self, model: nn.Module, batch_size: int, seq_len: int, calls: int
    ) -> tuple[str, Callable[[], object]]:
        """One decoding step: each of ``batch_size`` rows feeds one token into a KV cache that holds a
        prompt of ``seq_len`` tokens (fewer if the context is shorter), what every generated token costs
        (a prompt's one-pass prefill is not timed). The cache holds the prompt and up to 64 more positions;
        when they are used it rewinds to the prompt, so every call does the same work."""
        limit = model.config.max_seq_len
        prompt_len = max(1, min(seq_len, limit // 2))
        size = min(limit, prompt_len + 64)
        (prompt,) = self.example_input(model, batch_size, prompt_len)
        token = prompt[:, -1:]
        cache = model.init_cache(batch_size, max_seq_len=size)
        with torch.inference_mode():
            model(prompt, cache)

        def step() -> torch.Tensor:
            if cache[0].length == size:
                for layer in cache:
                    layer.length = prompt_len
            return model(token, cache)

        return "decode step", step

    def generate(
        self,
        model: nn.Module,
        prompt: str,
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> str:
        """Continue ``prompt`` with sampled tokens (KV-cached decoding); returns prompt plus continuation."""
        ids = encode(self.tokenizer, prompt) if prompt else []
        if not ids:
            ids = [0]  # an empty prompt starts from token 0 (a newline for tiny shakespeare, as nanoGPT does)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        g = None
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(seed)
        out = model.generate(
            idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g, top_p=top_p
        )
        text = decode(self.tokenizer, out[0].tolist())
        return text if prompt else text[len(decode(self.tokenizer, ids)) :]


def _length(example: Example) -> int:
    return len(example.ids)


def _input(data: LMDataConfig, work_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """The file to read: ``data.path``, or with ``data.scrub_pii`` its scrubbed copy (and the counts)."""
    source = _source(data.path)
    if not data.scrub_pii:
        return source, {}
    copy, counts = scrubbed_copy(source, data.scrub_pii, work_dir or Path(tempfile.mkdtemp(prefix="tansuo-")))
    return copy, {"pii_scrubbed": counts}


def _source(path: str | None) -> Path:
    if path is None:
        raise DataError(f"data.path is not set; {DATA_HINT}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}; {DATA_HINT}")
    return p
