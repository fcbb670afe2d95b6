"""int8 on ONNX Runtime: the model exported to ONNX, then its weights quantized by ONNX Runtime.

This is the ``onnxruntime`` backend of a ``quantize`` step, usable from Python without the CLI::

    int8 = quantize_onnxruntime(model, workdir, reduce_range=False)
    save_bundle(out, int8, task)          # a bundle holding model.onnx ("runtime": "onnxruntime")

Weights are int8 per output channel (``quantize_dynamic(per_channel=True, weight_type=QInt8)``); activations
are quantized at run time. It is a different runtime, not an in-place transform of the PyTorch model, so it
is not a :mod:`tansuo.compress` technique: the result is an :class:`~tansuo.export.onnx.OnnxModel` that
carries the record of how it was made in ``compression``.

onnx / onnxruntime are imported by :mod:`tansuo.export.onnx` and here, only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tansuo.export.onnx import (
    OnnxModel,
    export_onnx,
    exportable,
    input_names,
    onnx_available,
    quiet,
    require_onnx,
)


def onnx_int8_available(model: nn.Module) -> bool:
    """Whether ONNX Runtime is installed and the model's family declares ONNX inputs (it exports)."""
    return onnx_available() and exportable(model)


def check_onnx_int8(model: nn.Module) -> None:
    """Raise a :class:`~tansuo.errors.TansuoError` saying what is missing when :func:`quantize_onnxruntime`
    cannot run on this model here (ONNX Runtime not installed, or a family that does not export)."""
    require_onnx()
    input_names(model)


def export_fp32(model: nn.Module, workdir: str | Path) -> Path:
    """Export ``model`` (fp32, checked against PyTorch) to ``workdir/fp32.onnx``; returns the path."""
    path = Path(workdir) / "fp32.onnx"
    export_onnx(model, path)
    return path


def quantize_onnxruntime(
    model: nn.Module,
    workdir: str | Path,
    *,
    reduce_range: bool = True,
    per_sample: bool = True,
    fp32_onnx: str | Path | None = None,
    mode: str = "int8",
) -> OnnxModel:
    """The model's int8 ONNX Runtime twin.

    Args:
        model: A PyTorch model whose family exports (``onnx_inputs``); it is not changed.
        workdir: Folder for the ONNX files (``fp32.onnx``, ``int8-<reduce_range>.onnx``); the returned model
            reads its file from there, so keep it until the model is saved (``save_bundle`` copies it).
        reduce_range: 7-bit weights (safe without VNNI) instead of 8-bit.
        per_sample: Quantize each sample's activations separately (predictions independent of the batch).
        fp32_onnx: An fp32 export of ``model`` already made (:func:`export_fp32`), to quantize several ways
            from one export; by default the model is exported first.
        mode: The mode named in the record.

    Returns:
        An :class:`OnnxModel` whose ``compression`` is the model's records plus this step's (``"backend":
        "onnxruntime"``), ready for ``save_bundle``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = Path(fp32_onnx) if fp32_onnx is not None else export_fp32(model, workdir)
    path = workdir / f"int8-{reduce_range}.onnx"
    with quiet():
        quantize_dynamic(fp32, path, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    int8 = OnnxModel(path, model, per_sample=per_sample)
    int8.model_name = getattr(model, "model_name", "")
    record: dict[str, Any] = {
        "step": "quantize",
        "mode": mode,
        "backend": "onnxruntime",
        "reduce_range": reduce_range,
        "per_sample": per_sample,
    }
    int8.compression = [*(getattr(model, "compression", None) or []), record]
    return int8
