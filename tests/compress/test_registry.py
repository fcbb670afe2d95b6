"""The technique registry: the Python API alone makes loadable compressed bundles, restore dispatches by the
record's step, pruning follows the model's ``prunable`` declaration, and a technique registered outside
``src`` round-trips through bundles (the seam)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tansuo.bundle import load_bundle, save_bundle
from tansuo.compress import (
    Int8DynamicConfig,
    Int8DynamicLinear,
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    prune_,
    quantize_,
    restore_structure,
)
from tansuo.compress.registry import (
    apply_technique,
    get_technique,
    list_steps,
    register_technique,
    unregister_technique,
)
from tansuo.errors import BundleError, CompressionError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.tasks import get_task
from tests.helpers import image_recipe


@pytest.fixture
def vit_and_task(image_npz: Path, tmp_path: Path) -> tuple[nn.Module, Any]:
    recipe, data = validate_recipe(image_recipe(image_npz, tmp_path))
    task = get_task(recipe.task).from_recipe(data, recipe.seed, tmp_path / "data")
    torch.manual_seed(0)
    return create_model("vit_test", **task.model_overrides()).eval(), task


def _round_trip(model: nn.Module, task: Any, path: Path) -> nn.Module:
    save_bundle(path, model, task)
    loaded = load_bundle(path).model
    x = model.example_input(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.compression == model.compression
    return loaded


def test_quantize_alone_makes_a_loadable_bundle(vit_and_task, tmp_path: Path) -> None:
    model, task = vit_and_task
    names = quantize_(model, Int8DynamicConfig())
    assert names and model.compression[-1]["step"] == "quantize"
    assert model.compression[-1]["modules"] == names
    loaded = _round_trip(model, task, tmp_path / "int8")
    assert isinstance(loaded.head, Int8DynamicLinear)


def test_structured_prune_alone_makes_a_loadable_bundle(vit_and_task, tmp_path: Path) -> None:
    model, task = vit_and_task
    record = prune_(model, StructuredPruneConfig(heads=0.5, ffn=0.5))
    assert model.compression == [record] and record["kind"] == "structured"
    loaded = _round_trip(model, task, tmp_path / "pruned")
    assert sum(loaded.compression[0]["attention"].values()) == 2  # 2 layers x 2 heads, half go
    # records accumulate: prune, then quantize, replay in that order
    quantize_(model)
    assert [r["step"] for r in model.compression] == ["prune", "quantize"]
    _round_trip(model, task, tmp_path / "pruned-int8")


def test_prune_filter_fn_limits_the_modules(vit_and_task) -> None:
    model, _ = vit_and_task
    record = prune_(
        model,
        StructuredPruneConfig(heads=0.5),
        filter_fn=lambda m, name: name.startswith("encoder.layers.0."),
    )
    assert list(record["attention"]) == ["encoder.layers.0.attn"]
    assert model.encoder.layers[1].attn.num_heads == 2 and model.encoder.layers[0].attn.num_heads == 1


def test_pruning_follows_the_models_declaration() -> None:
    with pytest.raises(CompressionError, match="declares nothing"):
        prune_(create_model("resnet_test"), StructuredPruneConfig(ffn=0.5))
    model = create_model("vit_test", num_classes=3)
    model.__class__ = type("FfnOnlyViT", (type(model),), {"prunable": frozenset({"ffn"})})
    with pytest.raises(CompressionError, match="cannot remove attention heads"):
        prune_(model, StructuredPruneConfig(heads=0.5))
    assert not getattr(model, "compression", None)  # refused before anything changed
    record = prune_(model, StructuredPruneConfig(ffn=0.5))
    assert record["attention"] == {} and sum(record["feed_forward"].values()) < 2 * 64
    # unstructured pruning needs no declaration
    gpt = create_model("gpt_test")
    assert prune_(gpt, UnstructuredPruneConfig(0.5))["kind"] == "unstructured"


def test_entry_points_refuse_other_kinds_and_unknown_configs() -> None:
    with pytest.raises(CompressionError, match="'prune' technique"):
        quantize_(create_model("vit_test"), StructuredPruneConfig(heads=0.5))

    @dataclass(frozen=True)
    class Nothing:
        pass

    with pytest.raises(CompressionError, match="no compression technique is registered for Nothing"):
        apply_technique(create_model("vit_test"), Nothing())
    assert get_technique(Int8DynamicConfig()).step == "quantize"
    assert {"distill", "prune", "quantize"} <= set(list_steps())


def test_unknown_steps_are_refused_and_distill_records_replay_as_nothing() -> None:
    model = create_model("vit_test")
    with pytest.raises(BundleError, match="newer tansuo"):
        restore_structure(model, [{"step": "warp"}])
    restore_structure(model, [{"step": "distill", "into": "vit_test"}])
    assert model.compression == [{"step": "distill", "into": "vit_test"}]


# ------------------------------------------------------------------------------ a technique from outside
@dataclass(frozen=True)
class ScaledHeadConfig:
    """Toy technique: the classifier becomes ``Sequential(head, Scale)`` with the factor as a buffer."""

    factor: float


class _Scale(nn.Module):
    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _apply_scaled_head(model: nn.Module, config: ScaledHeadConfig, *, filter_fn=None) -> dict[str, Any]:
    model.head = nn.Sequential(model.head, _Scale(config.factor))
    return {"module": "head", "factor": config.factor}


def _restore_scaled_head(model: nn.Module, record: dict[str, Any]) -> None:
    setattr(model, record["module"], nn.Sequential(getattr(model, record["module"]), _Scale()))


def test_a_technique_registered_outside_src_round_trips(vit_and_task, tmp_path: Path) -> None:
    model, task = vit_and_task
    register_technique(
        ScaledHeadConfig, step="scaled_head", apply=_apply_scaled_head, restore=_restore_scaled_head
    )
    try:
        prune_(model, StructuredPruneConfig(ffn=0.5))
        record = apply_technique(model, ScaledHeadConfig(3.0))
        assert record == {"step": "scaled_head", "module": "head", "factor": 3.0}
        assert [r["step"] for r in model.compression] == ["prune", "scaled_head"]
        loaded = _round_trip(model, task, tmp_path / "scaled")
        assert isinstance(loaded.head, nn.Sequential) and float(loaded.head[1].factor) == 3.0
    finally:
        unregister_technique(ScaledHeadConfig)
    with pytest.raises(BundleError, match="unknown compression step 'scaled_head'"):
        load_bundle(tmp_path / "scaled")
