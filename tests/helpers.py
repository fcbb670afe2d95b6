"""Plain helpers the tests share: tiny recipes, data writers, a task or trainer from a recipe, the command
line as a user runs it, ports and browsers. Fixtures (the synthetic data files they point at) are in
``tests/conftest.py``; tests import these from here, never from each other."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tansuo.recipe import Recipe, validate_recipe
from tansuo.tasks import TASKS, Task
from tansuo.train.setup import build_run
from tansuo.train.trainer import Trainer

# ------------------------------------------------------------------------------------------------ recipes


def image_recipe(npz: Path, out: Path, **train: object) -> dict:
    """A tiny ViT on the four-class bars of the ``image_npz`` fixture."""
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
    """A tiny GPT on the ``text_file`` fixture's corpus."""
    return {
        "task": "lm",
        "seed": 3,
        "data": {"path": str(text), "block_size": 16, "eval_windows": 16},
        "model": {"name": "gpt_test", "overrides": {"dropout": 0.1}},
        "train": {"out_dir": str(out), "max_steps": 12, "batch_size": 4, "lr": 3e-3, "log_every": 2, **train},
    }


def classify_recipe(train: Path, out: Path, **train_cfg: object) -> dict:
    """A tiny BERT classifier on a labelled TSV (the ``sentiment_tsv`` fixture, or
    :func:`write_sentiment_tsv`)."""
    return {
        "task": "classify",
        "seed": 3,
        "data": {"train": str(train), "vocab_size": 1000, "max_seq_len": 32},
        "model": {"name": "bert_test", "overrides": {"dropout": 0.0}},
        "train": {
            "out_dir": str(out),
            "max_steps": 40,
            "batch_size": 16,
            "lr": 2e-3,
            "log_every": 10,
            **train_cfg,
        },
    }


def mlm_recipe(path: Path, out: Path, **train_cfg: object) -> dict:
    """A tiny BERT pre-trained with masked words on a text file."""
    return {
        "task": "mlm",
        "seed": 5,
        "data": {"path": str(path), "vocab_size": 60, "max_seq_len": 16, "eval_windows": 64},
        "model": {"name": "bert_test", "overrides": {"dropout": 0.0}},
        "train": {"out_dir": str(out), "max_steps": 30, "batch_size": 16, "lr": 3e-3, **train_cfg},
    }


def translate_recipe(prefix: Path, out: Path, **train_cfg: object) -> dict:
    """A tiny encoder-decoder on the line files ``<prefix>.src`` / ``<prefix>.tgt`` of
    :func:`write_parallel` (val and test cut from them)."""
    return {
        "task": "translate",
        "seed": 3,
        "data": {"train": str(prefix), "src_lang": "src", "tgt_lang": "tgt", "vocab_size": 120},
        "model": {"name": "seq2seq_test", "overrides": {"dropout": 0.0}},
        "train": {
            "out_dir": str(out),
            "max_steps": 30,
            "batch_size": 16,
            "lr": 3e-3,
            "threads": 1,  # a tiny model: one thread is several times faster than two contended ones
            **train_cfg,
        },
    }


def recommend_recipe(log: Path, out: Path, model: str = "sasrec_test", **train_cfg: object) -> dict:
    """A tiny recommender on an interaction log of :func:`write_interactions` (histories of 8)."""
    return {
        "task": "recommend",
        "seed": 3,
        "data": {"path": str(log), "max_len": 8, "sampled_negatives": 10},
        "model": {"name": model},  # the *_test presets have no dropout
        "train": {
            "out_dir": str(out),
            "max_steps": 60,
            "batch_size": 16,
            "lr": 1e-2,
            "weight_decay": 0.0,
            "log_every": 20,
            "threads": 1,  # a tiny model: one thread is faster than two contended ones
            **train_cfg,
        },
    }


def segment_recipe(digits_csv: Path, out: Path, model: str = "segmenter_test", **train_cfg: object) -> dict:
    """A tiny segmenter on 32x32 canvases of the digits of :func:`write_digits_csv`."""
    return {
        "task": "segment",
        "seed": 3,
        "data": {
            "source": "mnist-canvas",
            "path": str(digits_csv),
            "image_size": 32,
            "canvases": [24, 8, 8],
            "digit_scale": [0.6, 0.9],
            "digits_per_image": [1, 2],
        },
        "model": {"name": model},
        "train": {
            "out_dir": str(out),
            "max_steps": 8,
            "batch_size": 8,
            "lr": 3e-3,
            "log_every": 4,
            **train_cfg,
        },
    }


def write_digits_csv(path: Path, n: int = 40, seed: int = 0, digits: int = 10) -> Path:
    """An MNIST-like CSV (784 pixels then the label) of made-up 28x28 "digits" 0..digits-1: digit d is a
    block of brightness 130 + (120 / (digits - 1)) d, above the canvas' mask threshold, so the class can be
    told at any scale."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        d = i % digits
        image = np.zeros((28, 28), np.int64)
        top, left = rng.integers(2, 8, size=2)
        image[top : top + 18, left : left + 14] = 130 + (120 // max(digits - 1, 1)) * d
        rows.append(",".join(map(str, [*image.reshape(-1), d])))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_recipe(path: Path, raw: dict) -> Path:
    """A raw recipe as a YAML file, for the command line."""
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------------ data

POSITIVE = ["good", "great", "lovely", "superb", "fun", "brilliant", "moving", "charming"]
NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "weak", "clumsy", "tedious"]
FILLER = ["the", "movie", "film", "plot", "was", "a", "really", "acting", "story", "and", "quite"]


def write_sentiment_tsv(path: Path, rows: int) -> Path:
    """``rows`` reviews "the film was CUE really", a positive cue (label 1) or a negative one (label 0) in
    turn: a set a tiny classifier learns in a few dozen steps."""
    lines = ["sentence\tlabel"] + [
        f"the film was {(POSITIVE if i % 2 else NEGATIVE)[i % 8]} really\t{i % 2}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


LETTERS = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu"]


def write_parallel(prefix: Path, rows: int, seed: int = 0, *, reverse: bool = False) -> Path:
    """``<prefix>.src`` / ``<prefix>.tgt``: random sentences of 3 to 6 syllable words and their copy (or
    their words reversed): a translation a tiny model learns in seconds."""
    import random

    rng = random.Random(seed)
    sources = [[rng.choice(LETTERS) for _ in range(rng.randint(3, 6))] for _ in range(rows)]
    targets = [list(reversed(s)) if reverse else s for s in sources]
    prefix.with_name(prefix.name + ".src").write_text("".join(" ".join(s) + "\n" for s in sources))
    prefix.with_name(prefix.name + ".tgt").write_text("".join(" ".join(t) + "\n" for t in targets))
    return prefix


def write_interactions(path: Path, users: int = 40, items: int = 24, length: int = 10, seed: int = 0) -> Path:
    """A TSV log ``user_id item_id timestamp`` (rows shuffled, so time orders them): user ``u`` visits items
    ``m{s}, m{s+1}, ...`` (mod ``items``) from a seeded start ``s``: the next item is always the one after
    the last, a pattern a tiny recommender learns to HR@1 = 1."""
    import random

    rng = random.Random(seed)
    rows = []
    for u in range(users):
        start = rng.randrange(items)
        rows += [(f"u{u}", f"m{(start + t) % items}", 1000 * u + 10 * t) for t in range(length)]
    rng.shuffle(rows)
    path.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    return path


def write_yolo_boxes(folder: Path, train: int = 12, val: int = 4, seed: int = 0) -> Path:
    """A tiny Ultralytics YOLO data set: ``folder/data.yaml`` (names ``red``, ``green``) and
    ``images/{train,val}/*.png`` of 40x48 pixels (not square: the letterbox pads them) with one or two
    coloured rectangles each, ``labels/{train,val}/*.txt`` their boxes. Returns the YAML's path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = np.full((40, 48, 3), 20, np.uint8)
            lines = []
            for k in range(1 + i % 2):
                cls = int(rng.integers(2))
                w, h = int(rng.integers(10, 18)), int(rng.integers(10, 16))
                x = int(rng.integers(0, 24 - w)) + 24 * k
                y = int(rng.integers(0, 40 - h))
                image[y : y + h, x : x + w] = (230, 30, 30) if cls == 0 else (30, 230, 30)
                lines.append(f"{cls} {(x + w / 2) / 48:.6f} {(y + h / 2) / 40:.6f} {w / 48:.6f} {h / 40:.6f}")
            Image.fromarray(image).save(folder / "images" / split / f"{i:03d}.png")
            (folder / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    config = folder / "data.yaml"
    config.write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return config


def detect_recipe(config: Path, out: Path, model: str = "vit_det_test", **train_cfg: object) -> dict:
    """A tiny detector on the YOLO data of :func:`write_yolo_boxes` (32x32 inputs)."""
    return {
        "task": "detect",
        "seed": 3,
        "data": {"source": "yolo", "path": str(config), "image_size": 32, "augment": True, "hflip": 0.5},
        "model": {"name": model},
        "train": {
            "out_dir": str(out),
            "max_steps": 20,
            "batch_size": 4,
            "lr": 3e-3,
            "threads": 1,
            **train_cfg,
        },
    }


# ------------------------------------------------------------------------------------------------ runs


def recipe_and_task(raw: dict) -> tuple[Recipe, Task]:
    """The validated recipe and its task, on data prepared under ``<out_dir>/data``."""
    recipe, data = validate_recipe(raw)
    return recipe, TASKS[recipe.task].from_recipe(data, recipe.seed, Path(recipe.train.out_dir) / "data")


def task_from(raw: dict) -> Task:
    """The recipe's task, on data prepared under ``<out_dir>/data``."""
    return recipe_and_task(raw)[1]


def make_trainer(raw: dict) -> Trainer:
    """A trainer for a raw recipe, set up as ``tansuo train`` does (quiet); the test calls ``fit``."""
    recipe, data = validate_recipe(raw)
    run = build_run(recipe, data, Path(recipe.train.out_dir) / "data")
    return Trainer(run.task, run.model, recipe.train, seed=recipe.seed, recipe=recipe.model_dump())


class Interrupted(Exception):
    """What :func:`interrupt_after` raises: a run cut short, as by Ctrl-C."""


def interrupt_after(trainer: Trainer, micro_batches: int) -> None:
    """Make ``trainer``'s fit stop with :class:`Interrupted` when it asks for micro-batch ``micro_batches``
    (counted from where it starts)."""
    original = trainer.task.train_batches

    def batches(batch_size: int, start: int) -> Iterator[dict]:
        for i, b in enumerate(original(batch_size, start)):
            if i == micro_batches:
                raise Interrupted
            yield b

    trainer.task.train_batches = batches  # type: ignore[method-assign]


def run_ranks(fn: Callable[..., None], world: int, *args: object) -> None:
    """``fn(rank, *args)`` on each rank of ``world`` processes (``torch.multiprocessing``), with the
    environment torchrun gives its workers (gloo on 127.0.0.1, one thread each). ``fn`` must be importable
    (a module-level function). When one rank raises, the others are stopped and this raises
    ``torch.multiprocessing.ProcessRaisedException``."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    import os

    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(rank, *args)


def train_ranks(
    raws: list[dict], data_root: Path, *, resume: bool = False, die: tuple[int, int] | None = None
) -> None:
    """Train ``raws[r]`` on rank ``r`` of ``len(raws)`` processes (see :func:`run_ranks`), as torchrun's
    workers would; the data is prepared once under ``data_root``. ``die=(rank, n)``: that rank raises
    :class:`Interrupted` when it asks for micro-batch ``n``."""
    run_ranks(_train_rank, len(raws), raws, str(data_root), resume, die)


def _train_rank(rank: int, raws: list[dict], data_root: str, resume: bool, die: tuple | None) -> None:
    import time

    from tansuo.train.setup import train_recipe

    recipe, data = validate_recipe(raws[rank])
    start = (lambda trainer: interrupt_after(trainer, die[1])) if die is not None and die[0] == rank else None
    try:
        train_recipe(recipe, data, data_root=data_root, resume=resume, on_start=start)
    except Exception:
        if die is not None and die[0] != rank:
            # the peers' next collective fails once the dying rank is gone ("connection reset"); wait so
            # that spawn reports the dying rank's Interrupted, which it takes from whichever exits first
            time.sleep(5)
        raise


def run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """``tansuo ARGS`` in this process: (exit code, stdout, stderr)."""
    from tansuo.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["tansuo", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------ machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str:
    """The headless browser's path; skips the test when there is none."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if found is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def browse(page: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless chromium with ``extra`` flags (--dump-dom, --screenshot=PATH); skips the test
    when there is no chromium."""
    with tempfile.TemporaryDirectory() as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
        flags += [
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={profile}",
        ]
        cmd = [chromium_path(), *flags, "--window-size=1280,2000", *extra, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
