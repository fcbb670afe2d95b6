"""Compression techniques: int8 quantization, structured / unstructured pruning, distillation.

Python API (torchao style, in place)::

    quantize_(model, Int8DynamicConfig(), filter_fn=...)
    quantize_weights_(model, WeightOnlyConfig(bits=4, group_size=32))  # weight-only, for decoders
    prune_(model, StructuredPruneConfig(heads=0.25, ffn=0.5), scores=taylor_scores(model, batches, loss))
    DistillationLoss(alpha=0.5, temperature=2.0)(student_logits, teacher_logits, labels)

``quantize_`` and ``prune_`` look up the technique registered for ``type(config)``
(:mod:`tansuo.compress.registry`), which changes the model and appends its record to ``model.compression``
(a list of dicts) that bundles store in config.json; :func:`restore_structure` replays the records on a
freshly built model so that the compressed weights load (shrunk layers, int8 layers). So
``quantize_(model, Int8DynamicConfig()); save_bundle(...); load_bundle(...)`` gives the int8 model back.
A new technique registers its config type with :func:`~tansuo.compress.registry.register_technique`.

This package holds the techniques only; ``tansuo compress`` (chaining steps, fine-tuning, measuring every
variant, keeping the best within a quality budget) is :mod:`tansuo.variants`.
"""

from __future__ import annotations

from tansuo.compress.distill import DistillationLoss, DistillTask, HiddenStateLoss, init_from_teacher
from tansuo.compress.prune import (
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    gradual_schedule,
    magnitude_scores,
    prune_,
    restore_pruned,
    stage_config,
    stage_steps,
    taylor_scores,
    units,
)
from tansuo.compress.quantize import (
    Int8DynamicConfig,
    Int8DynamicLinear,
    input_absmax,
    quantize_,
    restore_quantized,
    smooth_factors,
)
from tansuo.compress.registry import (
    Technique,
    apply_technique,
    register_step,
    register_technique,
    restore_structure,
)
from tansuo.compress.weight_only import (
    WeightOnlyConfig,
    WeightOnlyLinear,
    quantize_weights_,
    restore_weight_only,
)

__all__ = [
    "DistillTask",
    "DistillationLoss",
    "HiddenStateLoss",
    "Int8DynamicConfig",
    "Int8DynamicLinear",
    "StructuredPruneConfig",
    "Technique",
    "UnstructuredPruneConfig",
    "WeightOnlyConfig",
    "WeightOnlyLinear",
    "apply_technique",
    "gradual_schedule",
    "init_from_teacher",
    "input_absmax",
    "magnitude_scores",
    "prune_",
    "quantize_",
    "quantize_weights_",
    "register_step",
    "register_technique",
    "restore_pruned",
    "restore_quantized",
    "restore_structure",
    "restore_weight_only",
    "smooth_factors",
    "stage_config",
    "stage_steps",
    "taylor_scores",
    "units",
]
