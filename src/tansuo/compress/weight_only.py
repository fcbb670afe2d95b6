"""Weight-only int8 / int4 quantization of Linear layers for decoders (issue 14): ``quantize_weights_(model,
WeightOnlyConfig(bits=4, group_size=32))``.

Weights are quantized by round-to-nearest without calibration data (GPTQ and AWQ are out of scope):

- int8: symmetric, one fp32 scale per output channel, ``scale = max|w| / 127``, ``q = round(w / scale)`` in
  [-127, 127] (as torchao's ``Int8WeightOnlyConfig`` and llama.cpp's Q8_0, which uses blocks of 32);
- int4: asymmetric min/max per group of ``group_size`` consecutive inputs of one output channel,
  ``scale = (max - min) / 15``, ``q = round((w - min) / scale)`` in [0, 15], ``w ~ q * scale + min``
  (llama.cpp's Q4_1, torchao's int4 "tinygemm" scheme). Two values a byte: 6 bits a weight with g32's
  scale and minimum in fp32 (5 at g64, 4.5 at g128).

Activations stay fp32 by default, so every layer computes ``x @ dequantize(W).T``. With
``activations="int8"`` they are quantized on the fly as llama.cpp quantizes them for its Q4 / Q8 matrix
products: symmetric int8 per block of 32 inputs, ``d = max|x| / 127``, ``round(x / d)``
(:func:`quantize_activations`), so the matrix-vector kernels multiply integers (AVX-512 VNNI or AVX2) and
every path computes ``quantize_activations(x) @ dequantize(W).T``. On SmolLM2-135M (``bench/generate.py``)
that costs 0.2% perplexity against fp32 activations (30.40 against 30.33) and, measured end to end on this
2-core CPU, decodes no faster (42.0-42.4 against 44.6 tokens/s with int4 weights, alternating runs): the
integer kernels win on a layer whose weights sit in cache, but decoding streams every weight from memory.
Layers whose input width is not a multiple of 32 keep fp32 activations.

Decoding one token reads every weight once, so the win is in reading fewer bytes and doing less work per
byte: at up to :data:`GEMV_ROWS` input rows the layers run :mod:`tansuo.compress.cpu_kernels`; at more
rows (prompt prefill, evaluation), where the matmul is bound by arithmetic, the weight is dequantized to
fp32 once per call and multiplied by ``F.linear`` (MKL). Where the kernels cannot be compiled the layers
dequantize in PyTorch on every call (same numbers, no speed-up).

A head tied to the token embedding (GPT's ``lm_head``, SmolLM2's) is quantized with ``head=True`` as an
int copy of the shared matrix: the embedding stays fp32 for the lookups, so the bundle holds both (the
record says ``untied``); with ``head=False`` it stays fp32 and tied. :func:`restore_weight_only` rebuilds the
layers on a fresh model so a bundle's state dict (``qweight``, ``scale``, ``low``, ``bias``) loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tansuo.compress import cpu_kernels
from tansuo.compress.registry import apply_technique, register_technique
from tansuo.errors import CompressionError

log = logging.getLogger(__name__)

GROUP_SIZES = (32, 64, 128)
#: the int4 packing block: byte j of a block of 32 inputs holds input j (low nibble) and j + 16 (high)
BLOCK = 32
#: input rows up to which the layers run the matrix-vector kernels; more are dequantized and run by MKL
GEMV_ROWS = 4
#: what the layers do with their inputs: quantize them to int8 per block of 32 (llama.cpp's way) or not
ACTIVATIONS = ("int8", "fp32")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Weight-only quantization of Linear layers.

    Args:
        bits: 8 (symmetric, per output channel) or 4 (asymmetric min/max per group).
        group_size: Inputs per int4 group: 32, 64 or 128 (default 32); int8 takes none.
        head: Quantize the output head too. A head tied to the token embedding becomes an int copy of it
            (the embedding stays fp32 for the lookups); False leaves it fp32 and tied.
        head_bits: Bits of the output head of an int4 model: 8 (default) or 4 (int8 models: 8), as
            llama.cpp keeps a Q4 file's output matrix at 6-8 bits. On SmolLM2-135M, int4 g32 with an int4
            head gave perplexity 32.03 against fp32's 30.26 (+5.9%), with an int8 head 30.33 (+0.2%), and
            decoded no slower.
        activations: ``fp32`` (default): exact; ``int8``: quantized per block of 32 inputs, as llama.cpp
            does, so decoding multiplies integers (no faster end to end here; see the module docstring).
    """

    bits: int = 8
    group_size: int | None = None
    head: bool = True
    head_bits: int = 8
    activations: str = "fp32"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise CompressionError(
                f"weight-only activations are one of {', '.join(ACTIVATIONS)}, not {self.activations!r}"
            )
        if self.bits not in (4, 8) or self.head_bits not in (4, 8):
            bits = self.bits if self.bits not in (4, 8) else self.head_bits
            raise CompressionError(f"weight-only quantization has 8 or 4 bits, not {bits}")
        if self.bits == 8 and self.group_size is not None:
            raise CompressionError("int8 weights take one scale per output channel: give no group size")
        if self.bits == 4:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 32)
            elif self.group_size not in GROUP_SIZES:
                sizes = ", ".join(map(str, GROUP_SIZES))
                raise CompressionError(f"int4 group size must be one of {sizes}, not {self.group_size}")

    @property
    def mode(self) -> str:
        """``int8-weight`` or ``int4-weight``."""
        return f"int{self.bits}-weight"


# ------------------------------------------------------------------------------------------ formats
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``w (N, K)``: ``q`` int8 ``(N, K)`` and ``scale (N,)``, ``w ~ q * scale``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 of ``w (N, K)`` per group of ``group_size`` inputs: unpacked codes ``q``
    (uint8 in [0, 15], ``(N, K)``), ``scale`` and ``low`` ``(N, K / group_size)``, ``w ~ q * scale + low``."""
    w = w.detach().float()
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, K)`` in [0, 15] (K a multiple of 32) to bytes ``(N, K / 2)``: in each block of 32 inputs,
    byte j holds input j in its low nibble and input j + 16 in its high one."""
    N, K = q.shape
    blocks = q.to(torch.uint8).reshape(N, K // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: bytes ``(N, K / 2)`` to codes ``(N, K)``."""
    N, half = packed.shape
    blocks = packed.reshape(N, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(N, 2 * half)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)``, K a multiple of 32, through symmetric int8 per block of 32 inputs and back: ``d =
    max|x| / 127`` and ``round(x / d) * d`` per block (the kernels do the same arithmetic in C)."""
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    codes = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks))
    return (codes * d).reshape(x.shape)


# ------------------------------------------------------------------------------------------ the layer
class WeightOnlyLinear(nn.Module):
    """A Linear layer with int8 or int4 weights; its inputs quantized to int8 per block of 32 on the fly
    (``activations="int8"``, where the input width is a multiple of 32) or kept fp32.

    State (buffers, so bundles keep them in safetensors): ``qweight`` int8 ``(out, in)`` with ``scale
    (out,)``, or for int4 ``qweight`` uint8 ``(out, in / 2)`` (:func:`pack_int4`) with ``scale`` and ``low``
    ``(out, in / group_size)``; ``bias`` fp32 ``(out,)`` or none. Build one with :meth:`from_float`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        activations: str = "fp32",
    ) -> None:
        super().__init__()
        if bits == 4 and (group_size is None or in_features % group_size):
            raise CompressionError(
                f"int4 needs in_features ({in_features}) divisible by the group ({group_size})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.int8_activations = activations == "int8" and in_features % BLOCK == 0
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
            self.register_buffer("low", None)
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(out_features, groups))
            self.register_buffer("low", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None, activations: str = "fp32"
    ) -> WeightOnlyLinear:
        """Quantize a float Linear (see the module docstring for the schemes)."""
        has_bias = linear.bias is not None
        module = cls(linear.in_features, linear.out_features, has_bias, bits, group_size, activations)
        w = linear.weight.detach().float().cpu()
        if bits == 8:
            q, scale = quantize_int8(w)
            module.qweight.copy_(q)
            module.scale.copy_(scale)
        else:
            q, scale, low = quantize_int4(w, group_size)
            module.qweight.copy_(pack_int4(q))
            module.scale.copy_(scale)
            module.low.copy_(low)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float().cpu())
        return module.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with, ``(out, in)``."""
        lib = cpu_kernels.kernels() if self.qweight.device.type == "cpu" else None
        if self.bits == 8:
            if lib is not None:
                return cpu_kernels.int8_dequant(lib, self.qweight, self.scale)
            return self.qweight.float() * self.scale[:, None]
        if lib is not None:
            return cpu_kernels.int4_dequant(lib, self.qweight, self.scale, self.low, self.group_size)
        q = unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = q * self.scale[..., None] + self.low[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` to ``(..., out)``, in fp32."""
        rows = x.numel() // self.in_features
        if rows <= GEMV_ROWS and x.is_cpu and torch.compiler.is_compiling() and _have_kernels():
            y = torch.ops.tansuo.weight_only_gemv(  # an opaque call in a compiled graph
                x.reshape(rows, self.in_features).float().contiguous(),
                self.qweight,
                self.scale,
                self.low,
                self.group_size or 0,
                self.int8_activations,
            )
            y = y if self.bias is None else y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        lib = cpu_kernels.kernels() if rows <= GEMV_ROWS and x.is_cpu else None
        if lib is not None:  # decoding: the hot path, kept short (it runs per layer per token)
            x2 = x.reshape(rows, self.in_features)
            if x2.dtype != torch.float32 or not x2.is_contiguous():
                x2 = x2.float().contiguous()
            b = self._buffers  # a dict lookup: nn.Module's attribute lookup of a buffer costs a microsecond
            y = cpu_kernels.gemv(
                lib, x2, b["qweight"], b["scale"], b["low"], self.group_size, self.int8_activations
            )
            if b["bias"] is not None:
                y += b["bias"]
        else:
            x2 = x.reshape(-1, self.in_features).float()
            if self.int8_activations:
                x2 = quantize_activations(x2)
            y = F.linear(x2, self.dequantized_weight(), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a model whose head was tied puts the embedding back under "<head>.weight" before loading (GPT's
        # load hook); this layer holds the quantized copy instead, so that entry is not ours to load
        state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ", per channel"
        acts = "int8" if self.int8_activations else "fp32"
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int{self.bits}{group}, {acts} activations"


@torch.compiler.assume_constant_result
def _have_kernels() -> bool:
    return cpu_kernels.kernels() is not None


# The matrix-vector kernels as an operator ``torch.compile`` can put in a graph (it cannot trace ctypes):
# ``x (M, K)`` fp32 contiguous to ``(M, N)``, ``low`` None for int8 weights. Defined with the low-level
# Library API: a call costs about 9 us, against 14-18 through ``torch.library.custom_op``'s wrappers (x151
# layers a token).
_OPS = torch.library.Library("tansuo", "FRAGMENT")
_OPS.define(
    "weight_only_gemv(Tensor x, Tensor qweight, Tensor scale, Tensor? low, int group_size, "
    "bool int8_activations) -> Tensor"
)


def _weight_only_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor | None,
    group_size: int,
    int8_activations: bool,
) -> torch.Tensor:
    lib = cpu_kernels.kernels()
    if lib is None:
        raise RuntimeError("the weight-only kernels are not available in this process")
    return cpu_kernels.gemv(lib, x, qweight, scale, low, group_size or None, int8_activations)


_OPS.impl("weight_only_gemv", _weight_only_gemv, "CPU")


@torch.library.register_fake("tansuo::weight_only_gemv")
def _(x: torch.Tensor, qweight: torch.Tensor, *_: Any) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


# ------------------------------------------------------------------------------------------ technique
def _shared_weights(model: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, n in owners.items() if n > 1}


def targets(model: nn.Module, config: WeightOnlyConfig, filter_fn: FilterFn | None = None) -> list[str]:
    """The Linear layers :func:`apply_weight_only` would quantize, checked: raises
    :class:`CompressionError` when an int4 layer's input width is not a multiple of the group size."""
    shared = _shared_weights(model)
    head = getattr(model, "lm_head", None)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if not config.head and (module is head or id(module.weight) in shared):
            continue
        names.append(name)
    if config.bits == 4:
        bad = [
            (n, model.get_submodule(n).in_features)
            for n in names
            if model.get_submodule(n).in_features % config.group_size
        ]
        if bad:
            widths = sorted({w for _, w in bad})
            fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
            hint = f"group sizes that fit: {', '.join(map(str, fits))}" if fits else "no group size fits"
            raise CompressionError(
                f"int4 group size {config.group_size} does not divide the input width of {len(bad)} Linear "
                f"layer(s) (widths {', '.join(map(str, widths))}; first {bad[0][0]!r}); {hint}"
            )
    return names


def apply_weight_only(
    model: nn.Module, config: WeightOnlyConfig, *, filter_fn: FilterFn | None = None
) -> dict[str, Any]:
    """The :class:`WeightOnlyConfig` technique: swap the target Linear layers in place; returns the record."""
    names = targets(model, config, filter_fn)
    if not names:
        raise CompressionError("this model has no Linear layers to quantize")
    shared = _shared_weights(model)
    untied = [n for n in names if id(model.get_submodule(n).weight) in shared]
    head = getattr(model, "lm_head", None)
    heads = [n for n in names if model.get_submodule(n) is head or n in untied]
    head_bits = config.head_bits if config.bits == 4 else 8
    for name in names:
        bits = head_bits if name in heads else config.bits
        group = config.group_size if bits == 4 else None
        layer = WeightOnlyLinear.from_float(model.get_submodule(name), bits, group, config.activations)
        _set_submodule(model, name, layer)
    if untied:
        log.info("%s tied to the embedding: quantized as a copy, the embedding stays fp32", ", ".join(untied))
    return {
        "mode": config.mode,
        "bits": config.bits,
        "group_size": config.group_size,
        "scheme": "symmetric per channel" if config.bits == 8 else "asymmetric min/max per group",
        "modules": names,
        "untied": untied,
        "head_modules": heads,
        "head_bits": head_bits,
        "activations": config.activations,
    }


def restore_weight_only(model: nn.Module, record: dict[str, Any]) -> None:
    """Replace the recorded Linear layers of a fresh model by empty :class:`WeightOnlyLinear` layers of the
    same shapes, so the quantized state dict loads."""
    heads = set(record.get("head_modules", []))
    for name in record.get("modules", []):
        bits = int(record["head_bits"]) if name in heads else int(record["bits"])
        group = record.get("group_size") if bits == 4 else None
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CompressionError(f"the bundle quantized {name!r}, but this model has no Linear layer there")
        # bundles written before activations were recorded computed with fp32 ones
        acts = record.get("activations", "fp32")
        empty = WeightOnlyLinear(
            linear.in_features, linear.out_features, linear.bias is not None, bits, group, acts
        )
        _set_submodule(model, name, empty.to(linear.weight.device))


def quantize_weights_(
    model: nn.Module, config: WeightOnlyConfig | None = None, filter_fn: FilterFn | None = None
) -> list[str]:
    """Quantize ``model``'s Linear layers' weights in place (default int8 per channel), append the record to
    ``model.compression`` (so bundles round-trip it) and return the names of the replaced layers."""
    record = apply_technique(model, config or WeightOnlyConfig(), filter_fn=filter_fn, step="weight_only")
    return list(record["modules"])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


register_technique(WeightOnlyConfig, step="weight_only", apply=apply_weight_only, restore=restore_weight_only)
