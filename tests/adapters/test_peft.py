"""LoRA adapters in PEFT's layout: tansuo's adapters on imported GPT-2 and Llama (grouped-query) decoders go
onto the transformers model with ``peft.PeftModel.from_pretrained`` and give tansuo's logits; adapters PEFT
made come back into tansuo; ``tansuo merge`` and ``--adapter`` give the adapted model's logits; adapters for
another model are refused with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tansuo.adapters import LoRAConfig, LoRAError, load_adapter_, lora_, lora_layers, save_adapter  # noqa: E402
from tansuo.bundle import load_bundle  # noqa: E402
from tansuo.importer import import_hf  # noqa: E402
from tests.helpers import run  # noqa: E402

V = 101
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
LLAMA_TARGETS = ["q_proj", "kv_proj", "attn.out_proj", "in_proj", "mlp.out_proj"]
GPT2_TARGETS = ["q_proj", "kv_proj", "out_proj", "in_proj"]


def _llama():
    config = transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    )


FAMILIES = {"llama": (_llama, LLAMA_TARGETS), "gpt2": (_gpt2, GPT2_TARGETS)}


def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:90])
    tok.train_from_iterator(["the cat sat on the mat"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))


def _imported(family: str, tmp_path: Path):
    """A tiny random transformers model saved and imported: (transformers model, bundle folder)."""
    torch.manual_seed(0)
    hf = FAMILIES[family][0]().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf")
    _tokenizer_json(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "base")
    return hf, tmp_path / "base"


def _randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tansuo_adapter_loads_into_peft_with_the_same_logits(family: str, tmp_path: Path) -> None:
    hf, base = _imported(family, tmp_path)
    model = load_bundle(base).model
    origin = load_bundle(base).config["origin"]
    lora_(model, LoRAConfig(r=4, alpha=8.0, targets=FAMILIES[family][1]), base=origin)
    _randomise(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    if family == "gpt2":  # q | k | v in one Conv1D: rank 2r there, exactly
        assert config["fan_in_fan_out"] and config["rank_pattern"] == {"c_attn": 8}
    else:
        assert set(config["target_modules"]) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = peft_model(ids).logits
        assert (ours - load_bundle(base).model(ids)).abs().max() > 1e-2  # the adapter does change them
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_adapter_peft_made_comes_back_into_tansuo(family: str, tmp_path: Path) -> None:
    hf, base = _imported(family, tmp_path)
    targets = {"llama": ["q_proj", "k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}[family]
    patterns = {"v_proj": 2} if family == "llama" else {}  # k and v of other ranks and scales: one kv_proj
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=targets,
        rank_pattern=patterns,
        alpha_pattern=patterns,
        fan_in_fan_out=family == "gpt2",
    )
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    bundle = load_bundle(base)
    load_adapter_(bundle.model, tmp_path / "peft", bundle.config["origin"])
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            bundle.model.eval()(ids), peft_model.eval()(ids).logits, atol=1e-4, rtol=1e-4
        )


def test_merge_command_and_adapter_option_give_the_adapted_logits(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    hf, base = _imported("llama", tmp_path)
    bundle = load_bundle(base)
    lora_(bundle.model, LoRAConfig(r=4, alpha=8.0, targets="all-linear"), base=bundle.config["origin"])
    _randomise(bundle.model)
    save_adapter(bundle.model, tmp_path / "adapter")
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        adapted = bundle.model.eval()(ids)
    code, out, err = run(
        ["merge", str(base), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    merged = load_bundle(tmp_path / "merged")
    assert not lora_layers(merged.model) and not merged.config.get("compression")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), adapted, atol=1e-5, rtol=1e-5)
        with_adapter = load_bundle(base, adapter=tmp_path / "adapter").model
        torch.testing.assert_close(with_adapter(ids), adapted, atol=1e-5, rtol=1e-5)
    from tansuo.serve.app import ServeConfig, serve_bundle

    server, _ = serve_bundle(base, ServeConfig("torch", 4, 1.0), "cpu", adapter=tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(server.bundle.model(ids), adapted, atol=1e-5, rtol=1e-5)
    code, out, err = run(
        ["generate", str(base), "--adapter", str(tmp_path / "adapter"), "--prompt", "the", "--device", "cpu"]
        + ["--max-new-tokens", "3"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and out.startswith("the"), err


def test_an_adapter_for_another_model_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    _, base = _imported("llama", tmp_path / "a")
    _, other = _imported("gpt2", tmp_path / "b")
    gpt2 = load_bundle(other)
    lora_(gpt2.model, LoRAConfig(r=2, targets=["q_proj"]), base=gpt2.config["origin"])
    save_adapter(gpt2.model, tmp_path / "gpt2-adapter")
    code, _, err = run(
        ["merge", str(base), str(tmp_path / "gpt2-adapter"), "--out", str(tmp_path / "m")],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "c_attn" in err and "another architecture" in err
    # the same architecture at another width
    config = json.loads((tmp_path / "gpt2-adapter" / "adapter_config.json").read_text())
    llama = load_bundle(base)
    lora_(llama.model, LoRAConfig(r=2, targets=["q_proj"]), base=llama.config["origin"])
    save_adapter(llama.model, tmp_path / "llama-adapter")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "llama-adapter" / "adapter_model.safetensors")
    wider = {k: torch.zeros(v.shape[0], 64) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(wider, tmp_path / "llama-adapter" / "adapter_model.safetensors")
    code, _, err = run(
        ["merge", str(base), str(tmp_path / "llama-adapter"), "--out", str(tmp_path / "m")],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "another size" in err
    assert config["target_modules"] == ["c_attn"]
    with pytest.raises(LoRAError, match="not a LoRA adapter folder"):
        load_adapter_(llama.model, tmp_path)


def test_a_lora_run_on_an_imported_decoder_writes_an_adapter_peft_loads(tmp_path: Path) -> None:
    hf, base = _imported("llama", tmp_path)
    fields = json.loads((base / "config.json").read_text())["config"]
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 200)
    raw = {
        "task": "lm",
        "seed": 3,
        "data": {"path": str(tmp_path / "text.txt"), "tokenizer": str(base), "block_size": 16},
        "model": {
            "name": "llama",
            "overrides": {k: v for k, v in fields.items() if k != "max_seq_len"},
            "init_from": str(base),
        },
        "train": {
            "out_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "lora": {"r": 2, "alpha": 4, "targets": ["kv_proj", "in_proj"]},
        },
    }
    from tansuo.recipe import validate_recipe
    from tansuo.train.setup import train_recipe

    trained = train_recipe(*validate_recipe(raw))
    config = json.loads((trained.bundle / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["gate_proj", "k_proj", "up_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, trained.bundle / "adapter").eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ours = load_bundle(trained.bundle).model(ids)
        torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
