"""Memory per device of training a model with AdamW, under DDP and under FSDP, with and without activation
checkpointing, and whether it fits.

Counted as tansuo trains (``tansuo.train``): fp32 weights (bf16 runs autocast, keeping fp32 master weights),
fp32 gradients, AdamW's two fp32 moments; DDP keeps everything whole on every device plus its gradient
buckets (``gradient_as_bucket_view`` off: a second copy of the gradients); FSDP (``fully_shard`` per layer)
shards weights, gradients and moments over the world and gathers one layer's weights at a time (two with
prefetching) plus that layer's unsharded gradients before the reduce-scatter. Under bf16 autocast the
forward's bf16 copies of the weights are cached as well (of one layer under FSDP).

Activations are what autograd saves for backward, counted by running the model's own forward and a
cross-entropy over its outputs at the micro-batch and context asked for, on fake CPU tensors (PyTorch's
``FakeTensorMode``: shapes and dtypes without memory, dispatched as on the CPU, so attention takes the fused
kernel as it does on a GPU): not a formula, the bytes tansuo's blocks save (flash-style attention keeps q,
k, v, the output and the log-sum-exp; no T x T matrix; the meta device would take the math kernel and keep
it). Depth enters linearly, so one- and two-layer versions of the shape give the cost of a layer and of
everything outside the layers. With activation checkpointing each layer keeps only its input, and backward
recomputes one layer at a time. bf16 activations are those of the model cast to bf16 (autocast keeps a few
tensors in fp32, so the real figure is a little higher).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tansuo.plan.shape import DEPTH_FIELDS, Shape

GB = 1e9
#: the share of a device's memory a plan may fill: the rest is for the CUDA context, the allocator's
#: fragmentation and short-lived temporaries
USABLE = 0.9


def saved_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """Bytes autograd saves for backward in one forward of ``model`` on ``batch`` example inputs of
    ``context`` tokens and a cross-entropy over its outputs (parameters left out; each storage once)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    inputs = model.example_input(batch, seq_len=context)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
        flat = out.flatten(0, -2).float()
        target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        loss = F.cross_entropy(flat, target)
    loss.backward()
    return total


def activation_parts(shape: Shape, batch: int, precision: str) -> dict[str, int]:
    """Saved bytes of one layer and of everything outside the layers, at ``batch`` x ``shape.context``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tansuo.models import create_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    depths = [f for f in DEPTH_FIELDS if int(shape.config.get(f, 0)) > 0]
    counts = []
    for n in (1, 2):
        cfg = {**shape.config, **{f: n for f in depths}}  # dropout, if any, keeps its masks
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in it: a fake model cannot be converted afterwards
        try:
            with FakeTensorMode():
                counts.append(saved_bytes(create_model(shape.model, **cfg), batch, shape.context))
        finally:
            torch.set_default_dtype(default)
    per_layer = (counts[1] - counts[0]) // len(depths)  # an encoder-decoder pair: per layer of either
    return {"per_layer": per_layer, "outside": counts[0] - per_layer * len(depths)}


def _layer_params(shape: Shape) -> int:
    """Parameters of the largest unit FSDP gathers at once: one layer (every layer alike)."""
    return shape.params // max(1, shape.layers)


def training_memory(
    shape: Shape,
    *,
    batch: int,
    world: int,
    precision: str = "bf16",
    device_gb: float | None = None,
    parts: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Bytes per device for DDP and FSDP, each without and with activation checkpointing.

    Args:
        shape: the model (its context is the sequence length).
        batch: micro-batch per device.
        world: devices.
        precision: "bf16" (autocast: fp32 master weights, bf16 activations) or "fp32".
        device_gb: memory of one device; with it each row says whether it fits and the largest micro-batch
            that would.
        parts: :func:`activation_parts` when already counted.

    Returns:
        One row per (strategy, checkpointing): the parts in bytes, ``total``, and with ``device_gb``
        ``fits`` and ``max_batch``.
    """
    p, p_layer = shape.params_total, _layer_params(shape)
    parts = parts or activation_parts(shape, batch, precision)
    act_bytes = 2 if precision == "bf16" else 4
    full = parts["outside"] + shape.layers * parts["per_layer"]
    kept = (
        parts["outside"] + shape.layers * batch * shape.context * shape.width * act_bytes + parts["per_layer"]
    )
    rows = []
    for strategy in ("ddp", "fsdp"):
        if strategy == "ddp":
            state = {
                "weights": 4 * p,
                "gradients": 4 * p,
                "optimizer": 8 * p,
                "buffers": 4 * p + (2 * p if precision == "bf16" else 0),  # DDP buckets, autocast cache
            }
        else:
            state = {
                "weights": 4 * p // world + 2 * 4 * p_layer,  # shards + two gathered layers
                "gradients": 4 * p // world + 4 * p_layer,  # shards + one layer before reduce-scatter
                "optimizer": 8 * p // world,
                "buffers": 2 * p_layer if precision == "bf16" else 0,
            }
        static = sum(state.values())
        for checkpointing, acts in ((False, full), (True, kept)):
            row: dict[str, Any] = {
                "strategy": strategy,
                "checkpointing": checkpointing,
                **state,
                "activations": acts,
                "total": static + acts,
            }
            if device_gb is not None:
                usable = device_gb * GB * USABLE
                row["fits"] = static + acts <= usable
                row["max_batch"] = max(0, int((usable - static) / (acts / batch))) if acts else None
            rows.append(row)
    return rows
