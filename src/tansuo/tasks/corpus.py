"""What the token-corpus tasks (``lm``, ``mlm``) share: one text corpus encoded once into a memory-mapped
token file whose leading ``train_fraction`` trains and whose rest validates, a tokenizer saved in the bundle,
and a bundle that re-encodes its corpus into a scratch folder when it is evaluated later.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from tansuo.data import load_tokenizer, save_tokenizer, token_file_is_current, token_splits
from tansuo.errors import DataError
from tansuo.tasks.base import TaskBase

SPLITS = ("train", "val")


class TokenCorpusTask(TaskBase):
    """Base of tasks over one token file. Subclasses say where their corpus is (:meth:`corpus`) and how
    many tokens one example needs (:meth:`window`)."""

    DataConfig: ClassVar[type[BaseModel]]
    unit: ClassVar[str] = "tokens"
    heldout_split: ClassVar[str] = "val"

    def __init__(self, data: Any, seed: int, tokenizer: Any, work_dir: Path | None) -> None:
        self.data, self.seed, self.tokenizer = data, seed, tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self._work_dir = work_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._splits: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> Any:
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = cls.DataConfig.model_validate(info["data"])
        if data_path is not None:
            data = data.model_copy(update={"path": data_path})
        return cls(data, info["seed"], load_tokenizer(bundle_dir / "tokenizer.json"), work_dir=None)

    def corpus(self, work_dir: Path) -> Path:
        """The plain-text file to encode (derived files go to ``work_dir``)."""
        raise NotImplementedError

    def window(self) -> tuple[int, str, int]:
        """Tokens one example needs, and the data field (name, value) that sets it, for error messages."""
        raise NotImplementedError

    def _prepare(self, source: Path | None = None) -> None:
        """Token splits of ``source`` (default: :meth:`corpus`)."""
        if self._work_dir is None:  # loaded from a bundle: encode into a scratch folder on first use
            self._tmp = tempfile.TemporaryDirectory(prefix=f"tansuo-{self.name}-")
            self._work_dir = Path(self._tmp.name)
        need, field, value = self.window()
        self._splits = token_splits(
            source or self.corpus(self._work_dir),
            self.tokenizer,
            self._work_dir / "tokens.bin",
            self.data.train_fraction,
            need=need,
            field=field,
            value=value,
        )

    def _split(self, split: str) -> np.ndarray:
        if self._splits is None:
            self._prepare()
        assert self._splits is not None
        if split not in SPLITS:
            raise DataError(f"the {self.name} task has splits 'train' and 'val', not {split!r}")
        return self._splits[0] if split == "train" else self._splits[1]

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return None  # windows are sampled at random: no epochs

    def context_length(self) -> int | None:
        return self.window()[2]  # block_size (lm), max_seq_len (mlm)

    def save_assets(self, bundle_dir: Path) -> None:
        save_tokenizer(self.tokenizer, bundle_dir / "tokenizer.json")

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return (model.example_input(batch_size, seq_len=seq_len),)


def tokens_are_current(source: Path, tokens_path: Path, tokenizer: Any) -> bool:
    """Whether ``tokens_path`` holds ``source`` encoded with ``tokenizer`` (so it can be reused)."""
    return token_file_is_current(source, tokens_path, tokenizer.get_vocab_size(), tokenizer=tokenizer)
