"""Accuracy-aware int8: sensitivity ranking, the fallback search, and the step end to end on a tiny bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tansuo.bundle import load_bundle, save_bundle
from tansuo.compress.quantize import quantized_engine
from tansuo.errors import CompressionError
from tansuo.variants import QuantizeStep, load_compress_recipe, recipe_from_options
from tansuo.variants.accuracy import drop, fallback_search, rank_layers
from tansuo.variants.runners import run_quantize
from tests.helpers import image_recipe, make_trainer


def _engine() -> None:
    try:
        quantized_engine()
    except CompressionError as e:
        pytest.skip(str(e))


def test_drop_is_points_for_accuracy_and_units_for_a_loss() -> None:
    assert drop(0.90, 0.895, maximize=True) == pytest.approx(0.5)
    assert drop(2.0, 2.1, maximize=False) == pytest.approx(0.1)
    assert drop(0.90, 0.91, maximize=True) < 0


def test_the_search_stops_at_the_first_variant_within_the_limit() -> None:
    hurt = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}  # quality each layer costs in int8 (points / 100)
    built: list[list[str]] = []

    def build(fp32: list[str]) -> nn.Module:
        built.append(fp32)
        m = nn.Identity()
        m.fp32 = set(fp32)
        return m

    def quality(m: nn.Module) -> float:
        return 1.0 - sum(v for k, v in hurt.items() if k not in m.fp32) / 100

    order = ["a", "b", "c", "d"]
    result = fallback_search(order, build, quality, reference=1.0, max_drop=0.35)
    assert result.fp32_layers == ["a", "b"] and result.model is not None and result.model.fp32 == {"a", "b"}
    assert built == [["a"], ["a", "b"]]  # stopped at the first within: no further layer tried
    assert [s.drop for s in result.steps] == pytest.approx([0.6, 0.3])
    assert result.record()["within_limit"] is True


def test_the_search_never_returns_a_variant_outside_the_limit() -> None:
    def build(fp32: list[str]) -> nn.Module:
        return nn.Identity()

    result = fallback_search(["a", "b", "c"], build, lambda m: 0.5, reference=1.0, max_drop=1.0, max_layers=2)
    assert result.model is None and result.fp32_layers == ["a", "b"] and len(result.steps) == 2
    assert result.record()["within_limit"] is False


def test_rank_layers_puts_the_most_sensitive_first() -> None:
    snr = {"x": 30.0, "y": 5.0, "z": 18.0}
    assert rank_layers(list(snr), snr.__getitem__) == [("y", 5.0), ("z", 18.0), ("x", 30.0)]


@pytest.fixture(scope="module")
def damaged_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A trained ViT whose classifier int8 cannot represent: an outlier weight (500) on a feature the final
    norm holds at zero, so fp32 is unchanged but int8's per-channel scale of that class's row rounds the row's
    other weights to zero (the class's logit loses its evidence)."""
    tmp = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    y = np.arange(240) % 4
    x = rng.uniform(0, 2, size=(240, 8, 8))
    for i, label in enumerate(y):  # each class a bright bar in its own place: learnt in a few steps
        x[i, 1 + 2 * label : 3 + 2 * label, :] += 12
    np.savez(tmp / "images.npz", x=x.astype(np.float32), y=y)
    raw = image_recipe(tmp / "images.npz", tmp / "run", max_steps=120, eval_every=120, lr=1e-2)
    bundle = load_bundle(make_trainer(raw).fit()["bundle"])
    name = "head"
    with torch.no_grad():
        norm = bundle.model.get_submodule("encoder.final_norm")
        norm.weight[0] = norm.bias[0] = 0.0  # feature 0 is zero for every input
        for row in range(4):
            bundle.model.head.weight[row, 0] = 500.0
    return save_bundle(tmp / "bundle", bundle.model, bundle.task, bundle.metrics), name


def test_sensitivity_ranks_a_deliberately_damaged_layer_first(damaged_bundle, tmp_path: Path) -> None:
    _engine()
    path, damaged = damaged_bundle
    b = load_bundle(path)
    step = QuantizeStep(step="quantize", backend="torch", reduce_range=True, max_drop=0.0, max_fp32_layers=2)
    run_quantize(b, step, tmp_path / "int8")
    q = load_bundle(tmp_path / "int8")
    info = q.model.compression[-1]["accuracy_aware"]
    ranked = list(info["sensitivity_db"])
    assert ranked[0] == damaged
    assert info["fp32_layers"][0] == damaged and info["whole_model_drop"] >= 0
    assert damaged not in q.model.compression[-1]["modules"]  # it stayed fp32 in the bundle, too
    assert isinstance(q.model.get_submodule(damaged), nn.Linear)


def test_the_step_keeps_layers_in_fp32_until_within_and_the_bundle_loads_back(
    damaged_bundle, tmp_path
) -> None:
    _engine()
    path, damaged = damaged_bundle
    b = load_bundle(path)
    step = QuantizeStep(step="quantize", backend="torch", reduce_range=True, max_drop=0.0, max_fp32_layers=3)
    run_quantize(b, step, tmp_path / "int8")
    q = load_bundle(tmp_path / "int8")
    record = q.model.compression[-1]
    info = record["accuracy_aware"]
    assert info["whole_model_drop"] > 50  # the damaged classifier in int8 loses most of the accuracy
    assert info["within_limit"] and info["fp32_layers"] == [damaged]  # stopped at the first within
    assert info["steps"] == [
        {"fp32": damaged, "quality": 1.0, "drop": 0.0, "seconds": info["steps"][0]["seconds"]}
    ]
    assert record["modules"] and damaged not in record["modules"]
    # the partly quantized bundle replays its record: the same outputs as the model that was saved
    again = load_bundle(tmp_path / "int8")
    x = b.model.example_input(3)
    with torch.inference_mode():
        assert torch.equal(q.model(x), again.model(x))


def test_max_drop_makes_the_cli_int8_step_accuracy_aware() -> None:
    recipe = recipe_from_options(quantize="int8", max_drop=0.5)
    assert recipe.steps[-1].max_drop == 0.5 and recipe.max_drop == 0.5
    assert recipe_from_options(quantize="int8").steps[-1].max_drop is None
    yaml_step = load_compress_recipe(None, {"steps": [{"step": "quantize", "max_drop": 0.2}]}).steps[0]
    assert yaml_step.max_drop == 0.2 and yaml_step.max_fp32_layers == 8


def test_compress_reports_which_layers_stayed_fp32(damaged_bundle, tmp_path: Path) -> None:
    _engine()
    from tansuo.variants import compress

    path, damaged = damaged_bundle
    recipe = recipe_from_options(quantize="int8", quantize_backend="torch", max_drop=0.5)
    recipe = recipe.model_copy(update={"reps": 10, "speed_rounds": 1})
    report = compress(path, recipe, tmp_path / "run")
    fallback = report["variants"][1]["int8_fallback"]
    assert fallback["fp32_layers"] == [damaged] and fallback["within_limit"]
    assert report["chosen"] == "01-quantize"  # within the limit on the held-out split too
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"Kept in fp32, most sensitive first: +{damaged} -> 1.0000" in text


def test_smoothquant_competes_with_the_plain_ranges_by_snr(damaged_bundle, tmp_path: Path) -> None:
    _engine()
    path, _ = damaged_bundle
    step = QuantizeStep(step="quantize", backend="torch")  # reduce_range and smooth: auto
    run_quantize(load_bundle(path), step, tmp_path / "int8")
    record = load_bundle(tmp_path / "int8").model.compression[-1]
    snr = record["sqnr_db"]
    assert set(snr) == {"torch 7-bit", "torch 8-bit", "torch 7-bit smooth 0.5", "torch 8-bit smooth 0.5"}
    best = max(snr, key=snr.get)
    assert ("smooth" in best) == ("smooth" in record)  # the candidate kept is the one with the highest SNR
    assert ("8-bit" in best) == (record["reduce_range"] is False)
    off = QuantizeStep(step="quantize", backend="torch", smooth="off", reduce_range=True)
    run_quantize(load_bundle(path), off, tmp_path / "plain")
    assert list(load_bundle(tmp_path / "plain").model.compression[-1]["sqnr_db"]) == ["torch 7-bit"]
    with pytest.raises(ValueError, match="smooth"):
        QuantizeStep(step="quantize", smooth=1.5)
