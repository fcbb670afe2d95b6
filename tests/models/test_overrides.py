"""Recipe overrides are checked against the model's config before any data is prepared."""

import pytest

from tansuo.errors import RecipeError
from tansuo.models import check_overrides, get_model_entry
from tansuo.recipe import validate_recipe


def test_get_model_entry_exposes_the_family_declarations() -> None:
    bert = get_model_entry("bert_test")
    assert bert.family == "bert" and bert.prunable == {"heads", "ffn"}
    assert bert.onnx_inputs == ("input_ids", "attention_mask") and "num_layers" in bert.fields
    gpt = get_model_entry("gpt_test")
    assert gpt.prunable == frozenset() and gpt.onnx_inputs == ()
    with pytest.raises(ValueError, match="Did you mean 'vit_test'"):
        get_model_entry("vit_tset")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"embed_dimm": 32},
            r"model.overrides.embed_dimm: not a field of ViTConfig .*Did you mean 'embed_dim'",
        ),
        ({"num_layers": "two"}, r"model.overrides.num_layers: must be int, got 'two' \(str\)"),
        ({"num_layers": 2.5}, r"must be int, got 2.5"),
        ({"dropout": True}, r"model.overrides.dropout: must be float, got True"),
    ],
)
def test_bad_overrides_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        check_overrides("vit_test", overrides)


def test_good_overrides_pass() -> None:
    check_overrides("vit_test", {"embed_dim": 32, "dropout": 0, "num_layers": 1})  # an int is a valid float


def test_validate_recipe_refuses_overrides_before_the_data_is_read(tmp_path) -> None:
    missing = tmp_path / "no-such-file.txt"  # never opened: the override is refused first
    raw = {
        "task": "lm",
        "data": {"path": str(missing)},
        "model": {"name": "gpt_test", "overrides": {"n_layer": 2}},
        "train": {"max_steps": 1},
    }
    with pytest.raises(RecipeError, match="model.overrides.n_layer: not a field of GPTConfig"):
        validate_recipe(raw)
    assert not missing.exists()


def test_an_unknown_task_suggests_the_closest() -> None:
    with pytest.raises(RecipeError, match="Did you mean 'classify'"):
        validate_recipe({"task": "clasify", "model": {"name": "bert_test"}, "train": {"max_steps": 1}})
