"""The runner of each ``tansuo compress`` step: ``run_*(bundle, step, out) -> out`` writes the step's bundle,
``check_*(bundle, model, step) -> model`` refuses up front what cannot run here and returns the model the
next step will see. :mod:`tansuo.variants.pipeline` registers them by step type and chains them. The prune
step, with its stages and ratio search, is :mod:`tansuo.variants.pruning`; the helpers here (``train_config``,
``fit``, ``move_bundle``) serve both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tansuo.atomic import atomic_write_dir
from tansuo.bundle import Bundle, save_bundle
from tansuo.compress import (
    DistillTask,
    Int8DynamicConfig,
    init_from_teacher,
    input_absmax,
    quantize_,
)
from tansuo.compress.quantize import quantized_engine
from tansuo.compress.weight_only import WeightOnlyConfig, quantize_weights_, targets
from tansuo.errors import CompressionError, RecipeError, TansuoError
from tansuo.measure.run import compare_in_rounds
from tansuo.models import create_model, get_model_entry
from tansuo.recipe import TrainConfig
from tansuo.train.trainer import Trainer
from tansuo.variants import accuracy
from tansuo.variants.onnx_int8 import check_onnx_int8, export_fp32, onnx_int8_available, quantize_onnxruntime
from tansuo.variants.steps import DistillStep, QuantizeStep

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers
def train_config(bundle: Bundle, out_dir: Path, overrides: dict[str, Any], max_steps: int | None) -> Any:
    # the recipe that trained the bundle; an imported bundle has none: fine-tuning settings for a
    # pretrained model then, not TrainConfig's defaults (lr 1e-3 suits small models trained from scratch)
    base: dict[str, Any] = {"lr": 5e-5, "weight_decay": 0.01, "warmup_steps": 100, "batch_size": 32}
    recipe_file = bundle.path / "recipe.json"
    if recipe_file.is_file():
        base = dict(json.loads(recipe_file.read_text(encoding="utf-8")).get("train", {}))
    else:
        log.info("%s has no recipe.json: training with %s unless --train says otherwise", bundle.path, base)
    base.update({"out_dir": str(out_dir), "early_stop_patience": 0})
    if max_steps is not None:
        base.update({"max_steps": max_steps, "epochs": None, "eval_every": max(1, max_steps // 4)})
        base["warmup_steps"] = min(int(base.get("warmup_steps", 0)), max_steps // 10)
    base.update(overrides)
    if base.get("max_steps") is None and base.get("epochs") is None:
        base["epochs"] = 1
    try:
        return TrainConfig.model_validate(base)
    except ValidationError as e:
        raise RecipeError(f"invalid train overrides {overrides}: {e.errors()[0]['msg']}") from e


def fit(task: Any, model: nn.Module, cfg: Any, seed: int, extra: nn.Module | None = None) -> Path:
    trainer = Trainer(task, model, cfg, seed=seed, extra=extra)
    result = trainer.fit()
    return Path(result["bundle"])


def bundle_seed(bundle: Bundle) -> int:
    return int(getattr(bundle.task, "seed", 0))


def bundle_recipe(bundle: Bundle) -> dict[str, Any] | None:
    path = bundle.path / "recipe.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def move_bundle(src: Path, dst: Path) -> None:
    """Copy the bundle folder ``src`` to ``dst`` atomically (an existing ``dst`` is replaced)."""

    def build(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)

    atomic_write_dir(dst, build)


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (ref - approx).float().norm().clamp(min=1e-12)
    return float(20 * torch.log10(ref.float().norm() / noise))


# ------------------------------------------------------------------------------------------ quantize
def _backends(model: nn.Module, step: QuantizeStep) -> list[str]:
    """The int8 backends to build: the step's, or for ``auto`` those that can run here."""
    if step.backend != "auto":
        return [step.backend]
    backends = ["torch", "onnxruntime"] if onnx_int8_available(model) else ["torch"]
    try:
        quantized_engine()
    except CompressionError:
        backends.remove("torch")
    if not backends:
        quantized_engine()  # raises with what would work
    if len(backends) > 1 and not any(isinstance(m, nn.Linear) for m in model.modules()):
        backends.remove("torch")  # all convolutions (a U-Net, a CNN detector): ONNX Runtime's ConvInteger
    return backends


def _smooth_candidates(step: QuantizeStep) -> list[float | None]:
    """SmoothQuant alphas to try on the torch backend (None: no migration)."""
    if step.smooth == "auto":
        return [None, 0.5]
    return [None] if step.smooth == "off" else [float(step.smooth)]


def weight_only_config(step: QuantizeStep) -> WeightOnlyConfig:
    """The :class:`WeightOnlyConfig` of an ``int8-weight`` / ``int4-weight`` step."""
    bits = 4 if step.mode == "int4-weight" else 8
    return WeightOnlyConfig(
        bits=bits, group_size=step.group_size, head=step.head, activations=step.activations
    )


def _skip_filter(step: QuantizeStep) -> Any:
    skip = tuple(step.skip)
    return None if not skip else (lambda _, name: not name.startswith(skip))


def run_weight_only(bundle: Bundle, step: QuantizeStep, out: Path) -> Path:
    """int8-weight / int4-weight: round-to-nearest weight-only quantization (no calibration); the record
    keeps the logits' SNR against fp32 on ``calibration_batches`` training batches."""
    model, task = bundle.model.cpu().eval(), bundle.task
    fp32 = copy.deepcopy(model)
    quantize_weights_(model, weight_only_config(step), filter_fn=_skip_filter(step))
    # one item a batch, the norms summed batch by batch: a 49k vocabulary's logits are 200 MB a sequence
    batches = [b for _, b in zip(range(step.calibration_batches), task.train_batches(1, 0), strict=False)]
    signal = noise = 0.0
    with torch.inference_mode():
        for b in batches:
            ref, got = task.logits(fp32, b)[0].float(), task.logits(model, b)[0].float()
            signal += float(ref.square().sum())
            noise += float((ref - got).square().sum())
    del fp32
    snr = 10 * math.log10(signal / max(noise, 1e-30))
    model.compression[-1]["sqnr_db"] = {step.describe(): snr}
    log.info("%s: logits' SNR against fp32 %.1f dB on %d batches", step.describe(), snr, len(batches))
    save_bundle(out, model, task, bundle.metrics, bundle_recipe(bundle))
    return out


def run_quantize(bundle: Bundle, step: QuantizeStep, out: Path) -> Path:
    """int8 on the torch (fbgemm) or the ONNX Runtime backend. ``auto`` builds both (when ONNX Runtime is
    installed and the family exports) and keeps the faster at batch 1; within a backend, 7- or 8-bit
    ranges (and on torch, with or without SmoothQuant's migration) are chosen by the logits' SNR against
    fp32 on calibration batches."""
    if step.weight_only:
        return run_weight_only(bundle, step, out)
    model, task = bundle.model.cpu().eval(), bundle.task
    skip = tuple(step.skip)
    ranges = [True, False] if step.reduce_range == "auto" else [bool(step.reduce_range)]
    batches = [b for _, b in zip(range(step.calibration_batches), task.train_batches(32, 0), strict=False)]
    with torch.inference_mode():
        ref = torch.cat([task.logits(model, b)[0] for b in batches])

    def snr_of(m: nn.Module) -> float:
        with torch.inference_mode():
            return _sqnr(ref, torch.cat([task.logits(m, b)[0] for b in batches]))

    sqnr: dict[str, float] = {}  # every candidate's SNR against fp32, recorded in the chosen one's record

    def keep(m: nn.Module, label: str, best: tuple[float, nn.Module] | None) -> tuple[float, nn.Module]:
        sqnr[label] = value = snr_of(m)
        return (value, m) if best is None or value > best[0] else best

    backends = _backends(model, step)
    judge = None if step.max_drop is None else accuracy.Judge(model, task)
    candidates: dict[str, nn.Module] = {}
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        if "torch" in backends:
            quantized_engine()
            require_linear(model)
            smooths = _smooth_candidates(step)
            absmax = None
            if any(a is not None for a in smooths):
                absmax = input_absmax(model, batches, lambda m, b: task.logits(m, b))
            best = None
            for rr in ranges:
                for alpha in smooths:
                    m = copy.deepcopy(model)  # quantize_ appends its record to the copy's compression
                    names = quantize_(
                        m,
                        Int8DynamicConfig(rr, step.per_sample, smooth=alpha),
                        filter_fn=lambda _, name: not (skip and name.startswith(skip)),
                        input_absmax=absmax,
                    )
                    if not names:
                        raise CompressionError("no Linear layer is left to quantize after skip")
                    smoothing = "" if alpha is None else f" smooth {alpha:g}"
                    best = keep(m, f"torch {8 - rr}-bit{smoothing}", best)
            candidates["torch"] = best[1]
            if judge is not None:
                candidates["torch"] = judge.fallback(candidates["torch"], step, snr_of, absmax)
        if "onnxruntime" in backends:
            if skip:
                raise CompressionError("skip is supported by the torch backend only; set backend: torch")
            fp32 = export_fp32(model, tmp)
            best = None
            for rr in ranges:
                m = quantize_onnxruntime(
                    model, tmp, reduce_range=rr, per_sample=step.per_sample, fp32_onnx=fp32, mode=step.mode
                )
                best = keep(m, f"onnxruntime {8 - rr}-bit weights", best)
            candidates["onnxruntime"] = best[1]
            if judge is not None and len(candidates) > 1:
                judge.drop_if_outside(candidates, "onnxruntime", step.max_drop)
        for qmodel in candidates.values():
            qmodel.compression[-1].update(mode=step.mode, sqnr_db=dict(sqnr))
        paths = {
            name: save_bundle(Path(tmp) / name, qmodel, task, bundle.metrics, bundle_recipe(bundle))
            for name, qmodel in candidates.items()
        }
        chosen = next(iter(paths))
        if len(paths) > 1:  # each in its own processes, in rounds: see measure.compare_in_rounds
            speed = compare_in_rounds(list(paths.values()), rounds=2, reps=40)
            latency = {name: s["latency_ms_p50"] for name, s in zip(paths, speed, strict=True)}
            chosen = min(latency, key=latency.get)
            shown = ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items())
            log.info("int8 at batch 1: %s; keeping %s", shown, chosen)
            candidates[chosen].compression[-1]["latency_ms_batch1"] = latency
        save_bundle(out, candidates[chosen], task, bundle.metrics, bundle_recipe(bundle))
    return out


def check_quantize(bundle: Bundle, model: nn.Module, step: QuantizeStep) -> nn.Module:
    """Raise when no backend the step allows can quantize this model on this machine (weight-only: when
    an int4 group size does not divide a layer's input width)."""
    if step.weight_only:
        targets(model, weight_only_config(step), _skip_filter(step))
    elif step.backend == "torch":
        quantized_engine()
        require_linear(model)
    elif step.backend == "onnxruntime":
        check_onnx_int8(model)
    elif not onnx_int8_available(model):
        quantized_engine()
        require_linear(model)
    return model


def require_linear(model: nn.Module) -> None:
    """Raise when the model has no Linear layer for the torch backend's int8 (all convolutions)."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        family = getattr(model, "family", type(model).__name__)
        raise CompressionError(
            f"this {family!r} model has no Linear layers for the torch backend's int8; "
            "--quantize-backend onnxruntime (a step's backend: onnxruntime) makes its convolutions int8"
        )


# ------------------------------------------------------------------------------------------ distill
def build_student(bundle: Bundle, step: DistillStep) -> nn.Module:
    """The student a distill step trains, checked against the teacher (family, vocabulary, classes)."""
    teacher, task = bundle.model, bundle.task
    name = step.into or teacher.model_name
    family = getattr(teacher, "family", "?")
    try:
        student_family = get_model_entry(name).family
    except ValueError as e:  # an unknown name: the message lists the registered models
        raise CompressionError(f"--distill-into {name!r}: {e}") from e
    if student_family != family:
        raise CompressionError(
            f"the student {name!r} is a {student_family!r} model but the teacher is {family!r}: the "
            f"family must match to read the teacher's inputs; choose a {family} preset (`tansuo models`)"
        )
    # no preset named: the teacher's own config (its trained overrides included), then the step's changes
    base = {} if step.into else dataclasses.asdict(teacher.config)
    try:
        student = create_model(name, **{**base, **task.model_overrides(), **step.overrides})
    except (TansuoError, TypeError, ValueError) as e:
        raise CompressionError(f"cannot build the student {name!r} with {step.overrides}: {e}") from e
    for key in ("vocab_size", "num_classes"):
        s, t = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if s != t:
            what = "tokens" if key == "vocab_size" else "classes"
            raise CompressionError(
                f"the student's {key} is {s} but the teacher's is {t}: the student must score the same "
                f"{what}; drop {key} from the student overrides"
            )
    return student


def run_distill(bundle: Bundle, step: DistillStep, out: Path) -> Path:
    teacher, task = bundle.model, bundle.task
    student = build_student(bundle, step)
    if step.init == "teacher" and getattr(student.config, "embed_dim", None) == getattr(
        teacher.config, "embed_dim", None
    ):
        init_from_teacher(student, teacher)
    distill_task = DistillTask(
        task, teacher, student, alpha=step.alpha, temperature=step.temperature, hidden=step.hidden
    )
    cfg = train_config(bundle, out.with_name(out.name + "-train"), step.train, None)
    best = fit(distill_task, student, cfg, bundle_seed(bundle), extra=distill_task.extra)
    move_bundle(best, out)
    return out


def check_distill(bundle: Bundle, model: nn.Module, step: DistillStep) -> nn.Module:
    """The student is built (and checked against the teacher); later steps are checked against it."""
    return build_student(bundle, step)
