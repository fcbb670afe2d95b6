"""The mlm task: windows and corruption, learning a tiny corpus, fill-mask from a bundle, tables, errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tansuo.bundle import load_bundle
from tansuo.data import save_tokenizer, train_char_tokenizer
from tansuo.errors import DataError, TansuoError
from tansuo.models import create_model
from tansuo.tasks import TASKS, Task
from tansuo.tasks.mlm import IGNORE, MLMTask
from tests.helpers import make_trainer, mlm_recipe, task_from

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture
def counting_txt(tmp_path: Path) -> Path:
    """Lines of one word said twelve times, the word drawn at random: a masked word is (nearly always) its
    neighbours' word, and nothing else tells it (each word is as frequent as any other)."""
    rng = random.Random(0)
    path = tmp_path / "repeats.txt"
    path.write_text(
        "\n".join(" ".join([rng.choice(WORDS)] * 12) for _ in range(300)) + "\n", encoding="utf-8"
    )
    return path


def test_follows_the_protocol_and_wraps_windows(counting_txt: Path, tmp_path: Path) -> None:
    task = task_from(mlm_recipe(counting_txt, tmp_path))
    assert isinstance(task, Task) and task.name == "mlm" and "mlm" in TASKS
    assert task.model_overrides() == {"vocab_size": task.tokenizer.get_vocab_size(), "num_classes": 0}
    batch = next(task.train_batches(8, start=0))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (8, 16)
    assert (ids[:, 0] == task.cls_id).all() and (ids[:, -1] == task.sep_id).all()
    assert (labels[:, 0] == IGNORE).all() and (labels[:, -1] == IGNORE).all()  # specials never chosen
    chosen = labels != IGNORE
    assert chosen.any()
    # a chosen position that is not [MASK] is a random or kept token; unchosen ones are untouched words
    assert set(task.tokenizer.decode(ids[~chosen][ids[~chosen] > 4].tolist()).split()) <= set(WORDS)
    assert task.count(batch) == 8 * 16


def test_batches_are_a_pure_function_of_seed_and_step(counting_txt: Path, tmp_path: Path) -> None:
    task = task_from(mlm_recipe(counting_txt, tmp_path))
    first = [b for _, b in zip(range(4), task.train_batches(8, start=0), strict=False)]
    again = next(task.train_batches(8, start=2))
    assert all(torch.equal(first[2][k], again[k]) for k in again)
    assert not torch.equal(first[0]["labels"], first[1]["labels"])


def test_learns_counting_and_fills_masks_from_the_bundle(counting_txt: Path, tmp_path: Path) -> None:
    raw = mlm_recipe(counting_txt, tmp_path / "run", max_steps=200, eval_every=100, warmup_steps=10)
    trainer = make_trainer(raw)
    before = trainer.task.evaluate(trainer.model, "val", 32, torch.device("cpu"))
    result = trainer.fit()
    assert result["val"]["loss"] < before["loss"] - 0.5
    assert result["val"]["accuracy"] > 0.4  # chance: 0.1
    bundle = load_bundle(result["bundle"])
    assert isinstance(bundle.task, MLMTask)
    [row] = bundle.task.predict(bundle.model, ["five five five [MASK] five five"], torch.device("cpu"))
    assert row["masks"][0][0]["token"] == "five"
    assert row["text"] == "five five five five five five"
    assert len(row["masks"][0]) == 5
    assert sum(c["probability"] for c in row["masks"][0]) <= 1.0 + 1e-6
    # evaluation of a bundle re-reads its corpus (into a scratch folder) and gives the same figure
    again = bundle.task.evaluate(bundle.model, "val", 7, torch.device("cpu"))
    assert again["loss"] == pytest.approx(result["val"]["loss"], rel=1e-4)


def test_a_table_of_texts_is_a_corpus(tmp_path: Path) -> None:
    rows = ["review\tlabel"] + [f"{' '.join(WORDS)}\t{i % 2}" for i in range(100)]  # counting to ten
    (tmp_path / "reviews.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    raw = mlm_recipe(tmp_path / "reviews.tsv", tmp_path / "run")
    raw["data"]["text_column"] = "review"
    task = task_from(raw)
    corpus = (tmp_path / "run" / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert len(corpus) == 100 and corpus[0] == " ".join(WORDS)
    assert task.tokenizer.token_to_id("label") is None  # the header and labels are not text
    raw["data"]["text_column"] = "text"
    with pytest.raises(DataError, match="text"):
        task_from(raw)


def test_evaluation_is_fixed_and_leaves_rng_alone(counting_txt: Path, tmp_path: Path) -> None:
    task = task_from(mlm_recipe(counting_txt, tmp_path))
    model = create_model("bert_test", **task.model_overrides())
    state = torch.get_rng_state()
    a = task.evaluate(model, "val", 16, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    b = task.evaluate(model, "val", 5, torch.device("cpu"))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert set(a) == {"loss", "perplexity", "accuracy"}


def test_errors_say_what_to_do(counting_txt: Path, tmp_path: Path) -> None:
    task = task_from(mlm_recipe(counting_txt, tmp_path))
    model = create_model("bert_test", **task.model_overrides())
    with pytest.raises(DataError, match="no \\[MASK\\]"):
        task.predict(model, ["one one one"], torch.device("cpu"))
    gpt = create_model("gpt_test", vocab_size=task.tokenizer.get_vocab_size())
    with pytest.raises(TansuoError, match="BERT-family model with an MLM head"):
        task.loss(gpt, next(task.train_batches(2, 0)))
    short = create_model("bert_test", **task.model_overrides(), max_seq_len=8)
    with pytest.raises(DataError, match="model has 8 positions"):
        task.loss(short, next(task.train_batches(2, 0)))

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one two three\n", encoding="utf-8")
    with pytest.raises(DataError, match="max_seq_len"):
        task_from(mlm_recipe(tiny, tmp_path / "tiny"))

    char = tmp_path / "char.json"
    save_tokenizer(train_char_tokenizer(["abc def"]), char)
    raw = mlm_recipe(counting_txt, tmp_path / "char")
    raw["data"]["tokenizer"] = str(char)
    with pytest.raises(DataError, match=r"lacks \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        task_from(raw)
    with pytest.raises(DataError, match="not set"):
        task_from(mlm_recipe(counting_txt, tmp_path) | {"data": {}})
