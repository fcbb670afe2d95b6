"""``tansuo compress``: chain compression steps on a bundle, measure every variant, keep the best.

A compression recipe is a list of steps applied in order, each to the previous step's result::

    steps:
      - {step: distill, into: minilm_l6, overrides: {num_layers: 3}, alpha: 0.5, temperature: 2.0}
      - {step: prune, heads: 0.25, ffn: 0.5, importance: taylor, finetune_steps: 500}
      - {step: quantize, mode: int8}
    max_drop: 1.0          # quality points; omit to keep the last variant whatever it costs
    objective: latency     # what "most compressed" means: latency (batch 1, p50) or size

Run folder (``--out``)::

    variants/00-original/   the input bundle, measured as the reference
    variants/01-distill/    a bundle per step (fine-tuning runs write their logs beside it)
    report.json, report.md  every variant's measurements and the choice
    bundle/                 the chosen variant (written only when one qualifies)

The original and each variant are measured in a fresh process (:mod:`tansuo.measure.run`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from tansuo.atomic import atomic_write_dir, atomic_write_json, atomic_write_text
from tansuo.compress.distill import DistillTask, init_from_teacher
from tansuo.measure.run import compare_in_rounds, measure_in_subprocess
from tansuo.compress.prune import (
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    keep_zeros,
    magnitude_scores,
    prune_,
    sparsity,
    taylor_scores,
)
from tansuo.compress.quantize import Int8DynamicConfig, quantize_, quantized_engine
from tansuo.errors import CompressionError, RecipeError

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizeStep(_Strict):
    step: Literal["quantize"]
    mode: Literal["int8"] = "int8"
    #: Linear layers left in fp32, by name prefix (the classification head is small and sensitive)
    skip: list[str] = Field(default_factory=list)
    #: 7-bit activations (fbgemm's safe default without VNNI) or 8-bit; auto: whichever gives the model's
    #: logits on calibration batches the higher signal-to-noise ratio against fp32
    reduce_range: Literal["auto", True, False] = "auto"
    #: torch: fbgemm int8 Linear layers in the PyTorch model; onnxruntime: the model exported to ONNX and
    #: quantized by ONNX Runtime (classifiers of the bert, vit and resnet families); auto: the faster here
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    #: activation ranges per sample (predictions independent of the batch) or per batch (quantize_dynamic)
    per_sample: bool = True
    calibration_batches: int = Field(4, gt=0, description="training batches for reduce_range=auto")


class PruneStep(_Strict):
    step: Literal["prune"]
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of all attention heads to remove")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of all feed-forward neurons to remove")
    unstructured: float | None = Field(None, gt=0, lt=1, description="global magnitude sparsity instead")
    importance: Literal["magnitude", "taylor"] = "taylor"
    score_batches: int = Field(16, gt=0, description="training batches for taylor importance")
    finetune_steps: int = Field(0, ge=0, description="optimizer steps of fine-tuning after pruning")
    distill: bool = Field(True, description="fine-tune with the unpruned model as the teacher")
    alpha: float = Field(0.5, ge=0, le=1, description="hard-label weight when fine-tuning with a teacher")
    temperature: float = Field(2.0, gt=0)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the bundle's train section")

    @model_validator(mode="after")
    def _something(self) -> PruneStep:
        if self.unstructured is None and self.heads == 0 and self.ffn == 0:
            raise ValueError("give heads and/or ffn (structured) or unstructured (a sparsity)")
        if self.unstructured is not None and (self.heads or self.ffn):
            raise ValueError("structured (heads, ffn) and unstructured pruning are separate steps")
        return self


class DistillStep(_Strict):
    step: Literal["distill"]
    into: str | None = Field(None, description="student preset; None: the teacher's own architecture")
    overrides: dict[str, Any] = Field(default_factory=dict, description="student architecture fields")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label cross-entropy")
    temperature: float = Field(2.0, gt=0)
    hidden: float = Field(0.0, ge=0, description="weight of the hidden-state matching term")
    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: copy the teacher's weights where family and width match"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the bundle's train section")


Step = Annotated[QuantizeStep | PruneStep | DistillStep, Field(discriminator="step")]


class CompressRecipe(_Strict):
    steps: list[Step] = Field(min_length=1)
    max_drop: float | None = Field(None, ge=0, description="allowed quality drop in points; None: keep last")
    objective: Literal["latency", "size"] = "latency"
    seq_len: int = Field(128, gt=0, description="tokens per input when timing text models")
    large_batch: int = Field(32, gt=0, description="batch of the throughput measurement")
    reps: int = Field(60, gt=0, description="timed batch-1 calls per variant, over all rounds")
    speed_rounds: int = Field(3, gt=0, description="rounds of fresh processes the calls are spread over")
    threads: int | None = Field(None, gt=0, description="torch threads while measuring (default torch's)")

    @model_validator(mode="after")
    def _quantize_last(self) -> CompressRecipe:
        kinds = [s.step for s in self.steps]
        if "quantize" in kinds[:-1]:
            raise ValueError("quantize must be the last step: int8 layers are not trained further")
        return self


def load_compress_recipe(path: Path | None, raw: dict[str, Any] | None = None) -> CompressRecipe:
    """Validate a compression recipe from a YAML file (or an already parsed mapping)."""
    if raw is None:
        assert path is not None
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read compression recipe {path}: {e}") from e
    try:
        return CompressRecipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise RecipeError("invalid compression recipe:\n" + "\n".join(lines)) from e


def parse_prune(text: str) -> dict[str, float]:
    """``heads=0.25,ffn=0.5`` or ``unstructured=0.8`` to a mapping; a bad spec is a RecipeError."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("heads", "ffn", "unstructured"):
            raise RecipeError(f"--prune {text!r}: expected heads=F,ffn=F or unstructured=F (F a fraction)")
        try:
            out[key] = float(value)
        except ValueError:
            raise RecipeError(f"--prune {text!r}: {value!r} is not a number") from None
    if not out:
        raise RecipeError("--prune needs heads=F,ffn=F or unstructured=F")
    return out


# ------------------------------------------------------------------------------------------ steps
@dataclasses.dataclass
class Variant:
    name: str
    path: Path
    steps: list[str]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def _train_config(bundle: Any, out_dir: Path, overrides: dict[str, Any], max_steps: int | None) -> Any:
    from tansuo.recipe import TrainConfig

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


def _fit(task: Any, model: nn.Module, cfg: Any, seed: int, extra: nn.Module | None = None) -> Path:
    from tansuo.train.trainer import Trainer

    trainer = Trainer(task, model, cfg, seed=seed, extra=extra)
    result = trainer.fit()
    return Path(result["bundle"])


def _seed(bundle: Any) -> int:
    return int(getattr(bundle.task, "seed", 0))


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (ref - approx).float().norm().clamp(min=1e-12)
    return float(20 * torch.log10(ref.float().norm() / noise))


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def run_quantize(bundle: Any, step: QuantizeStep, out: Path) -> Path:
    """int8 on the torch (fbgemm) or the ONNX Runtime backend. ``auto`` builds both (when ONNX Runtime is
    installed and the family exports) and keeps the faster at batch 1; within a backend, 7- or 8-bit
    ranges are chosen by the logits' SNR against fp32 on calibration batches."""
    from tansuo.bundle import save_bundle
    from tansuo.export.onnx import IMAGE_FAMILIES, TEXT_FAMILIES

    model, task = bundle.model.cpu().eval(), bundle.task
    family = getattr(model, "family", "")
    skip = tuple(step.skip)
    ranges = [True, False] if step.reduce_range == "auto" else [bool(step.reduce_range)]
    batches = [b for _, b in zip(range(step.calibration_batches), task.train_batches(32, 0), strict=False)]
    with torch.inference_mode():
        ref = torch.cat([task.logits(model, b)[0] for b in batches])

    def snr_of(m: nn.Module) -> float:
        with torch.inference_mode():
            return _sqnr(ref, torch.cat([task.logits(m, b)[0] for b in batches]))

    backends = ["torch", "onnxruntime"] if step.backend == "auto" else [step.backend]
    if step.backend == "auto" and not (_onnxruntime_available() and family in TEXT_FAMILIES + IMAGE_FAMILIES):
        backends = ["torch"]
    if step.backend == "auto" and "torch" in backends:
        try:
            quantized_engine()
        except CompressionError:
            backends.remove("torch")
    if not backends:
        quantized_engine()  # raises with what would work
    candidates: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    sqnr: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        if "torch" in backends:
            quantized_engine()
            best = None
            for rr in ranges:
                m = copy.deepcopy(model)
                names = quantize_(
                    m,
                    Int8DynamicConfig(rr, step.per_sample),
                    filter_fn=lambda _, name: not (skip and name.startswith(skip)),
                )
                if not names:
                    raise CompressionError("this model has no Linear layers to quantize")
                sqnr[f"torch {8 - rr}-bit"] = value = snr_of(m)
                if best is None or value > best[0]:
                    best = (value, m, {"backend": "torch", "modules": names, "reduce_range": rr})
            candidates["torch"] = best[1:]
        if "onnxruntime" in backends:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            from tansuo.export.onnx import OnnxModel, export_onnx, quiet

            if skip:
                raise CompressionError("skip is supported by the torch backend only; set backend: torch")
            fp32 = Path(tmp) / "fp32.onnx"
            export_onnx(model, fp32)
            best = None
            for rr in ranges:
                path = Path(tmp) / f"int8-{rr}.onnx"
                with quiet():
                    quantize_dynamic(
                        fp32, path, per_channel=True, reduce_range=rr, weight_type=QuantType.QInt8
                    )
                m = OnnxModel(path, model, per_sample=step.per_sample)
                sqnr[f"onnxruntime {8 - rr}-bit weights"] = value = snr_of(m)
                if best is None or value > best[0]:
                    best = (value, m, {"backend": "onnxruntime", "reduce_range": rr})
            candidates["onnxruntime"] = best[1:]
        record: dict[str, Any] = {"step": "quantize", "mode": step.mode, "per_sample": step.per_sample}
        record["sqnr_db"] = sqnr
        paths = {}
        for name, (qmodel, extra) in candidates.items():
            if name == "onnxruntime":
                qmodel.model_name = model.model_name
            qmodel.compression = [*getattr(model, "compression", []), {**record, **extra}]
            paths[name] = save_bundle(Path(tmp) / name, qmodel, task, bundle.metrics, _recipe(bundle))
        chosen = next(iter(paths))
        if len(paths) > 1:  # each in its own processes, in rounds: see measure.compare_in_rounds
            speed = compare_in_rounds(list(paths.values()), rounds=2, reps=40)
            latency = {name: s["latency_ms_p50"] for name, s in zip(paths, speed, strict=True)}
            chosen = min(latency, key=latency.get)
            shown = ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items())
            log.info("int8 at batch 1: %s; keeping %s", shown, chosen)
            candidates[chosen][0].compression[-1]["latency_ms_batch1"] = latency
        save_bundle(out, candidates[chosen][0], task, bundle.metrics, _recipe(bundle))
    return out


def _recipe(bundle: Any) -> dict[str, Any] | None:
    path = bundle.path / "recipe.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_prune(bundle: Any, step: PruneStep, out: Path) -> Path:
    from tansuo.bundle import save_bundle
    from tansuo.device import resolve_device

    model, task = bundle.model, bundle.task
    teacher = copy.deepcopy(model) if step.finetune_steps and step.distill else None
    if step.unstructured is not None:
        record = prune_(model, UnstructuredPruneConfig(step.unstructured))
        record["measured_sparsity"] = sparsity(model)
    else:
        config = StructuredPruneConfig(heads=step.heads, ffn=step.ffn)
        if step.importance == "taylor":
            device = resolve_device("auto")
            model.to(device)
            batches = (
                {k: v.to(device) for k, v in b.items()}
                for _, b in zip(range(step.score_batches), task.train_batches(32, start=0), strict=False)
            )
            scores = taylor_scores(model, batches, task.loss)
        else:
            scores = magnitude_scores(model)
        record = prune_(model, config, scores=scores)
        record["importance"] = step.importance
    model.compression = [*getattr(model, "compression", []), record]
    if not step.finetune_steps:
        save_bundle(out, model.cpu(), task, bundle.metrics, _recipe(bundle))
        return out
    cfg = _train_config(bundle, out.with_name(out.name + "-train"), step.train, step.finetune_steps)
    handles = keep_zeros(model) if step.unstructured is not None else []
    if teacher is not None:  # the unpruned model teaches the pruned one what it lost
        task = DistillTask(task, teacher, model, alpha=step.alpha, temperature=step.temperature)
    try:
        best = _fit(task, model, cfg, _seed(bundle))
    finally:
        for h in handles:
            h.remove()
    _move_bundle(best, out)
    return out


def build_student(bundle: Any, step: DistillStep) -> nn.Module:
    """The student a distill step trains, checked against the teacher (family, vocabulary, classes)."""
    from tansuo.errors import TansuoError
    from tansuo.models import create_model
    from tansuo.models._registry import _lookup, _model_class

    teacher, task = bundle.model, bundle.task
    name = step.into or teacher.model_name
    family = getattr(teacher, "family", "?")
    try:
        student_family = _model_class(_lookup(name)).family
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


def run_distill(bundle: Any, step: DistillStep, out: Path) -> Path:
    teacher, task = bundle.model, bundle.task
    student = build_student(bundle, step)
    if step.init == "teacher" and getattr(student.config, "embed_dim", None) == getattr(
        teacher.config, "embed_dim", None
    ):
        init_from_teacher(student, teacher)
    distill_task = DistillTask(
        task, teacher, student, alpha=step.alpha, temperature=step.temperature, hidden=step.hidden
    )
    cfg = _train_config(bundle, out.with_name(out.name + "-train"), step.train, None)
    best = _fit(distill_task, student, cfg, _seed(bundle), extra=distill_task.extra)
    _move_bundle(best, out)
    return out


def _move_bundle(src: Path, dst: Path) -> None:
    def build(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)

    atomic_write_dir(dst, build)


STEP_RUNNERS: dict[str, Callable[[Any, Any, Path], Path]] = {
    "quantize": run_quantize,
    "prune": run_prune,
    "distill": run_distill,
}


def describe(step: Any) -> str:
    """A short name for a step: ``int8``, ``prune heads=0.25 ffn=0.5``, ``distill minilm_l6 num_layers=3``."""
    if step.step == "quantize":
        return step.mode
    if step.step == "prune":
        if step.unstructured is not None:
            return f"unstructured {step.unstructured:g}"
        return f"prune heads={step.heads:g} ffn={step.ffn:g}" + (
            f" +{step.finetune_steps} steps" if step.finetune_steps else ""
        )
    extra = " ".join(f"{k}={v}" for k, v in step.overrides.items())
    return f"distill {step.into or 'self'}" + (f" {extra}" if extra else "")


# ------------------------------------------------------------------------------------------ driver
def choose(variants: list[Variant], max_drop: float | None, objective: str) -> Variant | None:
    """The variant to keep: with ``max_drop`` None the last one; otherwise, among the compressed variants
    whose quality is at most ``max_drop`` points below the original's, the one with the lowest latency (or
    size), ties broken by the other figure. None when none qualifies."""
    original, compressed = variants[0], variants[1:]
    if max_drop is None:
        return compressed[-1] if compressed else None
    ref = original.figures["quality"]
    keyed = {"latency": ("latency_ms_p50", "size_bytes"), "size": ("size_bytes", "latency_ms_p50")}[objective]
    ok = [v for v in compressed if 100.0 * (ref - v.figures["quality"]) <= max_drop + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda v: tuple(v.figures[k] for k in keyed))


def check_quantize(model: nn.Module, step: QuantizeStep) -> None:
    """Raise when no backend the step allows can quantize this model on this machine."""
    from tansuo.export.onnx import IMAGE_FAMILIES, TEXT_FAMILIES, _require_onnx, input_names

    if step.backend == "torch":
        quantized_engine()
    elif step.backend == "onnxruntime":
        _require_onnx()
        input_names(getattr(model, "family", ""))  # raises for a family that does not export
    else:
        ort = _onnxruntime_available() and getattr(model, "family", "") in TEXT_FAMILIES + IMAGE_FAMILIES
        if not ort:
            quantized_engine()


def check_steps(bundle: Any, recipe: CompressRecipe) -> None:
    """Raise :class:`CompressionError` for a step that cannot run on this bundle (checked up front; a
    student's shape is checked against the teacher, a pruning step after distillation against the student)."""
    from tansuo.compress.prune import prunable

    model = bundle.model
    for step in recipe.steps:
        if step.step == "quantize":
            check_quantize(model, step)
        elif step.step == "distill":
            model = build_student(bundle, step)
        elif step.unstructured is None:
            prunable(model)


def run_steps(
    bundle_path: Path, steps: list[Any], variants_dir: Path, *, data_path: str | None = None
) -> Iterator[tuple[str, Path, list[str]]]:
    """Apply ``steps`` in order, each to the previous step's bundle, writing ``variants_dir/NN-step``.

    Yields (folder name, bundle path, descriptions of the steps applied so far) after each step.
    """
    from tansuo.bundle import load_bundle

    current = Path(bundle_path)
    done: list[str] = []
    for i, step in enumerate(steps, 1):
        name = f"{i:02d}-{step.step}"
        log.info("step %d/%d: %s", i, len(steps), describe(step))
        b = load_bundle(current, device="cpu", data_path=data_path)
        current = STEP_RUNNERS[step.step](b, step, variants_dir / name)
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
    from tansuo.bundle import load_bundle

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
    if len(variants) > 1:  # speed again, every variant in rounds of fresh processes: comparable ratios
        speed = compare_in_rounds(
            [v.path for v in variants],
            rounds=recipe.speed_rounds,
            threads=recipe.threads,
            seq_len=recipe.seq_len,
            large_batch=recipe.large_batch,
            reps=recipe.reps,
        )
        for v, figures in zip(variants, speed, strict=True):
            v.figures.update(figures)
    chosen = choose(variants, recipe.max_drop, recipe.objective)
    report = {
        "bundle": str(bundle_path),
        "recipe": recipe.model_dump(),
        "variants": [{"name": v.name, "path": str(v.path), "steps": v.steps, **v.figures} for v in variants],
        "chosen": None if chosen is None else chosen.name,
    }
    if chosen is not None:
        _move_bundle(chosen.path, out / "bundle")
        report["chosen_bundle"] = str(out / "bundle")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


COLUMNS = (
    ("quality", "quality", lambda v: f"{100 * v:.2f}"),
    ("latency_ms_p50", "p50 ms", lambda v: f"{v:.2f}"),
    ("latency_ms_p95", "p95 ms", lambda v: f"{v:.2f}"),
    ("throughput_per_s", "items/s", lambda v: f"{v:.1f}"),
    ("size_bytes", "size MB", lambda v: f"{v / 1e6:.1f}"),
    ("size_zipped_bytes", "zipped MB", lambda v: f"{v / 1e6:.1f}"),
    ("params", "params", lambda v: f"{v / 1e6:.2f}M"),
    ("peak_rss_mb", "peak MB", lambda v: f"{v:.0f}"),
)


def rows(report: dict[str, Any]) -> list[list[str]]:
    """Table rows (variant, steps, each column, speed-up and drop against the original)."""
    ref = report["variants"][0]
    out = []
    for v in report["variants"]:
        cells = [v["name"], " + ".join(v["steps"]) or "fp32 reference"]
        cells += [fmt(v[key]) if key in v else "-" for key, _, fmt in COLUMNS]
        cells.append(f"{ref['latency_ms_p50'] / v['latency_ms_p50']:.2f}x")
        cells.append(f"{100 * (ref['quality'] - v['quality']):+.2f}")
        out.append(cells)
    return out


HEADERS = ["variant", "steps", *(title for _, title, _ in COLUMNS), "speed-up", "drop (pts)"]


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the table, the threads and input used, and the choice."""
    ref = report["variants"][0]
    lines = [
        f"# Compression of {report['bundle']}",
        "",
        f"Quality: {ref.get('metric', 'quality')} on the {ref.get('split', 'held-back')} split (x100). "
        f"Latency: batch 1 ({ref.get('input_tokens') or 'one image'} tokens), median and p95 of "
        f"{report['recipe']['reps']} calls; throughput at batch {report['recipe']['large_batch']}; "
        f"{ref['threads']} threads.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    lines.append("")
    if any(s.get("unstructured") for s in report["recipe"]["steps"]):
        lines += [
            "Unstructured pruning zeroes weights: the zipped size shrinks, but dense CPU kernels do the same "
            "work on zeros, so neither latency nor the size on disk improves.",
            "",
        ]
    max_drop = report["recipe"]["max_drop"]
    if report["chosen"] is None:
        lines.append(f"No variant stays within {max_drop} points of the original; the original stays.")
    else:
        why = (
            "the last step"
            if max_drop is None
            else f"the {report['recipe']['objective']} winner within {max_drop} points"
        )
        lines.append(f"Chosen: {report['chosen']} ({why}), written to {report.get('chosen_bundle')}.")
    return "\n".join(lines) + "\n"
