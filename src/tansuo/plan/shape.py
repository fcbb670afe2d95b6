"""The model a plan is about: the study's architecture grown (or shrunk) to a named size.

A size N (non-embedding parameters, as the study counts them) does not fix a shape. The plan keeps what the
study's largest model has, its family, blocks, head width, vocabulary and the ratio of width to depth, and
finds the depth and width whose N comes closest to the one asked for (``--layers`` or ``--width`` fix
either). Every candidate is built on the meta device (no memory, no weights) so N is counted, not
estimated; the same goes for a model of 70 billion parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEPTH_FIELDS = ("num_layers", "num_encoder_layers", "num_decoder_layers")
FFN_FIELDS = ("mlp_dim", "mlp_hidden")


@dataclass(frozen=True)
class Shape:
    """A model config and what counting it on the meta device gave."""

    model: str  # the registered preset it is built from
    config: dict[str, Any]
    params: int  # N: non-embedding parameters
    params_total: int
    layers: int  # all layers (encoder and decoder together)
    width: int
    context: int
    flops_per_token: int | None  # training FLOPs per token at `context`

    def describe(self) -> str:
        heads = self.config.get("num_heads")
        return f"{self.layers} layers x width {self.width}" + (f", {heads} heads" if heads else "")


def build_meta(model: str, config: dict[str, Any]) -> nn.Module:
    """The model on the meta device: its parameters have shapes and no storage."""
    from tansuo.models import create_model

    with torch.device("meta"):
        return create_model(model, **config)


def measure_shape(model: str, config: dict[str, Any], context: int) -> Shape:
    """N, all parameters and FLOPs per token of ``config``, counted on models built on the meta device:
    with one depth field (a decoder or an encoder), on one- and two-layer models, since every count is
    linear in the depth (a 70B model is counted in milliseconds); otherwise on the whole model."""
    from tansuo.measure.flops import model_shape

    depths = [f for f in DEPTH_FIELDS if int(config.get(f, 0)) > 0]
    depth = sum(int(config[f]) for f in depths)
    if len(depths) == 1 and depth > 2:
        one, two = (model_shape(build_meta(model, {**config, depths[0]: n}), context) for n in (1, 2))
        counted = {
            k: None if one[k] is None else one[k] + (depth - 1) * (two[k] - one[k])
            for k in ("params", "params_total", "flops_per_token")
        }
    else:
        counted = model_shape(build_meta(model, config), context)
    return Shape(
        model,
        dict(config),
        counted["params"],
        counted["params_total"],
        depth,
        int(config["embed_dim"]),
        context,
        counted["flops_per_token"],
    )


def scaled_config(reference: dict[str, Any], layers: int, width: int, context: int) -> dict[str, Any]:
    """``reference`` with ``layers`` in all (an encoder-decoder keeps its split), the head width kept (so
    ``width`` rounds to whole heads), key/value heads and feed-forward widths in proportion."""
    cfg = dict(reference)
    depths = [f for f in DEPTH_FIELDS if int(cfg.get(f, 0)) > 0]
    if not depths or "embed_dim" not in cfg or "num_heads" not in cfg:
        raise ValueError("the study's model has no num_layers / embed_dim / num_heads fields to scale")
    total = sum(int(cfg[f]) for f in depths)
    for f in depths:
        cfg[f] = max(1, round(layers * int(reference[f]) / total))
    head = int(reference["embed_dim"]) // int(reference["num_heads"])
    heads = max(1, round(width / head))
    cfg["embed_dim"], cfg["num_heads"] = heads * head, heads
    kv = int(reference.get("num_kv_heads", 0) or 0)
    if kv:
        kv = max(1, round(heads * kv / int(reference["num_heads"])))
        while heads % kv:
            kv -= 1
        cfg["num_kv_heads"] = kv
    grow = cfg["embed_dim"] / int(reference["embed_dim"])
    for f in FFN_FIELDS:
        if int(reference.get(f, 0) or 0) > 0:
            cfg[f] = max(8, 8 * round(int(reference[f]) * grow / 8))
    if "max_seq_len" in cfg:
        cfg["max_seq_len"] = max(int(cfg["max_seq_len"]), context)
    return cfg


def project(
    model: str,
    reference: dict[str, Any],
    params: float,
    context: int,
    *,
    layers: int | None = None,
    width: int | None = None,
) -> Shape:
    """The shape of ``reference`` grown to about ``params`` non-embedding parameters.

    With neither ``layers`` nor ``width`` the reference's width-to-depth ratio is kept; one of them fixes
    that dimension and the other is solved for; both give the shape as it is (``params`` then unused).
    """
    ref = measure_shape(model, reference, context)
    if layers and width:
        return measure_shape(model, scaled_config(reference, layers, width, context), context)
    k = ref.params / (ref.layers * ref.width**2)  # N ~ k L C^2 for a Transformer stack
    head = ref.width // int(reference["num_heads"])
    options: list[tuple[int, int]] = []
    if layers:
        c = math.sqrt(params / (k * layers))
        options = [(layers, max(head, head * m)) for m in _around(c / head)]
    elif width:
        options = [(max(1, n), width) for n in _around(params / (k * width**2))]
    else:
        ratio = ref.width / ref.layers
        depth = (params / (k * ratio**2)) ** (1 / 3)
        options = [
            (max(1, n), max(head, head * (round(ratio * max(1, n) / head) + k)))
            for n in _around(depth)
            for k in (-1, 0, 1)
        ]
    shapes = [measure_shape(model, scaled_config(reference, n, c, context), context) for n, c in set(options)]
    return min(shapes, key=lambda s: (abs(math.log(s.params / params)), s.layers))


def _around(x: float) -> list[int]:
    base = max(1, math.floor(x))
    return sorted({max(1, base - 1), base, base + 1, base + 2})
