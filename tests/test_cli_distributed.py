"""``tansuo train --nproc-per-node``: the launcher's flags checked, a run on two processes through torchrun,
and a rank killed in the middle ending the run with a message naming it, then ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tansuo.train.checkpoint import load_checkpoint
from tests.helpers import lm_recipe, run, write_recipe

ROOT = Path(__file__).parents[1]


def test_launcher_flags_are_checked(
    text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(text_file, tmp_path / "run"))
    code, _, err = run(["train", str(recipe), "--nproc-per-node", "0"], monkeypatch, capsys)
    assert code == 2 and "--nproc-per-node must be 1 or more" in err
    code, _, err = run(["train", str(recipe), "--set", "train.parallel=fsdp", "--quiet"], monkeypatch, capsys)
    assert code == 2 and "train.parallel: fsdp" in err and "--nproc-per-node" in err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def _pids_of_rank(rank: int, mark: str) -> list[int]:
    """Processes whose environment holds ``RANK=rank`` and our ``mark`` (torchrun's workers of this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if f"RANK={rank}".encode() in env and f"TANSUO_TEST_MARK={mark}".encode() in env:
            found.append(int(entry.name))
    return found


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_run_naming_it_then_resume(text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = lm_recipe(text_file, out, max_steps=100_000, checkpoint_every=5, threads=1, log_every=5)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    mark = uuid.uuid4().hex
    env = {**os.environ, "TANSUO_TEST_MARK": mark}
    cmd = [sys.executable, "-m", "tansuo", "train", str(recipe), "--nproc-per-node", "2", "--quiet"]
    launched = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    checkpoint = out / "checkpoint.safetensors"
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and time.monotonic() < deadline and launched.poll() is None:
        time.sleep(0.1)
    assert checkpoint.exists(), launched.communicate(timeout=60)
    victims = _pids_of_rank(1, mark)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = launched.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # the other rank was stopped, no hang until a timeout
    assert launched.returncode not in (0, None)
    assert "rank 1 failed" in err and "SIGKILL" in err, err
    assert _pids_of_rank(0, mark) == []

    step = load_checkpoint(checkpoint)["trainer"]["step"]
    assert step % 5 == 0 and step > 0
    more = [*cmd, "--resume", "--set", f"train.max_steps={step + 4}"]
    resumed = subprocess.run(more, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "global batch 8 = 4 per rank x 2 ranks x 1 accumulation" in resumed.stdout
    assert load_checkpoint(checkpoint)["trainer"]["step"] == step + 4
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["step"] == step + 4
