"""``tansuo compress``: chain compression steps on a bundle, measure every variant, keep the best.

Each step of a :class:`~tansuo.variants.steps.CompressRecipe` runs on the previous step's bundle and writes
a bundle of its own. Run folder (``--out``)::

    variants/00-original/   the input bundle, measured as the reference
    variants/01-distill/    a bundle per step (fine-tuning runs write their logs beside it)
    report.json, report.md  every variant's measurements and the choice
    bundle/                 the chosen variant (written only when one qualifies)

The original and each variant are measured in a fresh process (:mod:`tansuo.measure.run`).

Steps are run by the :class:`StepRunner` registered for their type in :data:`STEP_RUNNERS`
(:func:`register_runner`): ``run(bundle, step, out) -> out`` and ``check(bundle, model, step) -> model``,
which refuses up front what cannot run and returns the model the next step will see. The built-in runners
are in :mod:`tansuo.variants.runners` (pruning's in :mod:`tansuo.variants.pruning`); the techniques
themselves (``quantize_``, ``prune_``, distillation) are :mod:`tansuo.compress`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from tansuo.adapters import lora_layers, merge_lora_
from tansuo.atomic import atomic_write_json, atomic_write_text
from tansuo.bundle import Bundle, load_bundle
from tansuo.errors import CompressionError
from tansuo.measure.run import measure_in_subprocess, speed_in_rounds
from tansuo.train.trainer import metric_mode
from tansuo.variants.accuracy import drop
from tansuo.variants.pruning import check_prune, run_prune
from tansuo.variants.report import report_markdown
from tansuo.variants.runners import (
    build_student,
    check_distill,
    check_quantize,
    move_bundle,
    run_distill,
    run_quantize,
)
from tansuo.variants.steps import (
    CompressRecipe,
    DistillStep,
    PruneStep,
    QuantizeStep,
    describe,
    register_step_type,
)

__all__ = [
    "STEP_RUNNERS",
    "StepRunner",
    "Variant",
    "build_student",
    "check_steps",
    "choose",
    "compress",
    "register_runner",
    "run_steps",
    "runner_for",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Variant:
    name: str
    path: Path
    steps: list[str]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class StepRunner:
    """How a step type runs: ``run(bundle, step, out) -> out`` writes the step's bundle at ``out``;
    ``check(bundle, model, step) -> model`` raises for what cannot run and returns the model the next step
    sees (a distill step's student)."""

    run: Callable[[Bundle, Any, Path], Path]
    check: Callable[[Bundle, nn.Module, Any], nn.Module]


#: step type (the pydantic model of a recipe step) -> its runner
STEP_RUNNERS: dict[type, StepRunner] = {}


def register_runner(
    step_type: type,
    run: Callable[[Bundle, Any, Path], Path],
    check: Callable[[Bundle, nn.Module, Any], nn.Module] | None = None,
) -> StepRunner:
    """Register how steps of ``step_type`` run (and are checked up front; default: no check). A pydantic
    step class is also registered as a step recipes may name (``steps.register_step_type``)."""
    if isinstance(step_type, type) and issubclass(step_type, BaseModel):
        register_step_type(step_type)
    runner = StepRunner(run, check or (lambda bundle, model, step: model))
    STEP_RUNNERS[step_type] = runner
    return runner


def runner_for(step: Any) -> StepRunner:
    """The runner registered for ``type(step)``."""
    try:
        return STEP_RUNNERS[type(step)]
    except KeyError:
        known = ", ".join(t.__name__ for t in STEP_RUNNERS)
        raise CompressionError(
            f"no runner is registered for {type(step).__name__} (known: {known})"
        ) from None


register_runner(QuantizeStep, run_quantize, check_quantize)
register_runner(PruneStep, run_prune, check_prune)
register_runner(DistillStep, run_distill, check_distill)


# ------------------------------------------------------------------------------------------ driver
def choose(variants: list[Variant], max_drop: float | None, objective: str) -> Variant | None:
    """The variant to keep: with ``max_drop`` None the last one; otherwise, among the compressed variants
    whose quality is at most ``max_drop`` below the original's (points for a metric that goes up, such as
    accuracy; the metric's own units for one that goes down, such as an lm's loss), the one with the lowest
    latency (or size), ties broken by the other figure. None when none qualifies."""
    original, compressed = variants[0], variants[1:]
    if max_drop is None:
        return compressed[-1] if compressed else None
    ref = original.figures["quality"]
    keyed = {"latency": ("latency_ms_p50", "size_bytes"), "size": ("size_bytes", "latency_ms_p50")}[objective]
    metric = original.figures.get("metric")
    maximize = metric is None or metric_mode(metric) == "max"
    ok = [v for v in compressed if drop(ref, v.figures["quality"], maximize) <= max_drop + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda v: tuple(v.figures[k] for k in keyed))


def check_steps(bundle: Bundle, recipe: CompressRecipe) -> None:
    """Raise :class:`CompressionError` for a step that cannot run on this bundle (checked up front; a
    student's shape is checked against the teacher, a pruning step after distillation against the student)."""
    model = _merged(bundle).model
    for step in recipe.steps:
        model = runner_for(step).check(bundle, model, step)


def _merged(bundle: Bundle) -> Bundle:
    """The bundle with any LoRA adapters folded into its weights (in place): compression works on plain
    Linear layers, so a LoRA-tuned model is compressed as its merged weights (what `tansuo merge` writes)."""
    if lora_layers(bundle.model):
        log.info("%s: merging its LoRA adapters into the weights before compressing", bundle.path)
        merge_lora_(bundle.model)
    return bundle


def run_steps(
    bundle_path: Path, steps: list[Any], variants_dir: Path, *, data_path: str | None = None
) -> Iterator[tuple[str, Path, list[str]]]:
    """Apply ``steps`` in order, each to the previous step's bundle, writing ``variants_dir/NN-step``.

    Yields (folder name, bundle path, descriptions of the steps applied so far) after each step.
    """
    current = Path(bundle_path)
    done: list[str] = []
    for i, step in enumerate(steps, 1):
        name = f"{i:02d}-{step.step}"
        log.info("step %d/%d: %s", i, len(steps), describe(step))
        b = _merged(load_bundle(current, device="cpu", data_path=data_path))
        current = runner_for(step).run(b, step, variants_dir / name)
        done.append(describe(step))
        yield name, current, list(done)


def compress(
    bundle_path: Path,
    recipe: CompressRecipe,
    out: Path,
    *,
    data_path: str | None = None,
    on_variant: Callable[[Variant], None] | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` on a bundle into the run folder ``out``; returns the report (also in report.json)."""
    bundle_path = Path(bundle_path)
    original = load_bundle(bundle_path, device="cpu", data_path=data_path)
    check_steps(original, recipe)  # refuse what cannot run before anything is trained or written
    out.mkdir(parents=True, exist_ok=True)
    variants_dir = out / "variants"
    measure = dict(
        seq_len=recipe.seq_len, large_batch=recipe.large_batch, reps=recipe.reps, data_path=data_path
    )
    variants = [Variant("original", bundle_path, [])]
    variants[0].figures = measure_in_subprocess(bundle_path, threads=recipe.threads, **measure)
    if on_variant:
        on_variant(variants[0])
    for name, path, done in run_steps(bundle_path, recipe.steps, variants_dir, data_path=data_path):
        v = Variant(name, path, done)
        v.figures = measure_in_subprocess(path, threads=recipe.threads, **measure)
        variants.append(v)
        if on_variant:
            on_variant(v)
    speed_in_rounds(  # speed again, every variant in rounds of fresh processes: comparable ratios
        [v.path for v in variants],
        [v.figures for v in variants],
        rounds=recipe.speed_rounds,
        threads=recipe.threads,
        seq_len=recipe.seq_len,
        large_batch=recipe.large_batch,
        reps=recipe.reps,
    )
    chosen = choose(variants, recipe.max_drop, recipe.objective)
    report = {
        "bundle": str(bundle_path),
        "recipe": recipe.model_dump(),
        "variants": [
            {"name": v.name, "path": str(v.path), "steps": v.steps, **v.figures, **_fallback(v.path)}
            for v in variants
        ],
        "chosen": None if chosen is None else chosen.name,
    }
    if chosen is not None:
        move_bundle(chosen.path, out / "bundle")
        report["chosen_bundle"] = str(out / "bundle")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


def default_out(bundle: Path) -> Path:
    """The run folder ``tansuo compress`` writes by default: ``runs/compress-<run name>``."""
    source = Path(bundle).resolve()
    name = source.parent.name if source.name == "bundle" else source.name  # runs/X/bundle -> X
    return Path("runs") / f"compress-{name}"


def _fallback(bundle: Path) -> dict[str, Any]:
    """What the searches of a variant's last step did: the accuracy-aware int8 search (which layers stayed
    fp32, what each cost and bought), the pruning ratio search (every candidate) and the pruning schedule."""
    config = json.loads((Path(bundle) / "config.json").read_text(encoding="utf-8"))
    record = (config.get("compression") or [{}])[-1]
    found = {
        "int8_fallback": record.get("accuracy_aware"),
        "prune_search": record.get("ratio_search"),
        "prune_schedule": record.get("schedule"),
    }
    return {k: v for k, v in found.items() if v is not None}
