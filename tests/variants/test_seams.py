"""The pipeline's seams: step runners looked up by step type, and int8 on ONNX Runtime from Python alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field

from tansuo.bundle import load_bundle, save_bundle
from tansuo.errors import CompressionError, RecipeError
from tansuo.models import create_model
from tansuo.recipe import Strict, validate_recipe
from tansuo.tasks import get_task
from tansuo.variants import (
    STEP_RUNNERS,
    PruneStep,
    QuantizeStep,
    describe,
    onnx_int8_available,
    register_runner,
    run_steps,
    runner_for,
)
from tansuo.variants.runners import move_bundle
from tests.helpers import image_recipe


@pytest.fixture
def vit_bundle(image_npz: Path, tmp_path: Path) -> Path:
    recipe, data = validate_recipe(image_recipe(image_npz, tmp_path / "run"))
    task = get_task(recipe.task).from_recipe(data, recipe.seed, tmp_path / "data")
    torch.manual_seed(0)
    model = create_model("vit_test", **task.model_overrides()).eval()
    return save_bundle(tmp_path / "bundle", model, task)


@dataclass
class CopyStep:
    """A step type the schema does not know, run through a registered runner."""

    step: str = "copy"

    def describe(self) -> str:
        return "copy as is"


def test_a_registered_step_type_runs_in_the_chain(vit_bundle: Path, tmp_path: Path) -> None:
    seen = []

    def run(bundle, step, out: Path) -> Path:
        seen.append((bundle.path, step))
        move_bundle(bundle.path, out)
        return out

    register_runner(CopyStep, run)
    try:
        steps = [CopyStep(), PruneStep(step="prune", heads=0.5, importance="magnitude")]
        out = list(run_steps(vit_bundle, steps, tmp_path / "variants"))
    finally:
        STEP_RUNNERS.pop(CopyStep)
    assert [name for name, _, _ in out] == ["01-copy", "02-prune"]
    assert out[-1][2] == ["copy as is", "prune heads=0.5 ffn=0"]
    assert seen == [(vit_bundle, steps[0])]
    assert [r["step"] for r in load_bundle(out[-1][1]).model.compression] == ["prune"]
    with pytest.raises(CompressionError, match="no runner is registered for CopyStep"):
        runner_for(CopyStep())
    assert describe(QuantizeStep(step="quantize")) == "int8"


def test_onnxruntime_int8_from_python(vit_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tansuo.export.onnx import OnnxModel
    from tansuo.variants import quantize_onnxruntime

    b = load_bundle(vit_bundle)
    assert onnx_int8_available(b.model) and not onnx_int8_available(create_model("gpt_test"))
    int8 = quantize_onnxruntime(b.model, tmp_path / "work", reduce_range=False)
    assert isinstance(int8, OnnxModel)
    assert int8.compression == [
        {
            "step": "quantize",
            "mode": "int8",
            "backend": "onnxruntime",
            "reduce_range": False,
            "per_sample": True,
        }
    ]
    save_bundle(tmp_path / "int8", int8, b.task)
    loaded = load_bundle(tmp_path / "int8").model
    assert isinstance(loaded, OnnxModel) and loaded.compression == int8.compression
    x = b.model.example_input(4)
    with torch.no_grad():
        ref, out = b.model(x), loaded(x)
    assert torch.equal(out, int8(x))
    assert (20 * torch.log10(ref.norm() / (ref - out).norm())).item() > 15  # int8 stays close to fp32


class HalveStep(Strict):
    """A step type registered from outside the schema module: recipes may name it once its runner is in."""

    step: Literal["halve"]
    factor: float = Field(0.5, gt=0, lt=1)

    def describe(self) -> str:
        return f"halve x{self.factor:g}"


def test_a_registered_pydantic_step_is_valid_in_recipes(vit_bundle: Path, tmp_path: Path) -> None:
    from tansuo.variants import load_compress_recipe
    from tansuo.variants.steps import STEP_TYPES

    def run(bundle, step, out: Path) -> Path:
        move_bundle(bundle.path, out)
        return out

    with pytest.raises(RecipeError, match="does not match any of the expected tags"):
        load_compress_recipe(None, {"steps": [{"step": "halve"}]})
    register_runner(HalveStep, run)
    try:
        recipe = load_compress_recipe(
            None, {"steps": [{"step": "halve", "factor": 0.25}, {"step": "quantize"}]}
        )
        assert isinstance(recipe.steps[0], HalveStep) and recipe.steps[0].factor == 0.25
        assert recipe.model_dump()["steps"][0] == {"step": "halve", "factor": 0.25}
        with pytest.raises(RecipeError, match=r"steps.0.halve.factor"):
            load_compress_recipe(None, {"steps": [{"step": "halve", "factor": 2}]})
        out = list(run_steps(vit_bundle, recipe.steps[:1], tmp_path / "variants"))
        assert out[0][2] == ["halve x0.25"]
    finally:
        STEP_RUNNERS.pop(HalveStep)
        STEP_TYPES.pop("halve")
