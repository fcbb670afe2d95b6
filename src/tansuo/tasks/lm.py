"""Language modelling (``lm``): next-token prediction on a plain-text corpus, as in nanoGPT.

The corpus is encoded once into a memory-mapped token file (so a corpus of gigabytes never becomes gigabytes
of Python objects); the first ``train_fraction`` of tokens trains, the rest validates. Training batches are
random windows of ``block_size`` tokens; validation loss is the mean over ``eval_windows`` random windows
drawn with a fixed seed, so every evaluation (and ``tansuo eval`` later, at any batch size) sees the same
windows. nanoGPT's ``estimate_loss`` averages 200 batches of 12 such windows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

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
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from tansuo.data.chat import render_chat
from tansuo.errors import DataError
from tansuo.tasks.base import GENERATE, Batch, batch_seed, register_task
from tansuo.tasks.corpus import TokenCorpusTask, tokens_are_current

DATA_HINT = "pass --data PATH to a UTF-8 plain-text file (e.g. tiny shakespeare's input.txt)"


class LMDataConfig(BaseModel):
    """The ``data:`` section of an ``lm`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = ("path",)

    path: str | None = Field(None, description="plain-text corpus; --data PATH sets it")
    tokenizer: str = Field("char", description="char, bpe, or a path to a tokenizer.json")
    vocab_size: int = Field(4096, ge=256, description="target vocabulary size for bpe (>= 256 bytes)")
    block_size: int = Field(64, gt=0, description="context length; sets the model's max_seq_len")
    train_fraction: float = Field(0.9, gt=0, lt=1, description="leading share of tokens used for training")
    eval_windows: int = Field(2400, gt=0, description="random windows per evaluation (nanoGPT: 200 x 12)")


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

    # ------------------------------------------------------------ building
    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> LMTask:
        task = super().from_bundle(bundle_dir, data_path)
        task.chat = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8")).get("chat")
        return task

    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> LMTask:
        assert isinstance(data, LMDataConfig)
        source = _source(data.path)
        work_dir.mkdir(parents=True, exist_ok=True)
        tok_path, tokens_path = work_dir / "tokenizer.json", work_dir / "tokens.bin"
        if data.tokenizer not in ("char", "bpe"):
            tokenizer = load_tokenizer(data.tokenizer)
        elif tok_path.is_file() and tokens_are_current(source, tokens_path, load_tokenizer(tok_path)):
            tokenizer = load_tokenizer(tok_path)  # same corpus as last time: reuse vocabulary and tokens
        elif data.tokenizer == "char":
            tokenizer = train_char_tokenizer(iter_text_chunks(source, hint=DATA_HINT))
        else:
            tokenizer = train_bpe_tokenizer(iter_text_chunks(source, hint=DATA_HINT), data.vocab_size)
        save_tokenizer(tokenizer, tok_path)
        task = cls(data, seed, tokenizer, work_dir)
        task._prepare(source)
        return task

    def corpus(self, work_dir: Path) -> Path:
        return _source(self.data.path)

    def window(self) -> tuple[int, str, int]:
        return self.data.block_size + 1, "block_size", self.data.block_size

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "max_seq_len": self.data.block_size}

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        tokens = self._split("train")
        for n in count(start):
            g = torch.Generator().manual_seed(batch_seed(self.seed, n, salt=12_345))
            x, y = lm_batch(tokens, batch_size, self.data.block_size, g)
            yield {"x": x, "y": y}

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["x"]).flatten(0, 1), batch["y"].flatten()  # (B * T, V), (B * T,)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, targets = self.logits(model, batch)
        return F.cross_entropy(logits.float(), targets)

    def count(self, batch: Batch) -> int:
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        tokens = self._split(split)
        model.eval()
        g = torch.Generator().manual_seed(batch_seed(0, 10**9 + (split == "val"), salt=12_345))
        x, y = lm_batch(tokens, self.data.eval_windows, self.data.block_size, g)  # (N, T) each
        # rows per forward: at most batch_size, and fewer when the logits (rows x T x V floats) would pass
        # EVAL_LOGITS_BUDGET (a 49k-token vocabulary over 1,024 positions is 200 MB a row)
        vocab = getattr(getattr(model, "config", None), "vocab_size", self.vocab_size)
        rows = max(1, min(batch_size, EVAL_LOGITS_BUDGET // (x.shape[1] * vocab)))
        total = 0.0
        for i in range(0, len(x), rows):
            chunk = {"x": x[i : i + rows].to(device), "y": y[i : i + rows].to(device)}
            total += self.loss(model, chunk).item() * len(chunk["x"])
        loss = total / len(x)
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


def _source(path: str | None) -> Path:
    if path is None:
        raise DataError(f"data.path is not set; {DATA_HINT}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}; {DATA_HINT}")
    return p
