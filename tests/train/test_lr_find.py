"""The learning-rate range test: the sweep, the smoothing, the suggestion, and ``tansuo lr-find``."""

import math
from pathlib import Path

import pytest

from tansuo.errors import RecipeError
from tansuo.recipe import validate_recipe
from tansuo.train.lr_find import find_lr, lr_sweep, smooth_losses, suggest_lr
from tests.helpers import image_recipe, run, write_recipe


def test_sweep_is_exponential_between_the_bounds() -> None:
    lrs = lr_sweep(1e-4, 1.0, 5)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert [b / a for a, b in zip(lrs, lrs[1:], strict=False)] == pytest.approx([10.0] * 4)
    with pytest.raises(RecipeError, match="0 < --min-lr < --max-lr"):
        lr_sweep(1.0, 1e-3, 10)
    with pytest.raises(RecipeError, match="at least 2"):
        lr_sweep(1e-3, 1.0, 1)


def test_smoothing_is_a_bias_corrected_moving_average() -> None:
    assert smooth_losses([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    out = smooth_losses([1.0, 3.0], 0.5)
    assert out == pytest.approx([1.0, (0.25 * 1.0 + 0.5 * 3.0) / 0.75])


def test_suggestion_is_the_steepest_descent_before_the_minimum() -> None:
    lrs = lr_sweep(1e-6, 1.0, 61)
    # a loss that falls fastest at lr 1e-3 (a logistic in log10 lr), then blows up past 1e-1
    losses = [
        2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (50 * (lr - 0.1) if lr > 0.1 else 0.0)
        for lr in lrs
    ]
    suggestion, method = suggest_lr(lrs, losses)
    assert method == "steepest descent"
    assert suggestion == pytest.approx(1e-3, rel=0.3)
    short, rule = suggest_lr([1e-3, 1e-2], [1.0, 0.5])
    assert rule == "minimum / 10" and short == pytest.approx(1e-3)


def test_range_test_on_a_toy_problem(image_npz: Path, tmp_path: Path) -> None:
    rec, data = validate_recipe(image_recipe(image_npz, tmp_path / "run", batch_size=32))
    result = find_lr(rec, data, min_lr=1e-5, max_lr=10.0, num_steps=40)
    assert rec.train.out_dir and not (tmp_path / "run").exists()  # nothing written: data went to a temp dir
    assert 2 <= len(result.lrs) <= 40 and len(result.losses) == len(result.smoothed) == len(result.lrs)
    assert 1e-5 <= result.suggestion <= 10.0
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert min(result.smoothed) < result.smoothed[0]  # the loss fell somewhere in the sweep
    if result.stopped is not None:
        assert "rose above" in result.stopped or "became" in result.stopped


def test_lr_find_command_writes_the_plot_and_prints_the_setting(
    image_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", image_recipe(image_npz, tmp_path / "run"))
    plot = tmp_path / "plots" / "lr.png"
    args = ["lr-find", str(recipe), "--steps", "20", "--min-lr", "1e-4", "--max-lr", "1", "--plot", str(plot)]
    code, out, err = run(args, monkeypatch, capsys)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested learning rate" in out
    value = float(out.split("--set train.lr=")[1].split()[0])
    assert 1e-4 <= value <= 1.0
    assert not (tmp_path / "run").exists()
    code, _, err = run(["lr-find", str(recipe), "--min-lr", "1", "--max-lr", "0.1"], monkeypatch, capsys)
    assert code == 2 and "--min-lr" in err
