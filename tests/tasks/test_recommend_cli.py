"""A recommend bundle from the command line: train, eval, predict with a history and task options."""

import json

import pytest

from tests.helpers import recommend_recipe, run, write_interactions, write_recipe


def test_train_eval_and_predict_a_history_with_options(tmp_path, monkeypatch, capsys):
    log = write_interactions(tmp_path / "log.tsv")
    titles = tmp_path / "titles.tsv"
    titles.write_text("item_id\ttitle\n" + "".join(f"m{i}\tFilm {i}\n" for i in range(24)))
    raw = recommend_recipe(log, tmp_path / "run", max_steps=60)
    raw["data"]["titles"] = str(titles)
    recipe = write_recipe(tmp_path / "rec.yaml", raw)
    code, out, err = run(["train", str(recipe)], monkeypatch, capsys)
    assert code == 0, err
    bundle = str(tmp_path / "run" / "bundle")
    metrics = json.loads((tmp_path / "run" / "bundle" / "metrics.json").read_text())
    assert "ndcg@10" in json.dumps(metrics) and "sampled_ndcg@10" in json.dumps(metrics)

    code, out, err = run(["eval", bundle], monkeypatch, capsys)
    assert code == 0, err
    assert "ndcg@10" in out

    # the cycle: after m3, m4 comes next
    code, out, err = run(["predict", bundle, "m1,m2,m3"], monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "history: m1, m2, m3"
    assert lines[1].strip().startswith("1. Film 4 [m4]")
    assert len(lines) == 11  # the history and the top 10

    args = ["predict", bundle, "Film 1|Film 2", "-o", "k=2", "-o", "candidates=m3,m9", "--json"]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert [item["item"] for item in row["items"]][0] == "m3" and len(row["items"]) == 2
    m3, m9 = row["candidates"]
    assert m3["probability"] > m9["probability"] > 0

    code, _, err = run(["predict", bundle, "m1", "-o", "top_k=3"], monkeypatch, capsys)
    assert code == 2 and "-o top_k: unknown option" in err and "candidates" in err
    code, _, err = run(["predict", bundle, "m1", "-o", "k=zero"], monkeypatch, capsys)
    assert code == 2 and "-o k:" in err
    code, _, err = run(["predict", bundle, "m1,m404"], monkeypatch, capsys)
    assert code == 2 and "unknown item ['m404']" in err


@pytest.mark.slow
def test_distillation_and_int8_of_a_sasrec_bundle_are_measured_in_ndcg(tmp_path, monkeypatch, capsys):
    raw = recommend_recipe(write_interactions(tmp_path / "log.tsv"), tmp_path / "run", max_steps=150)
    raw["model"]["overrides"] = {"embed_dim": 32}
    assert run(["train", str(write_recipe(tmp_path / "r.yaml", raw))], monkeypatch, capsys)[0] == 0
    out = tmp_path / "compressed"
    args = ["compress", str(tmp_path / "run" / "bundle"), "--quantize", "int8", "--quantize-backend", "torch"]
    args += ["--distill-into", "sasrec_test", "--student", "num_layers=1", "--student", "embed_dim=16"]
    args += ["--train", "max_steps=150"]
    code, _, err = run([*args, "--out", str(out), "--threads", "1"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for variant in report["variants"]:  # quality is NDCG@10 of full ranking, a fraction
        assert variant["metric"] == "ndcg@10"
        assert variant["quality"] == pytest.approx(variant["metrics"]["ndcg@10"])
    original, student, quantized = report["variants"]
    assert student["steps"][0].startswith("distill") and quantized["steps"][-1] == "int8"
    assert student["params"] < original["params"]
    assert original["quality"] == 1.0  # the cycle is learnt
    assert student["quality"] > 0.9 and quantized["quality"] > 0.9
