"""Ctrl-C in the middle of `tansuo train`, then `--resume`: the same weights as a run never interrupted."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tansuo.train.checkpoint import load_checkpoint

ROOT = Path(__file__).parents[1]
ARGS = ["--quiet", "--set", "model.name=resnet_test", "--set", "train.epochs=12", "--set", "train.threads=1"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tansuo.cli", "train", "recipes/digits-cnn.yaml", "--out", str(out), *ARGS]
    # a shell's background jobs ignore SIGINT; give the child Python's usual Ctrl-C behaviour
    return subprocess.Popen(
        [*cmd, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.integration
def test_interrupt_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = _train(tmp_path / "full")
    interrupted = _train(tmp_path / "cut")
    checkpoint = tmp_path / "cut" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, err
    assert "--resume" in err
    step = load_checkpoint(checkpoint)["trainer"]["step"]
    assert 0 < step < 528  # stopped part way (12 epochs of 44 steps)

    resumed = _train(tmp_path / "cut", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    a = load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")
    b = load_checkpoint(checkpoint)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 528
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
