"""Shared fixtures: tiny synthetic data made in tmp folders (tests never read ../shared).

Plain helpers (recipes for this data, a trainer from a recipe, the CLI runner) are in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import FILLER, NEGATIVE, POSITIVE


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small repetitive corpus a tiny GPT can learn quickly."""
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "that is", "the question", "ROMEO:", "JULIET:"]
    lines = [" ".join(rng.choice(words, size=6)) for _ in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def image_npz(tmp_path: Path) -> Path:
    """Four classes of 8x8 images, each a bright bar in a different place: easy to learn."""
    rng = np.random.default_rng(0)
    n = 160
    labels = np.arange(n) % 4
    images = rng.uniform(0, 2, size=(n, 8, 8))
    for i, y in enumerate(labels):
        if y == 0:
            images[i, 1:3, :] += 12
        elif y == 1:
            images[i, 5:7, :] += 12
        elif y == 2:
            images[i, :, 1:3] += 12
        else:
            images[i, :, 5:7] += 12
    path = tmp_path / "bars.npz"
    np.savez(path, x=images.astype(np.float32), y=labels)
    return path


@pytest.fixture
def sentiment_tsv(tmp_path: Path) -> Path:
    """200 rows: filler words around one or two sentiment words; label 1 positive, 0 negative."""
    rng = np.random.default_rng(0)
    lines = ["sentence\tlabel"]
    for i in range(200):
        label = i % 2
        words = list(rng.choice(FILLER, size=rng.integers(2, 12)))
        cue = POSITIVE if label else NEGATIVE
        for _ in range(rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(cue)))
        lines.append(f"{' '.join(words)}\t{label}")
    path = tmp_path / "sentiment.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def public_tokenizer(tmp_path: Path) -> Path:
    """A WordPiece tokenizer.json learned from the word lists alone, not from any training file's sentences:
    what a private run must be given (a tokenizer trained on the private texts is refused)."""
    from tansuo.data import encoder_tokenizer, save_tokenizer

    words = [*FILLER, *POSITIVE, *NEGATIVE]
    tok = encoder_tokenizer("wordpiece", lambda: iter([" ".join(words)] * 3), vocab_size=200)
    path = tmp_path / "public-tokenizer.json"
    save_tokenizer(tok, path)
    return path
