"""Shared fixtures: tiny synthetic data made in tmp folders (tests never read ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


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


def image_recipe(npz: Path, out: Path, **train: object) -> dict:
    return {
        "task": "image",
        "seed": 3,
        "data": {"source": "npz", "path": str(npz), "max_shift": 1},
        "model": {"name": "vit_test"},
        "train": {
            "out_dir": str(out),
            "max_steps": 20,
            "batch_size": 16,
            "lr": 3e-3,
            "log_every": 5,
            **train,
        },
    }


def lm_recipe(text: Path, out: Path, **train: object) -> dict:
    return {
        "task": "lm",
        "seed": 3,
        "data": {"path": str(text), "block_size": 16, "eval_windows": 16},
        "model": {"name": "gpt_test", "overrides": {"dropout": 0.1}},
        "train": {"out_dir": str(out), "max_steps": 12, "batch_size": 4, "lr": 3e-3, "log_every": 2, **train},
    }
