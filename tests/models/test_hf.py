"""Importing Hugging Face BERT checkpoints: parity with transformers' own forward pass, loading, errors."""

import dataclasses
import json

import pytest
import torch
import transformers

from tansuo.errors import TansuoError
from tansuo.models import create_model, list_models
from tansuo.models.hf import (
    HFImportError,
    bert_config_from_hf,
    convert_bert_state_dict,
    import_bert,
    load_hf_state_dict,
    read_hf_config,
)

ATOL = 1e-5  # float32

HF_CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # fresh LayerNorms and biases are ones and zeros: perturb them so they are tested
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    safe = tmp_path_factory.mktemp("safetensors")
    hf_model.save_pretrained(safe)
    pickled = tmp_path_factory.mktemp("bin")
    hf_model.save_pretrained(pickled, safe_serialization=False)
    return safe, pickled


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    segments = torch.zeros(3, 12, dtype=torch.long)
    segments[:, 5:] = 1
    segments[mask == 0] = 0
    return ids, mask, segments


def test_safetensors_import_matches_transformers(hf_model, saved):
    model, missing = import_bert(saved[0])
    assert not model.training
    assert model.model_name in list_models()
    assert sorted(missing) == ["head.bias", "head.weight"]  # BertForPreTraining has no classifier
    ids, mask, segments = _batch()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=segments)
        base = hf_model.bert(input_ids=ids, attention_mask=mask, token_type_ids=segments)
        features = model.forward_features(ids, attention_mask=mask, token_type_ids=segments)
        real = mask.bool()
        torch.testing.assert_close(features[real], base.last_hidden_state[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(model.pooled(features), base.pooler_output, atol=ATOL, rtol=0)
        logits = model.mlm_logits(features)
        torch.testing.assert_close(logits[real], expected.prediction_logits[real], atol=ATOL, rtol=0)
    # a registered preset with overrides, as a bundle stores it: rebuilding gives the same architecture
    rebuilt = create_model(model.model_name, **dataclasses.asdict(model.config))
    rebuilt.load_state_dict(model.state_dict())


def test_bin_checkpoint_loads_the_same(saved):
    safe_sd = import_bert(saved[0])[0].state_dict()
    bin_model, missing = import_bert(saved[1])
    assert sorted(missing) == ["head.bias", "head.weight"]
    for name, tensor in bin_model.state_dict().items():
        if not name.startswith("head."):  # the fresh classifier differs between the two builds
            torch.testing.assert_close(tensor, safe_sd[name], atol=0, rtol=0)


def test_base_model_checkpoint_reports_the_heads_it_lacks(hf_model, tmp_path):
    hf_model.bert.save_pretrained(tmp_path)  # a BertModel: no MLM head
    model, missing = import_bert(tmp_path, num_classes=3)
    assert "mlm_head.dense.weight" in missing and "head.weight" in missing
    assert "mlm_head.decoder.weight" not in missing  # tied to the imported word embeddings
    assert model.mlm_head.decoder.weight is model.tok_emb.weight


def test_sequence_classification_checkpoint_loads_its_classifier(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**HF_CONFIG, num_labels=3)).eval()
    hf.save_pretrained(tmp_path)
    with pytest.raises(HFImportError, match="num_classes"):
        import_bert(tmp_path)  # 2 classes by default, the checkpoint has 3
    model, missing = import_bert(tmp_path, num_classes=3)
    assert all(name.startswith("mlm_head.") for name in missing)
    ids, mask, segments = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=segments).logits
        logits = model(ids, attention_mask=mask, token_type_ids=segments)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_config_translation():
    config = bert_config_from_hf(
        {"model_type": "bert", **HF_CONFIG, "hidden_dropout_prob": 0.2}, num_classes=0
    )
    assert config["mlp_ratio"] == 2 and config["max_seq_len"] == 64 and config["dropout"] == 0.2
    assert config["num_classes"] == 0 and config["norm_eps"] == 1e-12


@pytest.mark.parametrize(
    "change, found",
    [
        ({"model_type": "gpt2"}, "gpt2"),
        ({"architectures": ["BertLMHeadModel"]}, "BertLMHeadModel"),
        ({"hidden_act": "relu"}, "relu"),
        ({"position_embedding_type": "relative_key"}, "relative_key"),
        ({"intermediate_size": 50}, "intermediate_size"),
    ],
)
def test_unsupported_configs_name_what_is_supported(change, found):
    with pytest.raises(TansuoError, match=found) as info:
        bert_config_from_hf({"model_type": "bert", **HF_CONFIG, **change})
    if "model_type" in change:
        assert "'bert'" in str(info.value)
    if "architectures" in change:
        assert "BertForMaskedLM" in str(info.value)


def test_gpt2_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(HFImportError, match="gpt2.*'bert'"):
        import_bert(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(HFImportError, match="config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **HF_CONFIG}))
    with pytest.raises(HFImportError, match="model.safetensors.*pytorch_model.bin") as info:
        import_bert(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(HFImportError, match="pytorch_model.bin"):
        load_hf_state_dict(tmp_path)


def test_conversion_fuses_keys_and_values_and_skips_buffers(hf_model):
    hf_sd = hf_model.state_dict()
    config = bert_config_from_hf({"model_type": "bert", **HF_CONFIG})
    converted = convert_bert_state_dict(hf_sd, config)
    kv = converted["stack.layers.1.attn.kv_proj.weight"]
    torch.testing.assert_close(kv[:32], hf_sd["bert.encoder.layer.1.attention.self.key.weight"])
    torch.testing.assert_close(kv[32:], hf_sd["bert.encoder.layer.1.attention.self.value.weight"])
    assert not any("position_ids" in name or "seq_relationship" in name for name in converted)
    del hf_sd["bert.encoder.layer.0.attention.self.value.bias"]
    with pytest.raises(HFImportError, match="key bias but not its value bias"):
        convert_bert_state_dict(hf_sd, config)
