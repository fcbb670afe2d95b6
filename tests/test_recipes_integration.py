"""The shipped digits recipes reach the accuracy their headers promise (run by .ci/run, about 2 minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.integration
@pytest.mark.parametrize(("recipe", "target"), [("digits-vit", 0.97), ("digits-cnn", 0.98)])
def test_digits_recipe_reaches_target(recipe: str, target: float, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tansuo.cli", "train", f"recipes/{recipe}.yaml", "--quiet"]
    cmd += ["--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "bundle written to" in done.stdout
    metrics = json.loads((tmp_path / "bundle" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= target, metrics
