"""Training FLOPs against hand counts and PyTorch's FLOP counter; the training record of a real tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tansuo.measure.flops import model_shape, training_record
from tansuo.models import create_model


def test_gpt_flops_per_token_equal_a_hand_count() -> None:
    L, C, V, T = 2, 32, 64, 16  # gpt_test: 2 layers, width 32, vocabulary 64; GELU MLP 4x, no biases
    model = create_model("gpt_test")
    per_layer = 3 * C * C + C * C + 2 * C * 4 * C + 2 * C  # q/k/v, out, MLP in and out, two LayerNorm weights
    n = L * per_layer + C  # + the final norm
    assert model.num_params(exclude_embeddings=True) == n
    assert model.flops_per_token(T) == 6 * n + 6 * L * T * C + 6 * V * C
    untied = create_model("gpt_test", tie_embeddings=False)  # the head's weights are in N then
    assert untied.flops_per_token(T) == 6 * (n + V * C) + 6 * L * T * C


@pytest.mark.parametrize("name", ["gpt_test", "bert_test", "seq2seq_test"])
def test_flops_per_token_agree_with_pytorchs_flop_counter(name: str) -> None:
    """PyTorch counts every matmul of a forward and backward pass: 6 x the matmul weights, and attention's
    whole T x T matrix. The formula differs by exactly what it says it does: norm weights and biases (not
    matmuls) are in N, a causal decoder's attention is half the matrix, and BERT's pooler is in N though
    the MLM loss does not use it; the encoder-decoder's source is as long as its target."""
    torch.manual_seed(0)
    B, T = 2, 16
    model = create_model(name, dropout=0.0, **({"num_classes": 0} if name == "bert_test" else {}))
    c = model.config
    ids = torch.randint(0, c.vocab_size, (B, T))
    # the math kernel, whose matmuls the counter sees (it has no formula for the fused CPU kernels)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        if name == "bert_test":
            out = model.mlm_logits(model.forward_features(ids))
        else:
            out = model(ids, ids.flip(1)) if name == "seq2seq_test" else model(ids)
        out.float().sum().backward()
    counted = counter.get_total_flops() / (B * T)
    params = dict(model.named_parameters())
    not_matmul = sum(
        p.numel()
        for n, p in params.items()
        if n.endswith(".bias") or ("norm" in n and n.endswith(".weight")) or n == "pooler.weight"
    )
    expected = model.flops_per_token(T) - 6 * not_matmul
    if name == "gpt_test":  # PyTorch counts the masked half too
        expected += 6 * c.num_layers * T * c.embed_dim
    if name == "seq2seq_test":  # the decoder's causal self-attention, likewise
        expected += 6 * c.num_decoder_layers * T * c.embed_dim
    assert not_matmul > 0 and counted == expected


def test_model_shape_counts_a_family_without_flops_as_unknown() -> None:
    model = create_model("vit_test")
    shape = model_shape(model, 16)
    assert shape["flops_per_token"] is None
    assert shape["params_total"] == sum(p.numel() for p in model.parameters())


def test_training_record_of_a_tiny_run(text_file: Path, tmp_path: Path) -> None:
    from tansuo.recipe import validate_recipe
    from tansuo.train.setup import train_recipe

    raw = {
        "task": "lm",
        "seed": 0,
        "data": {"path": str(text_file), "block_size": 16, "eval_windows": 8},
        "model": {"name": "gpt_test", "overrides": {"dropout": 0.0}},
        "train": {"max_steps": 4, "batch_size": 2, "out_dir": str(tmp_path / "run"), "log_every": 2},
    }
    rec, data = validate_recipe(raw)
    done = train_recipe(rec, data, data_root=tmp_path / "data")
    peak = {"flops": 1e11, "source": "given"}
    got = training_record(done.bundle, tmp_path / "run", wall_seconds=9.0, peak=peak)
    assert got is not None
    model = create_model("gpt_test", vocab_size=got["config"]["vocab_size"], max_seq_len=16)
    n = model.num_params(exclude_embeddings=True)
    assert got["params"] == n and got["context"] == 16 and got["unit"] == "tokens"
    assert got["tokens"] == got["tokens_trained"] == 4 * 2 * 16  # steps x batch x block_size
    assert got["flops"] == got["tokens"] * model.flops_per_token(16)
    assert got["steps"] == got["best_step"] == 4
    assert got["step_seconds"] > 0 and got["wall_seconds"] == 9.0
    assert got["mfu"] == pytest.approx(got["flops"] / (got["step_seconds"] * 1e11))
    assert set(got["val"]) >= {"loss", "perplexity"}
