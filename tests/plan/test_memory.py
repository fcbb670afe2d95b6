"""Memory estimates against the bytes of real tensors: weights, gradients and AdamW's state after a step of a
small GPT under tansuo's optimizer, and the activations autograd saves in a real training forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tansuo.models import create_model
from tansuo.plan.memory import activation_parts, saved_bytes, training_memory
from tansuo.plan.shape import measure_shape, project, scaled_config
from tansuo.train.optim import build_optimizer
from tests.plan.helpers import BLOCKS, gpt_config

B, T = 3, 32


def real_step(config: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """One AdamW step of the model on random tokens; returns it, its optimizer and the activation bytes
    autograd saved in that step (counted by storage, parameters left out)."""
    torch.manual_seed(0)
    model = create_model("gpt_char_small", **config)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    ids = torch.randint(0, config["vocab_size"], (B, T + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # as lm_batch gives them
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        s = t.untyped_storage()
        if s._cdata not in params and s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    opt.step()
    return model, opt, total


@pytest.mark.parametrize(
    "blocks",
    [BLOCKS, {"dropout": 0.0}, {**BLOCKS, "num_kv_heads": 2}],  # Llama-style, GPT-2-style, grouped queries
    ids=["llama", "gpt2", "gqa"],
)
def test_ddp_state_and_activations_equal_real_tensors(blocks: dict) -> None:
    config = {**gpt_config(3, 4, 64), **blocks}
    model, opt, activations = real_step(config)
    shape = measure_shape("gpt_char_small", config, T)
    (ddp, ddp_ckpt, fsdp, _) = training_memory(shape, batch=B, world=4, precision="fp32")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(
        v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step"
    )
    assert ddp["weights"] == weights and ddp["gradients"] == grads and ddp["optimizer"] == moments
    assert ddp["buffers"] == grads  # DDP's buckets: a second copy of the gradients
    assert ddp["activations"] == activations  # what autograd saved in the real step
    assert ddp_ckpt["activations"] < ddp["activations"] and ddp_ckpt["weights"] == weights
    assert fsdp["optimizer"] == moments // 4 and fsdp["total"] < ddp["total"]


def test_activations_grow_linearly_with_depth() -> None:
    """The per-layer and outside parts counted on one- and two-layer models give a six-layer model's."""
    config = gpt_config(6, 4, 64)
    shape = measure_shape("gpt_char_small", config, T)
    parts = activation_parts(shape, B, "fp32")
    six = create_model("gpt_char_small", **config)
    assert parts["outside"] + 6 * parts["per_layer"] == saved_bytes(six, B, T)
    # so are the counts of the shape, taken from one- and two-layer models
    assert shape.params == six.num_params(exclude_embeddings=True) and shape.layers == 6
    assert shape.params_total == sum(p.numel() for p in six.parameters())
    assert shape.flops_per_token == six.flops_per_token(T)
    bf16 = activation_parts(shape, B, "bf16")
    assert bf16["per_layer"] < parts["per_layer"]


def test_fits_and_the_largest_micro_batch() -> None:
    shape = measure_shape("gpt_char_small", gpt_config(4, 4, 128), 64)
    rows = training_memory(shape, batch=8, world=2, precision="fp32", device_gb=0.05)
    ddp = rows[0]
    usable = 0.05e9 * 0.9
    assert ddp["fits"] == (ddp["total"] <= usable)
    static = ddp["total"] - ddp["activations"]
    assert ddp["max_batch"] == int((usable - static) / (ddp["activations"] / 8))
    tiny = training_memory(shape, batch=8, world=2, precision="fp32", device_gb=0.001)
    assert not any(r["fits"] for r in tiny)


def test_a_shape_is_grown_to_the_size_asked() -> None:
    ref = gpt_config(4, 4, 128)
    for target in (3e6, 1e8, 7e9):
        shape = project("gpt_char_small", ref, target, 2048)
        assert shape.params == pytest.approx(target, rel=0.15)
        assert shape.config["embed_dim"] % 32 == 0  # whole heads of the reference's width
        assert shape.width / shape.layers == pytest.approx(128 / 4, rel=0.35)  # about its aspect
    fixed = project("gpt_char_small", ref, 1e8, 2048, layers=24)
    assert fixed.layers == 24 and fixed.params == pytest.approx(1e8, rel=0.15)
    kv = scaled_config({**ref, "num_kv_heads": 2}, 8, 256, 64)
    assert kv["num_heads"] == 8 and kv["num_kv_heads"] == 4  # the same grouping
