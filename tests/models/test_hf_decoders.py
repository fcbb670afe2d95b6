"""Hugging Face decoders imported into tansuo's GPT give transformers' logits: GPT-2, Llama (grouped-query
attention, Llama 3.1 rotary scaling, untied head), Qwen2 (q/k/v biases, tied head), Mistral; the import
command writes an lm bundle that generates; what tansuo cannot be is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tansuo.bundle import load_bundle  # noqa: E402
from tansuo.models.hf import HFImportError  # noqa: E402
from tansuo.models.hf_decoders import decoder_config_from_hf, import_decoder  # noqa: E402
from tests.helpers import run  # noqa: E402

V = 101
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    )


def _llama():
    config = transformers.LlamaConfig(
        **SMALL,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rope_scaling=LLAMA3,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(config)


def _qwen2():
    config = transformers.Qwen2Config(
        **SMALL, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1e6
    )
    return transformers.Qwen2ForCausalLM(config)


def _mistral():
    config = transformers.MistralConfig(
        **SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None
    )
    return transformers.MistralForCausalLM(config)


FAMILIES = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


def _saved(make, path: Path):
    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():  # weights far from the tiny default init, so a wrong mapping shows
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family: str, tmp_path: Path) -> None:
    hf = _saved(FAMILIES[family], tmp_path)
    model, _ = import_decoder(tmp_path)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # decoding with the (key/value-head) cache continues the same sequence
    with torch.no_grad():
        cache = model.init_cache(2, max_seq_len=24)
        first = model(ids[:, :20], cache=cache)
        rest = model(ids[:, 20:], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), ref, atol=1e-4, rtol=1e-4)


def test_fields_of_each_family(tmp_path: Path) -> None:
    _saved(_llama, tmp_path / "llama")
    preset, fields = decoder_config_from_hf(json.loads((tmp_path / "llama" / "config.json").read_text()))
    assert preset == "llama"
    assert (fields["num_kv_heads"], fields["tie_embeddings"], fields["rope_scaling"]) == (2, False, "llama3")
    assert fields["rope_theta"] == 500000.0 and fields["rope_original_max_seq_len"] == 16
    _saved(_qwen2, tmp_path / "qwen2")
    _, fields = decoder_config_from_hf(json.loads((tmp_path / "qwen2" / "config.json").read_text()))
    assert (fields["qkv_bias"], fields["bias"], fields["tie_embeddings"]) == ("yes", False, True)
    gpt2 = decoder_config_from_hf(
        {"model_type": "gpt2", "vocab_size": 9, "n_embd": 8, "n_layer": 1, "n_head": 2}
    )
    assert gpt2[1]["activation"] == "gelu_tanh" and gpt2[1]["mlp_hidden"] == 32


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"model_type": "falcon"}, "gpt2, llama, mistral, qwen2"),
        ({"model_type": "llama", **SMALL, "hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "llama3"),
        ({"model_type": "llama", **SMALL, "attention_bias": True}, "attention_bias"),
        (
            {
                "model_type": "gpt2",
                "vocab_size": 9,
                "n_embd": 8,
                "n_layer": 1,
                "n_head": 2,
                "activation_function": "relu",
            },
            "activation_function",
        ),
        ({"model_type": "llama", "hidden_size": 8}, "lacks"),
    ],
)
def test_what_tansuo_cannot_be_is_refused_by_name(config: dict, names: str) -> None:
    with pytest.raises(HFImportError, match=names):
        decoder_config_from_hf(config)


def test_a_truncated_or_mismatched_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _saved(_llama, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(HFImportError, match="shape"):
        import_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HFImportError, match="cannot read the weights"):
        import_decoder(tmp_path)


def _tokenizer_json(path: Path) -> None:
    """A byte-level BPE tokenizer of V tokens, as a Hugging Face folder's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:90])
    tok.train_from_iterator(["the cat sat on the mat"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))


def test_import_command_writes_an_lm_bundle_that_generates(tmp_path: Path, monkeypatch, capsys) -> None:
    hf = _saved(_llama, tmp_path / "hf")
    _tokenizer_json(tmp_path / "hf")
    code, out, err = run(
        ["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b")], monkeypatch, capsys
    )
    assert code == 0, err
    bundle = load_bundle(tmp_path / "b")
    assert bundle.task.name == "lm" and bundle.model.config.num_kv_heads == 2
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    code, out, err = run(
        ["generate", str(tmp_path / "b"), "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and out.startswith("the cat"), err
    task = json.loads((tmp_path / "b" / "task.json").read_text())["data"]
    assert (task["block_size"], task["eval_windows"]) == (64, 64)  # min(context, 512); a CPU-sized eval
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    code, out, err = run(
        ["eval", str(tmp_path / "b"), "--data", str(tmp_path / "text.txt"), "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and "perplexity" in out, err
    (tmp_path / "hf" / "tokenizer.json").unlink()
    code, _, err = run(
        ["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c")], monkeypatch, capsys
    )
    assert code == 2 and "tokenizer.json" in err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    code, _, err = run(
        ["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c")], monkeypatch, capsys
    )
    assert code == 2 and "bert" in err and "llama" in err
