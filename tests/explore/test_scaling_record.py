"""A tiny lm scaling study: every trial records N, D, FLOPs, MFU, seconds and the validation loss, consistent
with the model's shape and the trial's budget, in trial.json and in the study's results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tansuo.explore.schema import load_explore
from tansuo.models import create_model
from tests.explore.helpers import figures


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_lm_trials_record_what_a_scaling_law_needs(text_file: Path, tmp_path: Path, monkeypatch) -> None:
    import tansuo.measure
    import tansuo.measure.flops as flops
    from tansuo.explore.results import finish_study
    from tansuo.explore.search import open_study, run_study

    # measuring each variant in a fresh process is explore's own business (tested there); the peak is given
    monkeypatch.setattr(flops, "matmul_peak", lambda device, n=None, repeats=5: 2.0e10)
    flops._PEAKS.clear()
    monkeypatch.setattr(
        tansuo.measure,
        "measure_in_subprocess",
        lambda path, threads, **kw: {**figures(2.0, 1.0, 0.1), "metric": "loss", "split": "val"},
    )
    raw = {
        "task": "lm",
        "seed": 0,
        "data": {"path": str(text_file), "block_size": 16, "eval_windows": 8},
        "model": {"name": "gpt_test"},
        "train": {"max_steps": 5, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "log_every": 2},
        "explore": {
            "study": str(tmp_path / "study"),
            "candidates": [
                {"model": "gpt_test", "label": "w16", "overrides": {"embed_dim": 16, "dropout": 0.0}},
                {"model": "gpt_test", "label": "w32", "overrides": {"embed_dim": 32, "dropout": 0.0}},
            ],
            "train": {"max_steps": [2, 5]},
            "objectives": ["quality"],
            "sampler": "grid",
        },
    }
    spec = load_explore(raw, "scaling.yaml")
    study = open_study(spec, raw)
    assert run_study(spec, study) == 4
    results, _, _ = finish_study(study, spec, "sqlite:///x", copy=False)

    seen = set()
    for t in results["trials"]:
        s = t["scaling"]
        folder = tmp_path / "study" / "trials" / f"{t['number']:04d}"
        assert json.loads((folder / "trial.json").read_text())["scaling"] == s
        width, steps = t["settings"]["overrides"]["embed_dim"], t["settings"]["train"]["max_steps"]
        vocab = s["config"]["vocab_size"]
        model = create_model("gpt_test", embed_dim=width, vocab_size=vocab, max_seq_len=16)
        n = model.num_params(exclude_embeddings=True)
        L, V = model.config.num_layers, model.config.vocab_size
        assert s["params"] == n and s["params_total"] == sum(p.numel() for p in model.parameters())
        assert s["tokens"] == steps * 2 * 16 and s["unit"] == "tokens" and s["context"] == 16
        assert s["flops"] == s["tokens"] * (6 * n + 6 * L * 16 * width + 6 * V * width)
        assert s["peak_flops"] == 2.0e10 and "torch.mm" in s["peak_source"]
        assert s["mfu"] == pytest.approx(s["flops"] / (s["step_seconds"] * 2.0e10))
        assert 0 < s["step_seconds"] <= s["wall_seconds"] == pytest.approx(t["train_seconds"])
        assert s["val"]["loss"] > 0 and s["best_step"] == s["steps"] == steps  # evaluated at the end only
        seen.add((n, s["tokens"]))
    assert len(seen) == 4  # two sizes x two budgets
