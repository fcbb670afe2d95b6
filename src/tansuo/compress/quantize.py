"""Int8 dynamic quantization of Linear layers, torchao style: ``quantize_(model, Int8DynamicConfig())``.

Weights are stored as int8 with one fp32 scale per output channel (symmetric, zero point 0); activations
are quantized per call from their observed range (dynamic quantization, as in BERT int8 by Zafrir et al.
2019 and Optimum's dynamic ONNX Runtime quantization). The matmul runs in fbgemm's int8 kernel
(``torch.ops.quantized.linear_dynamic``), the kernel behind ``torch.ao.quantization.quantize_dynamic``.

Why this kernel: on this 2-core AVX2 CPU it runs a BERT-base layer stack at batch 1 x 128 tokens 2.2x
faster than fp32, while torchao's int8 configs are 5-39x *slower* without ``torch.compile`` (measured, see
the project's STACK.md). ``quantize_dynamic`` itself is deprecated and stores torchbind objects that
safetensors cannot hold; :class:`Int8DynamicLinear` keeps plain tensors (``weight`` int8, ``weight_scale``,
``bias``) in its state dict and packs them for the kernel on first use, so a quantized bundle is still only
safetensors and JSON.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tansuo.compress.registry import apply_technique, register_technique
from tansuo.errors import CompressionError

#: quantized engines with a fast x86 int8 GEMM, in order of preference (qnnpack is 2x slower than fp32 here)
ENGINES = ("fbgemm", "x86", "onednn")


def supported_engines() -> list[str]:
    """The quantized engines this build of torch has."""
    return list(torch.backends.quantized.supported_engines)


def quantized_engine() -> str:
    """The int8 engine used on this machine; raises :class:`CompressionError` when none is available."""
    supported = supported_engines()
    for engine in ENGINES:
        if engine in supported:
            return engine
    raise CompressionError(
        f"int8 dynamic quantization needs one of the x86 engines {ENGINES}, and this build of torch has "
        f"{supported}; run the compression on an x86 CPU (or use pruning and distillation, which need none)"
    )


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


@dataclass(frozen=True)
class Int8DynamicConfig:
    """Int8 weights (per output channel, symmetric) and int8 activations quantized at run time.

    Args:
        reduce_range: Quantize activations to 7 bits, as fbgemm needs on CPUs without VNNI (AVX2) to keep its
            16-bit accumulation from saturating. Leave it on unless every target CPU has AVX-512 VNNI.
        per_sample: Take each sample's activation range separately (one kernel call per item of the batch),
            so a prediction never depends on what else is in its batch (serving batches requests
            together). Off: one range for the whole batch, as ``quantize_dynamic`` does.
    """

    reduce_range: bool = True
    per_sample: bool = True
    #: SmoothQuant's migration strength (Xiao et al. 2023): with calibrated input ranges, each input channel
    #: j is divided by ``s_j = max|x_j|^a / max|w_j|^(1-a)`` and the weight's column j multiplied by it, so
    #: activation outliers move into the (per-channel quantized) weights; None: no migration
    smooth: float | None = None

    def __post_init__(self) -> None:
        if self.smooth is not None and not 0.0 < self.smooth < 1.0:
            raise CompressionError(f"smooth (SmoothQuant's alpha) must lie in (0, 1), got {self.smooth}")


class Int8DynamicLinear(nn.Module):
    """A Linear layer with int8 weights that runs on fbgemm's int8 kernel (CPU only).

    State: ``weight`` int8 ``(out, in)``, ``weight_scale`` fp32 ``(out,)``, ``bias`` fp32 ``(out,)`` or none,
    and with SmoothQuant's migration ``input_scale`` fp32 ``(in,)``, which multiplies the input first.
    Build one with :meth:`from_float`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        reduce_range: bool = True,
        per_sample: bool = True,
        smoothed: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reduce_range, self.per_sample = reduce_range, per_sample
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if smoothed else None)
        self._packed: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._unpack())

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        config: Int8DynamicConfig = Int8DynamicConfig(),
        input_absmax: torch.Tensor | None = None,
    ) -> Int8DynamicLinear:
        """Quantize a float Linear: ``scale = max |w| / 127`` per output row, ``q = round(w / scale)``;
        with ``config.smooth`` and the calibrated ``input_absmax`` (per input channel), after migrating
        the activations' outliers into the weight (:func:`smooth_factors`)."""
        w = linear.weight.detach().float().cpu()
        has_bias = linear.bias is not None
        smoothed = config.smooth is not None and input_absmax is not None
        module = cls(
            linear.in_features,
            linear.out_features,
            has_bias,
            config.reduce_range,
            config.per_sample,
            smoothed=smoothed,
        )
        if smoothed:
            factors = smooth_factors(input_absmax, w, config.smooth)
            w = w * factors[None, :]
            module.input_scale.copy_(1.0 / factors)
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        module.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float().cpu())
        return module

    def _unpack(self) -> None:
        self._packed = None

    def _apply(self, fn, recurse=True):  # .to() / .cpu(): the packed weight is rebuilt from the new tensors
        self._packed = None
        return super()._apply(fn, recurse)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with, ``(out, in)``."""
        return self.weight.float() * self.weight_scale[:, None]

    def _pack(self) -> torch.Tensor:
        if self.weight.device.type != "cpu":
            raise CompressionError(
                "int8 layers run on the CPU only (fbgemm); load this bundle with --device cpu"
            )
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # the quantized-tensor deprecation: see the module docstring
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            scale = self.weight_scale.double()
            qweight = torch._make_per_channel_quantized_tensor(self.weight, scale, zero, 0)
        with _engine(quantized_engine()):
            return torch.ops.quantized.linear_prepack(qweight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ..., in)`` float to ``(B, ..., out)`` float32; dimension 0 is the batch."""
        if self._packed is None:
            self._packed = self._pack()
        x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale
        x = x.contiguous()
        if not self.per_sample or x.dim() < 2 or x.shape[0] == 1:
            return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)
        rows = x.split(1, dim=0)  # one activation range per sample
        return torch.cat(
            [torch.ops.quantized.linear_dynamic(r, self._packed, self.reduce_range) for r in rows]
        )

    def extra_repr(self) -> str:
        per = "per sample" if self.per_sample else "per batch"
        bits = 7 if self.reduce_range else 8
        smooth = ", smoothed" if self.input_scale is not None else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int8, {bits}-bit {per}{smooth}"


def smooth_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|x_j|^alpha / max_i |w_ij|^(1 - alpha)``: the input
    is divided by them and the weight's columns multiplied, leaving the product unchanged in exact
    arithmetic. Channels that never fired, or whose weight column is zero, keep factor 1."""
    x = input_absmax.detach().float().cpu()
    w = weight.detach().float().cpu().abs().amax(dim=0)
    factors = x.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1.0 - alpha)
    dead = (x <= 1e-5) | (w <= 1e-5) | ~torch.isfinite(factors)
    return torch.where(dead, torch.ones_like(factors), factors)


def input_absmax(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The largest absolute input each Linear layer (that ``filter_fn`` accepts) sees per input channel over
    ``batches``, ``forward(model, batch)`` running the model: the calibration SmoothQuant needs."""
    filter_fn = filter_fn or _default_filter
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).cpu()
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and filter_fn(module, name):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.inference_mode():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise CompressionError("calibration ran no Linear layer: give at least one batch the model reads")
    return seen


def _default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_(
    model: nn.Module,
    config: Any = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Quantize ``model`` in place with the technique registered for ``type(config)`` (default
    :class:`Int8DynamicConfig`), append its record to ``model.compression`` (so ``save_bundle`` /
    ``load_bundle`` round-trip the model) and return the names of the replaced modules.

    :class:`Int8DynamicConfig` replaces every ``nn.Linear`` that ``filter_fn(module, name)`` accepts (default:
    all) by an :class:`Int8DynamicLinear`. A Linear whose weight is shared with another module (a tied LM or
    MLM decoder) is left in fp32, so the sharing survives. The model must be on the CPU. ``kwargs`` go to
    the technique: ``input_absmax`` (:func:`input_absmax`) for ``Int8DynamicConfig(smooth=...)``.
    """
    config = config if config is not None else Int8DynamicConfig()
    record = apply_technique(model, config, filter_fn=filter_fn, step="quantize", **kwargs)
    return list(record.get("modules", []))


def quantize_int8(
    model: nn.Module,
    config: Int8DynamicConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    input_absmax: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The :class:`Int8DynamicConfig` technique: swap the Linear layers in place; returns the record.
    ``config.smooth`` needs ``input_absmax`` (:func:`input_absmax`); a layer missing from it is not
    smoothed."""
    quantized_engine()  # fail before touching the model
    if config.smooth is not None and not input_absmax:
        raise CompressionError(
            "Int8DynamicConfig(smooth=...) needs calibrated input ranges: "
            "quantize_(model, config, input_absmax=input_absmax(model, batches, forward))"
        )
    absmax = input_absmax or {}
    filter_fn = filter_fn or _default_filter
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise CompressionError("quantize_ works on a CPU model (int8 kernels are CPU-only); call model.cpu()")
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    names = []
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and filter_fn(module, name)):
            continue
        if owners.get(id(module.weight), 0) > 1:
            continue  # tied to an embedding
        smooth = absmax.get(name) if config.smooth is not None else None
        _set_submodule(model, name, Int8DynamicLinear.from_float(module, config, smooth))
        names.append(name)
    record = {
        "step": "quantize",
        "mode": "int8",
        "backend": "torch",
        "modules": names,
        "reduce_range": config.reduce_range,
        "per_sample": config.per_sample,
    }
    if config.smooth is not None:
        record["smooth"] = config.smooth
        record["smoothed"] = [n for n in names if n in absmax]
    return record


def restore_quantized(
    model: nn.Module,
    names: list[str],
    reduce_range: bool = True,
    per_sample: bool = True,
    smoothed: Iterable[str] = (),
) -> None:
    """Replace the named Linear layers by empty :class:`Int8DynamicLinear` layers of the same shapes (with an
    input scale for those in ``smoothed``), so that a quantized state dict loads (how bundles are read
    back)."""
    smoothed = set(smoothed)
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise CompressionError(f"the bundle quantized {name!r}, but this model has no Linear layer there")
        bias = linear.bias is not None
        empty = Int8DynamicLinear(
            linear.in_features, linear.out_features, bias, reduce_range, per_sample, smoothed=name in smoothed
        )
        _set_submodule(model, name, empty)


def restore_int8(model: nn.Module, record: dict[str, Any]) -> None:
    """Replay a ``quantize`` record of the torch backend (bundles written before ``per_sample`` existed
    quantized per batch)."""
    reduce_range, per_sample = record.get("reduce_range", True), record.get("per_sample", False)
    restore_quantized(
        model, record.get("modules", []), reduce_range, per_sample, smoothed=record.get("smoothed", ())
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


register_technique(Int8DynamicConfig, step="quantize", apply=quantize_int8, restore=restore_int8)
