"""GGUF files (written here with the gguf package's writer, tensors in F32, F16, Q8_0, Q4_0 and Q4_1) import
with transformers' own GGUF loader's logits and tokenizer ids; damaged and unsupported files are refused
by name; the import command writes an lm bundle that keeps the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tansuo.bundle import load_bundle  # noqa: E402
from tansuo.models.gguf_import import (  # noqa: E402
    GGUFImportError,
    import_gguf_model,
    metadata,
    read_gguf,
    tokenizer_from_gguf,
    unpermute,
)
from tests.helpers import run  # noqa: E402

Q = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = [
    "Hello, world! 12345 and 3.14",
    "emoji 😀🎉 ok",
    "中文测试，你好。",
    "<|im_start|>user\nhi<|im_end|>",
]


def _vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary (tokens, merges, token types) trained on a little text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat, 123 times!", "中文 😀 hello world"] * 30, trainer)
    state = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tokens, merges, types


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (what its converter writes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TYPES = {  # a spread of tensor types over the model's tensors
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.F16,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q8_0,
    "output": Q.F32,
}


def write_gguf(path: Path, *, tied: bool = False, arch: str = "llama") -> tuple[Path, dict]:
    """A tiny Llama as llama.cpp's converter would write it; returns the file and the HF weights' shapes."""
    tokens, merges, types = _vocab()
    V, C, H, Hkv, F, L = len(tokens), 64, 4, 2, 128, 2
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=C,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=Hkv,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(C // H)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)

    def put(name: str, array: np.ndarray, kind: str) -> None:
        qtype = TYPES.get(kind, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], "token_embd")
    put("output_norm.weight", sd["model.norm.weight"], "norm")
    if not tied:
        put("output.weight", sd["lm_head.weight"], "output")
    for i in range(L):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "norm")
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "norm")
        put(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], H), "attn_q")
        put(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], Hkv), "attn_k")
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], "attn_v")
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], "attn_output")
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], "ffn_gate")
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], "ffn_up")
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], "ffn_down")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, {"vocab": V}


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_gguf_loader(tmp_path: Path, tied: bool) -> None:
    path, info = write_gguf(tmp_path / "tiny.gguf", tied=tied)
    model, _ = import_gguf_model(path)
    assert model.config.tie_embeddings is tied and model.config.num_kv_heads == 2
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    ids = torch.randint(0, info["vocab"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_ids_match_transformers(tmp_path: Path) -> None:
    path, _ = write_gguf(tmp_path / "tiny.gguf")
    ours = tokenizer_from_gguf(metadata(read_gguf(path)))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_end|>").ids == [2]  # a control token stays whole


def test_unpermute_inverts_llama_cpp_reordering() -> None:
    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(24, 5)
    permuted = torch.from_numpy(_permute(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute(permuted, 3), w)


def test_damaged_and_unsupported_files_are_refused_by_name(tmp_path: Path, monkeypatch, capsys) -> None:
    path, _ = write_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFImportError, match="damaged or truncated"):
        import_gguf_model(cut)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFImportError, match="magic"):
        read_gguf(tmp_path / "not.gguf")
    other = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(other), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run(["import", "gguf", str(other), "--out", str(tmp_path / "b")], monkeypatch, capsys)
    assert code == 2 and "phi2" in err and "llama, qwen2" in err
    assert not (tmp_path / "b").exists()


def test_import_command_writes_an_lm_bundle_with_the_chat_template(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    path, _ = write_gguf(tmp_path / "tiny.gguf", tied=True)
    code, out, err = run(["import", "gguf", str(path), "--out", str(tmp_path / "b")], monkeypatch, capsys)
    assert code == 0 and "lm" in out, err
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["origin"]["special_tokens"]["eos"] == "<|im_end|>"
    chat = json.loads((tmp_path / "b" / "task.json").read_text())["chat"]
    assert chat == {"template": TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    bundle = load_bundle(tmp_path / "b")
    model, _ = import_gguf_model(path)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(bundle.model(ids), model(ids))
    assert (
        bundle.task.tokenizer.encode(TEXTS[0]).ids
        == tokenizer_from_gguf(metadata(read_gguf(path))).encode(TEXTS[0]).ids
    )
    code, out, err = run(
        ["generate", str(tmp_path / "b"), "--prompt", "the cat", "--max-new-tokens", "4", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0 and out.startswith("the cat"), err
