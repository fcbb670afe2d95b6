"""``tansuo explore`` on a translate recipe, fast: tied against untied embeddings, each kept as trained and
distilled into a one-layer-decoder student; quality is BLEU (stored / 100, maximised) in results.json and
report.md. Measurement runs ``python -m tansuo.measure``'s own ``main`` in this process instead of a fresh
one (the only shortcut); the study with fresh processes is in test_explore_integration.py."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import run, translate_recipe, write_parallel


@pytest.fixture
def measure_here(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """``measure_in_subprocess``'s child command run by its ``main`` in this process; the commands seen."""
    from tansuo.measure import run as measure

    commands: list[list[str]] = []
    threads = torch.get_num_threads()

    def in_process(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:3] == ["-m", "tansuo.measure"]
        commands.append(cmd)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            measure.main(cmd[3:])
        return subprocess.CompletedProcess(cmd, 0, out.getvalue(), "")

    monkeypatch.setattr(measure.subprocess, "run", in_process)
    yield commands
    torch.set_num_threads(threads)  # the child's --threads set this process's


def test_a_translation_study_compares_tied_and_untied_embeddings_and_a_student_by_bleu(
    tmp_path: Path, measure_here: list, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    study = tmp_path / "study"
    raw = translate_recipe(write_parallel(tmp_path / "copy", 80, seed=4), tmp_path / "run", max_steps=12)
    raw["data"].update(beam_size=2, max_len_extra=3)
    raw["explore"] = {
        "study": str(study),
        "candidates": [{"model": "seq2seq_test", "space": {"tie_embeddings": [True, False]}}],
        "variants": [
            {"name": "plain"},
            {
                "name": "student",
                "steps": [
                    {"step": "distill", "overrides": {"num_decoder_layers": 1}, "train": {"max_steps": 4}}
                ],
            },
        ],
        "objectives": ["quality", "latency"],
        "sampler": "grid",
        "measure": {"threads": 1, "reps": 3, "large_batch": 2, "seq_len": 6},
    }
    recipe = tmp_path / "explore.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, out, err = run(["explore", str(recipe), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert len(measure_here) == 4  # two trials x two variants, each measured
    results = json.loads((study / "results.json").read_text())
    assert results["metric"] == "bleu" and results["quality_direction"] == "maximize"
    assert results["counts"]["complete"] == 2
    rows = {(r["overrides"]["tie_embeddings"], r["variant"]): r for r in results["variants"]}
    assert set(rows) == {(tied, v) for tied in (True, False) for v in ("plain", "student")}
    for r in rows.values():
        assert r["status"] == "ok", r.get("reason")
        figures = r["figures"]
        assert figures["metric"] == "bleu" and "chrf" in figures["metrics"]
        assert figures["quality"] == pytest.approx(figures["metrics"]["bleu"] / 100)  # BLEU points / 100
        assert 0.0 <= figures["quality"] <= 1.0 and figures["latency_ms_p50"] > 0
    for tied in (True, False):  # the student is smaller than its teacher; untied has more parameters
        assert rows[tied, "student"]["figures"]["params"] < rows[tied, "plain"]["figures"]["params"]
    assert rows[False, "plain"]["figures"]["params"] > rows[True, "plain"]["figures"]["params"]
    md = (study / "report.md").read_text()
    assert "Quality: bleu on the held-back `test` split (x100)" in md
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines() if "/" in line}
    for r in rows.values():  # the report's quality column is each variant's BLEU in points
        assert table[r["id"]][3] == f"{r['figures']['metrics']['bleu']:.2f}"
    assert "bleu x100" in (study / "report.html").read_text()  # the plots' quality axis
