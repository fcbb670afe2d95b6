import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tansuo.errors import TansuoError
from tansuo.train import checkpoint as ckpt


def test_round_trip_nested_state_exactly(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "n": 7}
    ckpt.save_checkpoint(tmp_path / "c.safetensors", state)
    back = ckpt.load_checkpoint(tmp_path / "c.safetensors")
    assert back["n"] == 7
    assert torch.equal(back["rng"], state["rng"])
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    # integer keys and tuples survive, so the optimizer accepts its state back
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)})

    def broken_save(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(3)})
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind


_WRITER = """
import sys, torch
from tansuo.train.checkpoint import save_checkpoint
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"i": i, "w": torch.full((256, 1024), float(i))})
"""


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = ckpt.load_checkpoint(path)
        assert torch.equal(state["w"], torch.full((256, 1024), float(state["i"])))


def test_missing_and_corrupt_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(TansuoError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(TansuoError, match="unreadable"):
        ckpt.load_checkpoint(bad)
