"""The command line as a user runs it: exit codes, messages and the train -> eval/predict/generate path."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    classify_recipe,
    image_recipe,
    lm_recipe,
    run,
    write_recipe,
    write_sentiment_tsv,
)


def test_models_lists_registry(monkeypatch, capsys) -> None:
    code, out, _ = run(["models"], monkeypatch, capsys)
    assert code == 0
    for name in ("gpt_test", "vit_digits", "resnet_digits", "gpt_char_small"):
        assert name in out


def test_bad_recipe_field_exits_2_naming_field(monkeypatch, capsys) -> None:
    code, _, err = run(["train", "recipes/digits-vit.yaml", "--set", "train.lr=-3"], monkeypatch, capsys)
    assert code == 2
    assert "train.lr" in err and "-3" in err and "greater than 0" in err


def test_unknown_model_override_exits_2(monkeypatch, capsys, tmp_path) -> None:
    args = ["train", "recipes/digits-vit.yaml", "--set", "model.overrides.depthh=3", "--out", str(tmp_path)]
    code, _, err = run(args, monkeypatch, capsys)
    assert code == 2 and "model.overrides.depthh: not a field of ViTConfig" in err


def test_missing_data_file_names_path_and_fix(monkeypatch, capsys, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "input.txt"
    args = ["train", "recipes/shakespeare-char.yaml", "--data", str(missing), "--out", str(tmp_path / "r")]
    code, _, err = run(args, monkeypatch, capsys)
    assert code == 2
    assert "input.txt" in err and "--data" in err


def test_image_train_eval_predict(monkeypatch, capsys, tmp_path, image_npz) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", image_recipe(image_npz, tmp_path / "run"))
    code, out, err = run(
        ["train", str(recipe), "--quiet", "--set", "train.max_steps=40"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "test accuracy" in out and "bundle written to" in out
    bundle = tmp_path / "run" / "bundle"
    for name in ("config.json", "model.safetensors", "task.json", "metrics.json"):
        assert (bundle / name).is_file()

    code, out, _ = run(["eval", str(bundle), "--json"], monkeypatch, capsys)
    assert code == 0
    metrics = json.loads(out)["test"]
    assert metrics["accuracy"] == json.loads((bundle / "metrics.json").read_text())["test"]["accuracy"]

    data = np.load(image_npz)
    bar = data["x"][1]  # class 1: a bright horizontal bar low in the image
    np.save(tmp_path / "one.npy", bar)
    png = (np.clip(bar / 16, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(png, mode="L").save(tmp_path / "one.png")
    code, out, _ = run(
        ["predict", str(bundle), str(tmp_path / "one.npy"), str(tmp_path / "one.png"), "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["1", "1"]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_lm_train_then_generate(monkeypatch, capsys, tmp_path, text_file) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(text_file, tmp_path / "run"))
    code, out, err = run(["train", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    bundle = tmp_path / "run" / "bundle"
    assert (bundle / "tokenizer.json").is_file()
    args = ["generate", str(bundle), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "1"]
    code, out, _ = run(args, monkeypatch, capsys)
    assert code == 0
    assert out.startswith("ROMEO:") and len(out.rstrip("\n")) == len("ROMEO:") + 30
    code, out2, _ = run(args, monkeypatch, capsys)
    assert out2 == out  # seeded sampling is reproducible
    code, _, err = run(["generate", str(bundle), "--prompt", "ROMEO: \u2603"], monkeypatch, capsys)
    assert code == 2 and "\u2603" in err  # a character the vocabulary never saw


@pytest.mark.slow
def test_generate_with_a_compiled_step_gives_the_same_text(monkeypatch, capsys, tmp_path, text_file) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(text_file, tmp_path / "run"))
    assert run(["train", str(recipe), "--quiet"], monkeypatch, capsys)[0] == 0
    args = ["generate", str(tmp_path / "run" / "bundle"), "--prompt", "ROMEO:", "--max-new-tokens", "20"]
    args += ["--temperature", "0"]
    code, eager, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    code, compiled, err = run([*args, "--compile"], monkeypatch, capsys)
    assert code == 0, err
    assert compiled == eager


def test_resume_without_checkpoint_exits_2(monkeypatch, capsys, tmp_path, image_npz) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", image_recipe(image_npz, tmp_path / "run"))
    code, _, err = run(["train", str(recipe), "--resume", "--quiet"], monkeypatch, capsys)
    assert code == 2 and "no checkpoint" in err


def test_bundle_errors(monkeypatch, capsys, tmp_path) -> None:
    code, _, err = run(["eval", str(tmp_path / "nothing")], monkeypatch, capsys)
    assert code == 2 and "bundle not found" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    code, _, err = run(["eval", str(tmp_path / "half")], monkeypatch, capsys)
    assert code == 2 and "model.safetensors" in err


def test_train_from_init_from_bundle(monkeypatch, capsys, tmp_path, image_npz) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", image_recipe(image_npz, tmp_path / "run"))
    code, _, err = run(["train", str(recipe), "--quiet", "--set", "train.max_steps=4"], monkeypatch, capsys)
    assert code == 0, err
    bundle = tmp_path / "run" / "bundle"
    args = ["train", str(recipe), "--quiet", "--set", "train.max_steps=1", "--out", str(tmp_path / "run2")]
    code, out, err = run([*args, "--set", f"model.init_from={bundle}"], monkeypatch, capsys)
    assert code == 0, err
    assert f"initialised from {bundle} (bundle)" in out and "0 skipped" in out
    bad = tmp_path / "no-such-bundle"
    code, _, err = run([*args, "--set", f"model.init_from={bad}"], monkeypatch, capsys)
    assert code == 2 and "no-such-bundle" in err


def test_classify_predict_file_to_jsonl(monkeypatch, capsys, tmp_path) -> None:
    write_sentiment_tsv(tmp_path / "train.tsv", 120)
    raw = classify_recipe(Path("train.tsv"), tmp_path / "run", max_steps=60)  # relative: --data-dir
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, out, err = run(["train", str(recipe), "--quiet", "--data-dir", str(tmp_path)], monkeypatch, capsys)
    assert code == 0, err
    assert "test: per class" in out and "→ 1" in out  # the confusion matrix of the held-back split
    bundle = str(tmp_path / "run" / "bundle")
    metrics = json.loads((tmp_path / "run" / "bundle" / "metrics.json").read_text())
    assert sum(map(sum, metrics["test"]["confusion_matrix"]["matrix"])) == 12
    code, out, err = run(["eval", bundle], monkeypatch, capsys)
    assert code == 0 and "per class" in out, err
    (tmp_path / "in.csv").write_text("sentence,label\nthe film was superb really,\n")
    code, out, err = run(["predict", bundle, "--input", str(tmp_path / "in.csv")], monkeypatch, capsys)
    assert code == 0 and "->  1" in out, err
    texts = ['{"sentence": "the film was superb really"}', '{"sentence": "the film was dull really"}']
    (tmp_path / "in.jsonl").write_text("\n".join(texts) + "\n")
    args = ["predict", bundle, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    assert "2 predictions written" in out
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["label"] for g in got] == ["1", "0"]
    assert got[0]["input"] == "the film was superb really"
    code, _, err = run(["predict", bundle, "--input", str(tmp_path / "missing.csv")], monkeypatch, capsys)
    assert code == 2 and "missing.csv" in err
    code, _, err = run(["predict", bundle], monkeypatch, capsys)
    assert code == 2 and "nothing to predict" in err
