"""A recommend bundle from the command line: train, eval, predict with a history and task options."""

import json

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
