"""The registry: names, overrides, errors, model_info; builders and configs agree."""

import dataclasses
import inspect
import json

import pytest
from torch import nn

from tansuo.models import _registry, create_model, list_models, model_info, register_model
from tansuo.models.cnn import ResNetConfig, resnet
from tansuo.models.gpt import GPT, GPTConfig, gpt
from tansuo.models.vit import ViTConfig, vit


def test_list_models_is_sorted_and_filtered():
    names = list_models()
    assert names == sorted(names)
    assert {"gpt_test", "vit_test", "resnet_test", "gpt_mini", "vit_digits", "resnet_digits"} <= set(names)
    assert list_models("vit_*") == [name for name in names if name.startswith("vit_")]


def test_create_model_names_the_model_and_applies_overrides():
    model = create_model("gpt_test", vocab_size=7)
    assert model.model_name == "gpt_test"
    assert model.config.vocab_size == 7


def test_unknown_model_lists_closest_first():
    with pytest.raises(ValueError, match=r"unknown model 'gpt_tset'\. Did you mean 'gpt_test'\?") as error:
        create_model("gpt_tset")
    assert "Available models: gpt_test, " in str(error.value)


def test_unknown_override_names_field_and_lists_allowed():
    with pytest.raises(ValueError, match="'num_layer' is not a field of GPTConfig") as error:
        create_model("gpt_test", num_layer=3)
    assert "Did you mean 'num_layers'?" in str(error.value)
    assert "Allowed fields: vocab_size, num_layers" in str(error.value)


def test_model_info_is_plain_data():
    info = model_info("gpt_mini")
    assert info["family"] == "gpt"
    assert info["config"]["embed_dim"] == 384
    assert 10_000_000 < info["num_params"] < 11_000_000
    json.dumps(info)


def test_register_model_checks_presets(monkeypatch):
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))

    def unannotated(**overrides):
        return nn.Linear(1, 1)

    with pytest.raises(TypeError, match="must be annotated"):
        register_model(unannotated)

    def gpt_test(**overrides) -> GPT:  # same name as a preset, another function
        raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_model(gpt_test)


@pytest.mark.parametrize(
    ("builder", "config_class"), [(gpt, GPTConfig), (vit, ViTConfig), (resnet, ResNetConfig)]
)
def test_builder_keywords_match_config_fields(builder, config_class):
    parameters = inspect.signature(builder).parameters
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    assert list(parameters) == list(fields)
    for name, parameter in parameters.items():
        default = fields[name].default
        expected = inspect.Parameter.empty if default is dataclasses.MISSING else default
        assert parameter.default == expected, name
