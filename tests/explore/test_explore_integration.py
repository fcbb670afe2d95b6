"""`tansuo explore` end to end on tiny synthetic data: a study with a failing trial, the report command,
resume after a kill (no trial runs twice), and two workers sharing one PostgreSQL study."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tansuo.bundle import load_bundle
from tansuo.explore.search import open_storage
from tests.explore.helpers import explore_raw
from tests.helpers import run

pytestmark = pytest.mark.integration

TANSUO = [sys.executable, "-c", "from tansuo.cli import main; main()"]


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "explore.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _study(folder: Path, storage: str | None = None) -> optuna.Study:
    from tansuo.explore.search import open_storage  # retries while a worker is still creating the tables

    url = storage or f"sqlite:///{folder / 'optuna.db'}"
    return optuna.load_study(storage=open_storage(url), study_name=folder.name)


def _point(t: optuna.trial.FrozenTrial) -> str:
    return json.dumps(t.params, sort_keys=True)


def test_tiny_study_end_to_end(image_npz: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    study_dir = tmp_path / "study"
    raw = explore_raw(image_npz, study_dir)
    raw["explore"]["candidates"] = [
        {"model": "vit_test", "space": {"num_heads": [2, 3]}},  # 16 % 3 != 0: an invalid combination
        {"model": "resnet_test"},
    ]
    raw["explore"]["variants"] += [
        {
            "name": "pruned",
            "families": ["vit"],
            "steps": [
                {"step": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude", "finetune_steps": 4}
            ],
        },
        {
            "name": "distilled",
            "families": ["vit"],
            "steps": [{"step": "distill", "overrides": {"num_layers": 1}, "train": {"max_steps": 6}}],
        },
    ]
    raw["explore"]["constraints"] = ["size <= 50"]
    recipe = _write(tmp_path, raw)
    code, out, err = run(["explore", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert "Pareto front" in out and "recommended (*)" in out and "report.html" in out
    assert "failed: invalid combination" in err and "divisible" in err

    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"] == {"complete": 2, "fail": 1, "running": 0}
    names = {(r["candidate"], r["variant"]) for r in results["variants"]}
    assert names == {("vit_test", n) for n in ("plain", "int8", "pruned", "distilled")} | {
        ("resnet_test", "plain"),
        ("resnet_test", "int8"),
    }
    for r in results["variants"]:
        assert r["status"] == "ok", r.get("reason")
        f = r["figures"]
        assert f["threads"] == 1 and f["split"] == "test" and 0.0 <= f["quality"] <= 1.0
        assert 0 < f["latency_ms_p50"] <= f["latency_ms_p95"] and f["train_seconds"] > 0
    pruned = next(r for r in results["variants"] if r["variant"] == "pruned")
    plain = next(r for r in results["variants"] if r["variant"] == "plain" and r["candidate"] == "vit_test")
    assert pruned["figures"]["params"] < plain["figures"]["params"]
    assert results["recommended"] in results["pareto"]
    best = load_bundle(study_dir / "best", device="cpu")
    assert best.model.num_params() > 0
    curves = [t["curves"] for t in results["trials"] if t["state"] == "complete"]
    assert all(len(c["train_loss"]) >= 2 and c.get("val_accuracy") for c in curves)
    assert 'id="plot-quality-latency"' in (study_dir / "report.html").read_text()

    # the same command again refuses to overwrite; --resume finds nothing left to run
    code, _, err = run(["explore", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 2 and "--resume" in err
    code, out, err = run(["explore", str(recipe), "--quiet", "--resume"], monkeypatch, capsys)
    assert code == 0, err
    assert len(_study(study_dir).get_trials()) == 3

    (study_dir / "report.html").unlink()
    code, out, err = run(["report", str(study_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert (study_dir / "report.html").is_file() and results["recommended"] in out


def test_resume_after_kill_runs_no_trial_twice(image_npz: Path, tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    raw = explore_raw(image_npz, study_dir)
    raw["train"]["max_steps"] = 60
    raw["explore"]["variants"] = [{"name": "plain"}]
    recipe = _write(tmp_path, raw)
    proc = subprocess.Popen([*TANSUO, "explore", str(recipe), "--quiet"], cwd=tmp_path)
    deadline = time.monotonic() + 300
    try:
        while True:  # kill it in the middle of a trial, after at least one finished
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline
            if (study_dir / "optuna.db").exists():
                try:
                    trials = _study(study_dir).get_trials()
                except KeyError:  # the study is being created
                    trials = []
                states = [t.state for t in trials]
                if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                    break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {t.number: t for t in _study(study_dir).get_trials() if t.state == TrialState.COMPLETE}
    killed = [t.number for t in _study(study_dir).get_trials() if t.state == TrialState.RUNNING]
    assert before and len(killed) == 1

    done = subprocess.run([*TANSUO, "explore", str(recipe), "--quiet", "--resume"], cwd=tmp_path)
    assert done.returncode == 0
    trials = _study(study_dir).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    grid = {json.dumps(p, sort_keys=True) for p in explore_raw_grid(raw)}
    assert sorted(_point(t) for t in complete) == sorted(grid)  # every grid point exactly once
    for number, t in before.items():  # finished trials are kept as they were, not run again
        assert trials[number].state == TrialState.COMPLETE
        assert trials[number].datetime_complete == t.datetime_complete
    cut = trials[killed[0]]
    assert cut.state == TrialState.FAIL and cut.user_attrs["fail_reason"] == "interrupted"
    retry = [t for t in complete if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].params == cut.params


def explore_raw_grid(raw: dict[str, Any]) -> list[dict[str, Any]]:
    from tansuo.explore.schema import load_explore

    return load_explore(raw, "r.yaml").grid()


def test_two_workers_share_one_postgresql_study(image_npz: Path, tmp_path: Path, postgres_url: str) -> None:
    study_dir = tmp_path / "study"
    raw = explore_raw(image_npz, study_dir)
    raw["explore"]["candidates"] = [
        {"model": "vit_test", "space": {"embed_dim": [8, 16]}},
        {"model": "resnet_test", "space": {"width": [4, 8]}},
    ]
    raw["explore"]["variants"] = [{"name": "plain"}]
    recipe = _write(tmp_path, raw)
    args = [*TANSUO, "explore", str(recipe), "--quiet", "--worker", "--storage", postgres_url]
    workers = [subprocess.Popen(args, cwd=tmp_path) for _ in range(2)]
    codes = [w.wait(timeout=600) for w in workers]
    assert codes == [0, 0]
    study = optuna.load_study(storage=open_storage(postgres_url), study_name="study")
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    points = [_point(t) for t in trials]
    assert len(points) == 4 and len(set(points)) == 4  # the whole grid, no point run twice
    ran_by = {t.user_attrs["worker"] for t in trials}
    assert len(ran_by) == 2, f"one worker ran every trial: {ran_by}"
    code = subprocess.run([*TANSUO, "report", str(study_dir), "--storage", postgres_url], cwd=tmp_path)
    assert code.returncode == 0
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"]["complete"] == 4 and results["recommended"] is not None


def test_lora_rank_by_weight_only_quantization(text_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An lm study over LoRA ranks (candidates with train.lora) x weight-only quantization (variants): every
    variant is measured, quality is the loss, and the quantized variants hold the merged adapters in int8 /
    int4 layers while the plain one keeps its adapters."""
    study_dir = tmp_path / "study"
    raw = {
        "task": "lm",
        "seed": 3,
        "data": {"path": str(text_file), "block_size": 32, "eval_windows": 16},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 2, "threads": 1},
        "explore": {
            "study": str(study_dir),
            "candidates": [
                {"model": "gpt_test", "label": "lora-r2", "train": {"lora": {"r": 2, "alpha": 4}}},
                {"model": "gpt_test", "label": "lora-r8", "train": {"lora": {"r": 8, "alpha": 16}}},
            ],
            "variants": [
                {"name": "plain"},
                {"name": "int8w", "steps": [{"step": "quantize", "mode": "int8-weight"}]},
                {"name": "int4w", "steps": [{"step": "quantize", "mode": "int4-weight", "group_size": 32}]},
            ],
            "objectives": ["quality", "size"],
            "sampler": "grid",
            "measure": {"threads": 1, "reps": 10},
        },
    }
    code, out, err = run(["explore", str(_write(tmp_path, raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"] == {"complete": 2, "fail": 0, "running": 0}
    rows = {(r["candidate"], r["variant"]): r for r in results["variants"]}
    assert set(rows) == {(c, v) for c in ("lora-r2", "lora-r8") for v in ("plain", "int8w", "int4w")}
    for (candidate, variant), r in rows.items():
        assert r["status"] == "ok", r.get("reason")
        steps = [c["step"] for c in load_bundle(r["path"]).config.get("compression", [])]
        assert steps == (["lora"] if variant == "plain" else ["weight_only"]), (candidate, variant, steps)
        assert r["figures"]["quality"] > 0  # a loss
    for c in ("lora-r2", "lora-r8"):
        assert rows[(c, "int4w")]["figures"]["size_bytes"] < rows[(c, "plain")]["figures"]["size_bytes"]


def test_a_translation_study_is_ranked_by_bleu(tmp_path: Path, monkeypatch, capsys) -> None:
    """A translate recipe explores like any other: two depths x (plain, int8), quality is BLEU (stored /
    100 as every quality in [0, 1] is, maximised), each variant's figure is the BLEU of its own bundle."""
    from tests.helpers import translate_recipe, write_parallel

    study_dir = tmp_path / "study"
    raw = translate_recipe(write_parallel(tmp_path / "copy", 300, seed=4), tmp_path / "run", max_steps=120)
    raw["explore"] = {
        "study": str(study_dir),
        "candidates": [{"model": "seq2seq_test", "space": {"num_decoder_layers": [1, 2]}}],
        "variants": [
            {"name": "plain"},
            {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}]},
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 5},
    }
    code, out, err = run(["explore", str(_write(tmp_path, raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"]["complete"] == 2 and results["quality_direction"] == "maximize"
    assert len(results["variants"]) == 4
    for r in results["variants"]:
        assert r["status"] == "ok", r.get("reason")
        figures = r["figures"]
        assert figures["metric"] == "bleu"
        assert figures["quality"] == pytest.approx(figures["metrics"]["bleu"] / 100)
        assert 0.05 < figures["quality"] <= 1.0  # 120 steps: the copy task is partly learnt
    assert results["recommended"] is not None


def test_a_recommendation_study_compares_sasrec_gru4rec_and_mf_by_ndcg(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A recommend recipe explores like any other: three model families, int8 where there are Linear
    layers, quality is the full-ranking NDCG@10 of each variant's own bundle (a fraction, maximised)."""
    from tests.helpers import recommend_recipe, write_interactions

    study_dir = tmp_path / "study"
    raw = recommend_recipe(write_interactions(tmp_path / "log.tsv"), tmp_path / "run", max_steps=120)
    raw["explore"] = {
        "study": str(study_dir),
        "candidates": [{"model": "sasrec_test"}, {"model": "gru4rec_test"}, {"model": "mf_test"}],
        "variants": [
            {"name": "plain"},
            {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}], "families": ["sasrec"]},
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 5},
    }
    code, out, err = run(["explore", str(_write(tmp_path, raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"]["complete"] == 3 and results["quality_direction"] == "maximize"
    rows = {(r["candidate"], r["variant"]): r for r in results["variants"]}
    assert set(rows) == {
        ("sasrec_test", "plain"),
        ("sasrec_test", "int8"),
        ("gru4rec_test", "plain"),
        ("mf_test", "plain"),
    }
    for r in rows.values():
        assert r["status"] == "ok", r.get("reason")
        assert r["figures"]["metric"] == "ndcg@10"
        assert r["figures"]["quality"] == pytest.approx(r["figures"]["metrics"]["ndcg@10"])
    # the sequence models learn the cycle; order-free MF cannot tell which seen item came last
    assert (
        rows[("sasrec_test", "plain")]["figures"]["quality"]
        > rows[("mf_test", "plain")]["figures"]["quality"]
    )
    assert results["recommended"] is not None


def test_a_segmentation_study_compares_a_vit_and_a_unet_by_miou(tmp_path: Path, monkeypatch, capsys) -> None:
    """A segment recipe explores like any other: a ViT segmenter (plain and int8) against a U-Net, quality
    is the mIoU of each variant's own bundle (a fraction, maximised)."""
    from tests.helpers import segment_recipe, write_digits_csv

    study_dir = tmp_path / "study"
    csv = write_digits_csv(tmp_path / "digits.csv", 40, digits=3)
    raw = segment_recipe(csv, tmp_path / "run", max_steps=40)
    raw["explore"] = {
        "study": str(study_dir),
        "candidates": [{"model": "segmenter_test"}, {"model": "unet_test"}],
        "variants": [
            {"name": "plain"},
            {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}], "families": ["segmenter"]},
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 5},
    }
    code, out, err = run(["explore", str(_write(tmp_path, raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"]["complete"] == 2 and results["quality_direction"] == "maximize"
    rows = {(r["candidate"], r["variant"]): r for r in results["variants"]}
    assert set(rows) == {("segmenter_test", "plain"), ("segmenter_test", "int8"), ("unet_test", "plain")}
    for r in rows.values():
        assert r["status"] == "ok", r.get("reason")
        assert r["figures"]["metric"] == "miou"
        assert r["figures"]["quality"] == pytest.approx(r["figures"]["metrics"]["miou"])
        assert 0 < r["figures"]["quality"] <= 1
    assert results["recommended"] is not None


def test_a_detection_study_compares_a_vit_and_a_cnn_detector_by_map(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A detect recipe explores like any other: the ViT detector (plain and int8) against the CNN detector,
    quality is COCO mAP@[.5:.95] of each variant's own bundle (a fraction, maximised)."""
    from tests.helpers import detect_recipe, write_yolo_boxes

    study_dir = tmp_path / "study"
    raw = detect_recipe(write_yolo_boxes(tmp_path / "d", train=8, val=4, seed=1), tmp_path / "run")
    raw["data"]["augment"] = False
    raw["train"]["max_steps"] = 40
    raw["explore"] = {
        "study": str(study_dir),
        "candidates": [{"model": "vit_det_test"}, {"model": "resnet_det_test"}],
        "variants": [
            {"name": "plain"},
            {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}], "families": ["vit_det"]},
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 5},
    }
    code, out, err = run(["explore", str(_write(tmp_path, raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((study_dir / "results.json").read_text())
    assert results["counts"]["complete"] == 2 and results["quality_direction"] == "maximize"
    rows = {(r["candidate"], r["variant"]): r for r in results["variants"]}
    assert set(rows) == {("vit_det_test", "plain"), ("vit_det_test", "int8"), ("resnet_det_test", "plain")}
    for r in rows.values():
        assert r["status"] == "ok", r.get("reason")
        assert r["figures"]["metric"] == "map"
        assert r["figures"]["quality"] == pytest.approx(r["figures"]["metrics"]["map"])
        assert 0 <= r["figures"]["quality"] <= 1 and "map_50" in r["figures"]["metrics"]
    assert max(r["figures"]["quality"] for r in rows.values()) > 0  # something was learned in 40 steps
    assert results["recommended"] is not None
