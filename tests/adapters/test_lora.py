"""LoRA: only the adapters (and modules_to_save) get gradients; the model starts equal to the base; merged
weights are W + alpha / r * B A; bundles keep the adapters (and write adapter/); a recipe with train.lora
trains them, leaves the base untouched and resumes bit for bit; what cannot be targeted is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tansuo.adapters import (
    LoRAConfig,
    LoRAError,
    LoRALinear,
    freeze_base_,
    load_adapter_,
    lora_,
    lora_layers,
    merge_lora_,
)
from tansuo.bundle import load_bundle, save_bundle
from tansuo.models import create_model
from tansuo.train.checkpoint import load_checkpoint
from tests.helpers import (
    Interrupted,
    interrupt_after,
    lm_recipe,
    make_trainer,
    run,
    task_from,
    write_recipe,
)


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3)
    return model


def test_only_adapter_parameters_receive_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("gpt_test")
    x = model.example_input()
    with torch.no_grad():
        before = model(x)
    names = lora_(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "kv_proj", "attn.out_proj"]))
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    freeze_base_(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B starts at zero: the base model
    _randomised(model)
    model(x).float().pow(2).mean().backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == {f"{n}.lora_{m}" for n in names for m in "AB"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_modules_to_save_train_in_full_beside_the_adapters() -> None:
    model = create_model("bert_test", num_classes=3)
    lora_(model, LoRAConfig(r=2, targets="all-linear", modules_to_save=("head",)))
    assert "head" not in lora_layers(model) and "mlm_head.decoder" not in lora_layers(model)
    freeze_base_(model, ["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("head.") for n in trainable)


def test_merged_weight_is_base_plus_scaled_product_and_unmerges() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    base = linear.weight.detach().clone()
    layer = LoRALinear(linear, r=3, alpha=6.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 12)
    expected = layer(x)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, base + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(merged(x), expected)
    layer.merge_()
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(LoRAError, match="unmerge_"):
        layer.state_dict()
    layer.unmerge_()
    torch.testing.assert_close(layer.weight, base)
    torch.testing.assert_close(layer(x), expected)


def test_bundle_keeps_adapters_and_merging_drops_them(text_file: Path, tmp_path: Path) -> None:
    task = task_from(lm_recipe(text_file, tmp_path / "run"))
    model = create_model("gpt_test", vocab_size=task.model_overrides()["vocab_size"])
    lora_(model, LoRAConfig(r=2, alpha=4, targets="all-linear"))
    _randomised(model).eval()
    x = model.example_input()
    with torch.no_grad():
        expected = model(x)
    save_bundle(tmp_path / "b", model, task)
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = load_bundle(tmp_path / "b").model
    assert set(lora_layers(loaded)) == set(lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # the bundle's adapter/ in tansuo's names goes back onto a plain model of the same shape
    plain = create_model("gpt_test", vocab_size=model.config.vocab_size)
    plain.load_state_dict({k: v for k, v in loaded.state_dict().items() if "lora_" not in k})
    load_adapter_(plain, tmp_path / "b" / "adapter")
    merge_lora_(loaded)
    assert not lora_layers(loaded) and not loaded.compression
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_or_tied_targets_are_refused_by_name() -> None:
    with pytest.raises(LoRAError, match=r"'wq' matches no Linear layer.*kv_proj.*q_proj"):
        lora_(create_model("gpt_test"), LoRAConfig(targets=["wq"]))
    with pytest.raises(LoRAError, match="tied"):
        lora_(create_model("gpt_test"), LoRAConfig(targets=["lm_head"]))
    with pytest.raises(LoRAError, match="rank"):
        LoRAConfig(r=0)


def _lora_recipe(text_file: Path, out: Path, **train: object) -> dict:
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "kv_proj"]}
    return lm_recipe(text_file, out, lora=lora, lr=1e-2, **train)


def test_lora_run_trains_adapters_only_resumes_bit_for_bit_and_merges(
    text_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    raw = _lora_recipe(text_file, tmp_path / "a", max_steps=12, eval_every=6, checkpoint_every=3)
    full = make_trainer(raw)
    start = {k: v.clone() for k, v in full.model.state_dict().items()}
    full.fit()
    after = full.model.state_dict()
    for name, value in start.items():
        changed = not torch.equal(value, after[name])
        assert changed == ("lora_B" in name or "lora_A" in name), name
    bundle = tmp_path / "a" / "bundle"
    config = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and config["target_modules"] == ["kv_proj", "q_proj"]
    )
    loaded = load_bundle(bundle)
    assert len(lora_layers(loaded.model)) == 4

    interrupted = make_trainer(
        _lora_recipe(text_file, tmp_path / "b", max_steps=12, eval_every=6, checkpoint_every=3)
    )
    interrupt_after(interrupted, 8)
    with pytest.raises(Interrupted):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")["trainer"]["step"] == 6
    torch.manual_seed(999)
    resumed = make_trainer(
        _lora_recipe(text_file, tmp_path / "b", max_steps=12, eval_every=6, checkpoint_every=3)
    )
    resumed.fit(resume=True)
    for (name, a), (_, b) in zip(after.items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    code, out, err = run(["merge", str(bundle), "--out", str(tmp_path / "merged")], monkeypatch, capsys)
    assert code == 0, err
    merged = load_bundle(tmp_path / "merged")
    assert not lora_layers(merged.model) and not (tmp_path / "merged" / "adapter").exists()
    x = loaded.model.example_input()
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), loaded.model(x), rtol=1e-5, atol=1e-5)


def test_train_with_an_unknown_target_exits_2(text_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    raw = lm_recipe(text_file, tmp_path / "run", lora={"targets": "query"})  # one name, or a list
    code, _, err = run(["train", str(write_recipe(tmp_path / "r.yaml", raw))], monkeypatch, capsys)
    assert code == 2 and "train.lora" in err and "'query' matches no Linear layer" in err
    raw = lm_recipe(text_file, tmp_path / "run", lora={"r": 0})
    code, _, err = run(["train", str(write_recipe(tmp_path / "r.yaml", raw))], monkeypatch, capsys)
    assert code == 2 and "train.lora.r" in err
    code, _, err = run(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], monkeypatch, capsys)
    assert code == 2 and "bundle not found" in err
