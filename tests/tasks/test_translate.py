"""The translate task: parallel data and its errors, length-bucketed batches, sacreBLEU figures, a copy task
learnt to BLEU 100, and the command line (train, predict)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch

from tansuo.data.parallel import read_parallel
from tansuo.errors import DataError
from tansuo.tasks.metrics import translation_metrics
from tests.helpers import make_trainer, run, task_from, translate_recipe, write_parallel, write_recipe

HYPOTHESES = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFERENCES = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]


def test_sacrebleu_figures_equal_sacrebleu_s_own():
    got = translation_metrics(HYPOTHESES, REFERENCES)
    assert got["bleu"] == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score
    assert got["bleu_tok_lc"] == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True).score
    assert round(got["bleu"], 2) == 45.07  # pinned: sacreBLEU 2.6, 13a, cased, one reference
    assert round(got["chrf"], 2) == 50.04
    shouted = translation_metrics([h.upper() for h in HYPOTHESES], REFERENCES)
    assert shouted["bleu_tok_lc"] == pytest.approx(got["bleu_tok_lc"]) and shouted["bleu"] < got["bleu"]
    assert translation_metrics(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ data


def _files(folder: Path, src: list[str], tgt: list[str], name: str = "train") -> Path:
    (folder / f"{name}.de").write_text("".join(line + "\n" for line in src))
    (folder / f"{name}.en").write_text("".join(line + "\n" for line in tgt))
    return folder / name


def test_line_files_and_a_table_read_the_same_pairs_in_either_direction(tmp_path):
    prefix = _files(tmp_path, ["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."])
    text = read_parallel(prefix, "de", "en")
    assert (text.sources, text.targets) == (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."])
    back = read_parallel(prefix, "en", "de")
    assert (back.sources, back.targets) == (text.targets, text.sources)
    table = tmp_path / "pairs.tsv"
    table.write_text("de\ten\nEin Hund.\tA dog.\nZwei Katzen.\tTwo cats.\n")
    assert read_parallel(table, "de", "en").targets == text.targets
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"src": s, "tgt": t}) + "\n" for s, t in zip(text.sources, text.targets, strict=True)
        )
    )
    assert read_parallel(jsonl, "de", "en", source_column="src", target_column="tgt").sources == text.sources


def test_misaligned_line_files_name_both_files_and_counts(tmp_path):
    prefix = _files(tmp_path, ["Ein Hund.", "Zwei Katzen.", "Drei."], ["A dog.", "Two cats."])
    with pytest.raises(DataError) as e:
        read_parallel(prefix, "de", "en")
    assert all(s in str(e.value) for s in ("train.de has 3 lines", "train.en has 2", "align"))


def test_empty_lines_are_reported_with_file_and_line(tmp_path):
    prefix = _files(tmp_path, ["Ein Hund.", "Zwei Katzen."], ["A dog.", "  "])
    with pytest.raises(DataError, match=r"train\.en:2: empty line"):
        read_parallel(prefix, "de", "en")
    table = tmp_path / "pairs.tsv"
    table.write_text("de\ten\nEin Hund.\t\n")
    with pytest.raises(DataError, match=r"pairs\.tsv:2: the 'en' text is empty"):
        read_parallel(table, "de", "en")


def test_a_direction_without_files_says_which_are_missing(tmp_path):
    prefix = _files(tmp_path, ["Ein Hund."], ["A dog."])
    with pytest.raises(DataError) as e:
        read_parallel(prefix, "fr", "en")
    message = str(e.value)
    assert "train.fr not found" in message and "de -> en" not in message and "fr -> en" in message
    assert "train.de, train.en" in message and "data.src_lang" in message


def test_token_budget_batches_hold_every_pair_once_an_epoch_within_the_budget(tmp_path):
    raw = translate_recipe(write_parallel(tmp_path / "pairs", 200, seed=1), tmp_path / "run")
    raw["data"]["batch_tokens"] = 64
    task = task_from(raw)
    batches = task.batches(16)
    assert sum(len(b) for b in batches) == len(task._split("train"))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(task._split("train"))))
    per_epoch = task.steps_per_epoch(16)
    seen = []
    for batch in [b for b, _ in zip(task.train_batches(16, 0), range(per_epoch), strict=False)]:
        width = max(batch["src"].shape[1], batch["tgt_in"].shape[1])
        assert batch["src"].shape[0] * width <= 64 or batch["src"].shape[0] == 1
        seen.append(batch["src"].shape[0])
    assert sum(seen) == len(task._split("train"))
    assert len(set(seen)) > 1  # short sentences come many to a batch, long ones few


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_a_copy_task_learns_to_bleu_100_in_seconds(tmp_path):
    torch.manual_seed(0)
    prefix = write_parallel(tmp_path / "copy", 600, seed=2)
    raw = translate_recipe(prefix, tmp_path / "run", max_steps=900, eval_every=300, warmup_steps=30, lr=5e-3)
    raw["data"].update(beam_size=2)
    trainer = make_trainer(raw)
    result = trainer.fit()
    assert result["val"]["bleu"] == pytest.approx(100.0)
    assert result["test"]["bleu"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_train_then_predict_a_sentence_and_a_file(tmp_path, monkeypatch, capsys):
    prefix = write_parallel(tmp_path / "copy", 300, seed=3)
    raw = translate_recipe(prefix, tmp_path / "run", max_steps=200, eval_every=200)
    code, out, err = run(["train", str(write_recipe(tmp_path / "r.yaml", raw))], monkeypatch, capsys)
    assert code == 0, err
    bundle = tmp_path / "run" / "bundle"
    code, out, err = run(["predict", str(bundle), "ka lo mi nu"], monkeypatch, capsys)
    assert code == 0, err
    assert out.strip() == "ka lo mi nu"
    inputs = tmp_path / "in.txt"
    inputs.write_text("ka lo\n\nmi nu\n")
    code, out, err = run(["predict", str(bundle), "--input", str(inputs)], monkeypatch, capsys)
    assert code == 2 and "in.txt:2: empty line" in err
    inputs.write_text("ka lo mi\nnu pe ri so\n")
    output = tmp_path / "out.jsonl"
    code, out, err = run(
        ["predict", str(bundle), "--input", str(inputs), "--output", str(output)], monkeypatch, capsys
    )
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["translation"] for r in rows] == ["ka lo mi", "nu pe ri so"]
    text = tmp_path / "out.tgt"  # any other suffix: the translations, one a line, as fairseq and Marian write
    args = ["predict", str(bundle), "--input", str(inputs), "--output", str(text)]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    assert text.read_text() == "ka lo mi\nnu pe ri so\n"
    code, out, err = run(["predict", str(bundle), "ka lo mi nu", "-o", "max_length=2"], monkeypatch, capsys)
    assert code == 0, err
    assert 0 < len(out.strip()) < len("ka lo mi nu") and "ka lo mi nu".startswith(out.strip())  # 2 tokens
    code, out, err = run(["predict", str(bundle), "ka lo", "-o", "beam_size=0"], monkeypatch, capsys)
    assert code == 2 and "beam_size" in err


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_the_joint_vocabulary_has_its_special_tokens_first_and_decodes_to_text(kind):
    from tansuo.data.tokenizers import SUBWORD_SPECIAL_TOKENS, train_subword_tokenizer

    texts = ["Ein Mann fährt Fahrrad.", "A man rides a bike.", "Zwei Hunde spielen im Schnee."] * 20
    tok = train_subword_tokenizer(texts, kind, 150)
    assert [tok.token_to_id(t) for t in SUBWORD_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.decode(tok.encode("Zwei Hunde fährt Fahrrad.").ids) == "Zwei Hunde fährt Fahrrad."


def test_the_timed_call_is_a_fixed_amount_of_translation(tmp_path):
    task = task_from(translate_recipe(write_parallel(tmp_path / "pairs", 60), tmp_path / "run"))
    from tansuo.models import create_model

    model = create_model("seq2seq_test", **task.model_overrides()).eval()
    what, call = task.timed_call(model, 2, 6, calls=1)
    assert "6 greedy steps" in what
    assert call().shape == (2, model.config.vocab_size)


@pytest.mark.slow
def test_distillation_and_int8_of_a_translation_bundle_are_measured_in_bleu_points(
    tmp_path, monkeypatch, capsys
):
    prefix = write_parallel(tmp_path / "copy", 300, seed=4)
    raw = translate_recipe(prefix, tmp_path / "run", max_steps=150, eval_every=150)
    assert run(["train", str(write_recipe(tmp_path / "r.yaml", raw))], monkeypatch, capsys)[0] == 0
    out = tmp_path / "compressed"
    args = ["compress", str(tmp_path / "run" / "bundle"), "--quantize", "int8", "--quantize-backend", "torch"]
    args += ["--distill-into", "seq2seq_test", "--student", "num_encoder_layers=1"]
    args += ["--train", "max_steps=150"]
    code, _, err = run([*args, "--out", str(out), "--threads", "1"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"]:  # quality is BLEU / 100: reports show it x100, as points
        assert variant["metric"] == "bleu"
        assert variant["quality"] == pytest.approx(variant["metrics"]["bleu"] / 100)
    original, student, quantized = report["variants"]
    assert student["steps"][0].startswith("distill") and quantized["steps"][-1] == "int8"
    assert student["params"] < original["params"]
    assert student["quality"] > 0.3  # the one-layer encoder still copies most words (teacher: about 0.75)
