"""Variants: the ``tansuo compress`` pipeline on top of the techniques of :mod:`tansuo.compress`.

A bundle goes through a recipe's steps (distill, prune, quantize; :mod:`~tansuo.variants.steps`), each on
the previous step's bundle; every variant is measured in a fresh process and the best within a quality
budget is kept (:mod:`~tansuo.variants.pipeline`); :mod:`~tansuo.variants.report` tables the figures.
int8 on ONNX Runtime, usable on its own, is :func:`~tansuo.variants.onnx_int8.quantize_onnxruntime`.

Python API::

    from tansuo.variants import compress, load_compress_recipe
    report = compress(bundle_path, load_compress_recipe(Path("recipes/compress/sst2.yaml")), Path("runs/c"))
"""

from __future__ import annotations

from tansuo.variants.onnx_int8 import (
    check_onnx_int8,
    export_fp32,
    onnx_int8_available,
    quantize_onnxruntime,
)
from tansuo.variants.pipeline import (
    STEP_RUNNERS,
    StepRunner,
    Variant,
    build_student,
    check_steps,
    choose,
    compress,
    default_out,
    register_runner,
    run_steps,
    runner_for,
)
from tansuo.variants.report import COLUMNS, HEADERS, report_markdown, rows
from tansuo.variants.steps import (
    CompressRecipe,
    DistillStep,
    PruneStep,
    QuantizeStep,
    Step,
    describe,
    load_compress_recipe,
    parse_prune,
    recipe_from_options,
)

__all__ = [
    "COLUMNS",
    "HEADERS",
    "STEP_RUNNERS",
    "CompressRecipe",
    "DistillStep",
    "PruneStep",
    "QuantizeStep",
    "Step",
    "StepRunner",
    "Variant",
    "build_student",
    "check_onnx_int8",
    "check_steps",
    "choose",
    "compress",
    "default_out",
    "describe",
    "export_fp32",
    "load_compress_recipe",
    "onnx_int8_available",
    "parse_prune",
    "quantize_onnxruntime",
    "recipe_from_options",
    "register_runner",
    "report_markdown",
    "rows",
    "run_steps",
    "runner_for",
]
