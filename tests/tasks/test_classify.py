"""The classify task: bucketed batches, padding, truncation, labels, and learning a tiny sentiment set."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tansuo.bundle import load_bundle
from tansuo.errors import DataError
from tansuo.models import create_model
from tansuo.tasks import TASKS, Task
from tansuo.tasks.classify import ClassifyTask
from tests.helpers import FILLER, NEGATIVE, POSITIVE, classify_recipe, make_trainer, task_from


def test_follows_the_protocol_and_overrides(sentiment_tsv: Path, tmp_path: Path) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    assert isinstance(task, Task) and TASKS["classify"] is ClassifyTask
    assert task.labels == ["0", "1"] and task.heldout_split == "test"
    assert task.model_overrides() == {"vocab_size": task.tokenizer.get_vocab_size(), "num_classes": 2}
    assert [len(task._split(s)) for s in ("train", "val", "test")] == [160, 20, 20]


def test_data_path_is_an_alias_of_train(sentiment_tsv: Path, tmp_path: Path) -> None:
    raw = classify_recipe(sentiment_tsv, tmp_path)
    raw["data"]["path"] = raw["data"].pop("train")
    assert task_from(raw).data.train == str(sentiment_tsv)


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_example(
    sentiment_tsv: Path, tmp_path: Path
) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    per_epoch = task.steps_per_epoch(16)
    assert per_epoch == 10
    first = [b for _, b in zip(range(2 * per_epoch), task.train_batches(16, start=0), strict=False)]
    later = [b for _, b in zip(range(4), task.train_batches(16, start=8), strict=False)]
    for a, b in zip(first[8:12], later, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # every example once an epoch, and the two epochs differ in order
    orders = [np.concatenate(task.epoch_order(16, e)) for e in (0, 1)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(160))
    assert not np.array_equal(orders[0], orders[1])
    labels = torch.cat([b["y"] for b in first[:per_epoch]])
    assert torch.equal(torch.bincount(labels), torch.bincount(task._split("train").labels))


def test_padding_and_attention_mask(sentiment_tsv: Path, tmp_path: Path) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    part = task._split("train")
    batch = next(task.train_batches(16, start=0))
    idx = task.epoch_order(16, 0)[0]
    assert batch["input_ids"].shape[1] == part.lengths[idx].max()
    assert torch.equal(batch["attention_mask"].sum(1), torch.from_numpy(part.lengths[idx]))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == task.pad_id).all()
    assert (batch["input_ids"][:, 0] == task.tokenizer.token_to_id("[CLS]")).all()
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "y"}


def test_long_texts_are_truncated_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = ["sentence\tlabel"] + [f"{' '.join(['good'] * (3 + i))}\t{i % 2}" for i in range(40)]
    (tmp_path / "long.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    raw = classify_recipe(tmp_path / "long.tsv", tmp_path)
    raw["data"]["max_seq_len"] = 10
    with caplog.at_level(logging.INFO, logger="tansuo.tasks.classify"):
        task = task_from(raw)
    n = len(task._split("train"))
    assert task._split("train").lengths.max() == 10
    assert sum(task.truncated.values()) == sum(1 for i in range(40) if 3 + i + 2 > 10)
    assert "cut to max_seq_len=10" in caplog.text and n == 32


def test_unseen_label_in_val_names_file_and_line(sentiment_tsv: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.tsv"
    val.write_text("sentence\tlabel\ngood film\t1\nodd film\tneutral\n", encoding="utf-8")
    raw = classify_recipe(sentiment_tsv, tmp_path)
    raw["data"]["val"] = str(val)
    with pytest.raises(DataError, match=r"val\.tsv:3: label 'neutral'"):
        task_from(raw)


def test_train_and_val_files_hold_out_val(sentiment_tsv: Path, tmp_path: Path) -> None:
    raw = classify_recipe(sentiment_tsv, tmp_path)
    raw["data"]["val"] = str(sentiment_tsv)
    task = task_from(raw)
    assert task.heldout_split == "val" and len(task._split("train")) == 200
    with pytest.raises(DataError, match="splits"):
        task._split("test")


def test_evaluate_metrics_and_rng(sentiment_tsv: Path, tmp_path: Path) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    model = create_model("bert_test", **task.model_overrides())
    state = torch.get_rng_state()
    a = task.evaluate(model, "val", 4, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    b = task.evaluate(model, "val", 7, torch.device("cpu"))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert {"loss", "accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(a)
    assert all(isinstance(a[k], float) for k in ("loss", "accuracy", "macro_f1"))
    confusion = a["confusion_matrix"]
    assert confusion["labels"] == ["0", "1"]
    assert sum(map(sum, confusion["matrix"])) == len(task._split("val"))
    (tn, fp), (fn, tp) = confusion["matrix"]
    assert a["accuracy"] == pytest.approx((tn + tp) / (tn + fp + fn + tp))
    assert a["per_class"]["1"]["support"] == fn + tp
    if tp + fp:
        assert a["per_class"]["1"]["precision"] == pytest.approx(tp / (tp + fp))


def test_per_class_report_by_hand() -> None:
    from tansuo.tasks.metrics import per_class_report

    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    true = torch.tensor([0, 1, 1, 1, 2, 2])
    r = per_class_report(pred, true, ["a", "b", "c"])
    assert r["confusion_matrix"]["matrix"] == [
        [1, 0, 0],
        [1, 2, 0],
        [1, 0, 1],
    ]  # rows true, columns predicted
    assert r["per_class"]["a"] == {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    assert r["per_class"]["b"]["precision"] == 1.0 and r["per_class"]["b"]["recall"] == 2 / 3
    assert r["per_class"]["c"]["recall"] == 0.5


def test_empty_text_names_file_and_line(sentiment_tsv: Path, tmp_path: Path) -> None:
    lines = sentiment_tsv.read_text(encoding="utf-8").splitlines()
    lines[5] = "   \t1"
    lines[9] = "\t0"
    sentiment_tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = classify_recipe(sentiment_tsv, tmp_path)
    raw["data"]["val"] = str(sentiment_tsv)
    with pytest.raises(DataError, match=r"sentiment\.tsv:6: the text \('sentence'\) is empty \(and 1 more"):
        task_from(raw)


def test_predict_refuses_an_empty_text(sentiment_tsv: Path, tmp_path: Path) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    model = create_model("bert_test", **task.model_overrides())
    with pytest.raises(DataError, match="input 2 of 2 is an empty text"):
        task.predict(model, ["good", " "], torch.device("cpu"))


def test_learns_tiny_sentiment_set_and_predicts_from_bundle(sentiment_tsv: Path, tmp_path: Path) -> None:
    raw = classify_recipe(sentiment_tsv, tmp_path / "run", max_steps=60, eval_every=20)
    # a given vocab.txt: Hugging Face's WordPiece trainer breaks ties between merges in a different order
    # from run to run, so a trained vocabulary (and with it the run) is not reproducible
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]))
    raw["data"]["tokenizer"] = str(vocab)
    result = make_trainer(raw).fit()
    assert result["val"]["accuracy"] == 1.0
    bundle = load_bundle(result["bundle"])
    assert isinstance(bundle.task, ClassifyTask) and bundle.task._encoded is None  # data read lazily
    rows = bundle.task.predict(
        bundle.model, ["a great and lovely film", "a dull boring plot"], torch.device("cpu")
    )
    assert [r["label"] for r in rows] == ["1", "0"]
    assert rows[0]["probability"] == max(rows[0]["probabilities"].values())
    test = bundle.task.evaluate(bundle.model, "test", 8, torch.device("cpu"))
    assert test["accuracy"] >= 0.9


def test_texts_longer_than_the_model_are_a_clear_error(sentiment_tsv: Path, tmp_path: Path) -> None:
    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    model = create_model("bert_test", **task.model_overrides(), max_seq_len=3)
    batch = next(task.train_batches(4, 0))
    with pytest.raises(DataError, match="model has 3 positions"):
        task.loss(model, batch)


def test_byte_level_bpe_tokenizer_is_trained_on_the_training_text(
    sentiment_tsv: Path, tmp_path: Path
) -> None:
    raw = classify_recipe(sentiment_tsv, tmp_path)
    raw["data"].update(tokenizer="bpe", vocab_size=300)
    task = task_from(raw)
    assert task.tokenizer.get_vocab_size() <= 300 and task.tokenizer.token_to_id("[CLS]") == 2
    model = create_model("bert_test", **task.model_overrides())
    assert torch.isfinite(task.loss(model, next(task.train_batches(8, 0))))
    raw["data"]["vocab_size"] = 100
    with pytest.raises(DataError, match="vocab_size >= 261"):
        task_from(raw)


def test_prediction_runs_length_sorted_token_bounded_calls_and_keeps_the_input_order(
    sentiment_tsv: Path, tmp_path: Path
) -> None:
    from tansuo.tasks.classify import PREDICT_BATCH, _length_chunks

    ids = [[0] * n for n in (5, 1, 9, 3, 3, 40, 2)]
    chunks = _length_chunks(ids, max_tokens=12)
    assert sorted(i for c in chunks for i in c) == list(range(len(ids)))
    flat = [i for c in chunks for i in c]
    assert [len(ids[i]) for i in flat] == sorted(len(x) for x in ids)  # shortest first
    assert all(len(c) == 1 or len(c) * max(len(ids[i]) for i in c) <= 12 for c in chunks)
    assert [5] in chunks  # longer than the budget: alone
    assert all(len(c) <= PREDICT_BATCH for c in _length_chunks([[0]] * 200, max_tokens=10**6))

    task = task_from(classify_recipe(sentiment_tsv, tmp_path))
    torch.manual_seed(0)
    model = create_model("bert_test", **task.model_overrides()).eval()
    texts = ["good " * n + "film" for n in (7, 1, 12, 3, 0, 20, 2)]
    together = task.predict(model, texts, torch.device("cpu"))
    for text, row in zip(texts, together, strict=True):
        alone = task.predict(model, [text], torch.device("cpu"))[0]
        assert row["input"] == text and row["label"] == alone["label"]
        assert row["probability"] == pytest.approx(alone["probability"], abs=1e-5)
