"""Starting a model from existing weights (model.init_from): bundles, Hugging Face BERT folders, errors."""

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from tansuo.bundle import save_bundle
from tansuo.errors import TansuoError
from tansuo.models import create_model
from tansuo.models.hf import bert_config_from_hf, import_bert
from tansuo.models.init import load_initial_weights

HF_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    type_vocab_size=2,
)
NO_TASK = SimpleNamespace(save=lambda folder: None)  # save_bundle asks the task to save its assets


def _bundle(tmp_path, name, **overrides):
    torch.manual_seed(1)
    model = create_model(name, **overrides).eval()
    return model, save_bundle(tmp_path / "bundle", model, NO_TASK)


def test_bundle_into_same_architecture_loads_everything(tmp_path):
    source, bundle = _bundle(tmp_path, "vit_test")
    torch.manual_seed(2)
    model = create_model("vit_test").eval()
    report = load_initial_weights(model, bundle)
    assert report.kind == "bundle"
    assert report.loaded == sorted(model.state_dict()) and not report.skipped and not report.missing
    x = model.example_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)


def test_bundle_with_another_head_keeps_the_fresh_head(tmp_path):
    source, bundle = _bundle(tmp_path, "vit_test", num_classes=10)
    torch.manual_seed(2)
    model = create_model("vit_test", num_classes=3).eval()
    fresh_head = model.head.weight.detach().clone()
    report = load_initial_weights(model, bundle)
    assert report.skipped == ["head.bias", "head.weight"]
    assert report.missing == ["head.bias", "head.weight"]
    torch.testing.assert_close(model.head.weight, fresh_head, atol=0, rtol=0)
    expected = source.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return folder


def test_hf_folder_matches_import_bert(hf_folder):
    fields = bert_config_from_hf({"model_type": "bert", **HF_CONFIG})
    model = create_model("bert_test", **fields).eval()
    report = load_initial_weights(model, hf_folder)
    assert report.kind == "hf" and not report.skipped
    # a masked-LM checkpoint has neither a classifier nor a pooler
    assert report.missing == ["head.bias", "head.weight", "pooler.bias", "pooler.weight"]
    imported, _ = import_bert(hf_folder)
    ids = model.example_input(3)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(ids), imported.forward_features(ids), atol=1e-6, rtol=0
        )


def test_hf_folder_with_another_width_names_the_field(hf_folder):
    fields = bert_config_from_hf({"model_type": "bert", **HF_CONFIG})
    model = create_model("bert_test", **{**fields, "embed_dim": 64})
    with pytest.raises(TansuoError, match="hidden_size is 32.*embed_dim is 64"):
        load_initial_weights(model, hf_folder)


def test_bundle_of_another_family_is_refused(tmp_path):
    _, bundle = _bundle(tmp_path, "vit_test")
    with pytest.raises(TansuoError, match="'vit'.*'gpt'"):
        load_initial_weights(create_model("gpt_test"), bundle)


def test_folder_with_neither_is_refused(tmp_path):
    with pytest.raises(TansuoError, match="not a folder"):
        load_initial_weights(create_model("vit_test"), tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"name": "something"}))
    with pytest.raises(TansuoError, match="neither.*model.safetensors") as info:
        load_initial_weights(create_model("vit_test"), tmp_path)
    assert str(tmp_path) in str(info.value)
