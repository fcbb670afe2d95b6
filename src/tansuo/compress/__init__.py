"""Compression that is measured: int8 quantization, structured / unstructured pruning, distillation.

Python API (torchao style, in place)::

    quantize_(model, Int8DynamicConfig(), filter_fn=...)
    prune_(model, StructuredPruneConfig(heads=0.25, ffn=0.5), scores=taylor_scores(model, batches, loss))
    DistillationLoss(alpha=0.5, temperature=2.0)(student_logits, teacher_logits, labels)

Each step returns or appends a record to ``model.compression`` (a list of dicts) that bundles store in
config.json; :func:`restore_structure` replays the records on a freshly built model so that the compressed
weights load (shrunk layers, int8 layers). ``tansuo compress`` (:mod:`tansuo.compress.run`) chains steps,
fine-tunes, measures every variant and keeps the best within a quality budget.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tansuo.compress.distill import DistillationLoss, DistillTask, HiddenStateLoss, init_from_teacher
from tansuo.compress.prune import (
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    magnitude_scores,
    prune_,
    restore_pruned,
    taylor_scores,
)
from tansuo.compress.quantize import Int8DynamicConfig, Int8DynamicLinear, quantize_, restore_quantized
from tansuo.errors import BundleError

__all__ = [
    "DistillTask",
    "DistillationLoss",
    "HiddenStateLoss",
    "Int8DynamicConfig",
    "Int8DynamicLinear",
    "StructuredPruneConfig",
    "UnstructuredPruneConfig",
    "init_from_teacher",
    "magnitude_scores",
    "prune_",
    "quantize_",
    "restore_structure",
    "taylor_scores",
]


def restore_structure(model: nn.Module, records: list[dict[str, Any]]) -> None:
    """Replay compression records (from a bundle's config.json) on a freshly built model, in order, and
    attach them as ``model.compression``."""
    for record in records:
        step = record.get("step")
        if step == "prune":
            restore_pruned(model, record)
        elif step == "quantize":
            reduce_range, per_sample = record.get("reduce_range", True), record.get("per_sample", False)
            restore_quantized(model, record["modules"], reduce_range, per_sample)
        elif step != "distill":
            raise BundleError(f"unknown compression step {step!r} in the bundle; a newer tansuo wrote it")
    model.compression = list(records)
