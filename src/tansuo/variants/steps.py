"""The ``tansuo compress`` recipe: a list of steps applied in order, each to the previous step's result::

    steps:
      - {step: distill, into: minilm_l6, overrides: {num_layers: 3}, alpha: 0.5, temperature: 2.0}
      - {step: prune, heads: 0.25, ffn: 0.5, importance: taylor, finetune_steps: 500}
      - {step: quantize, mode: int8}
    max_drop: 1.0          # quality points; omit to keep the last variant whatever it costs
    objective: latency     # what "most compressed" means: latency (batch 1, p50) or size

Each step is a pydantic model told apart by its ``step`` literal and registered in :data:`STEP_TYPES`
(``register_step_type``; :func:`tansuo.variants.pipeline.register_runner` does it for its step class), so a
step defined in a plugin is valid in recipes too; :mod:`tansuo.variants.pipeline` runs it. Explore recipes
(:mod:`tansuo.explore.schema`) take the same steps as their compression variants.
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import core_schema

from tansuo.errors import RecipeError
from tansuo.plugins import load_plugins
from tansuo.recipe import Strict, format_errors

__all__ = [
    "CompressRecipe",
    "DistillStep",
    "PruneStep",
    "QuantizeStep",
    "STEP_TYPES",
    "Step",
    "describe",
    "load_compress_recipe",
    "parse_prune",
    "register_step_type",
]

STEP_TYPES: dict[str, type[BaseModel]] = {}
S = TypeVar("S", bound=type[BaseModel])


def register_step_type(cls: S) -> S:
    """Registers a step class (a pydantic model with a ``step: Literal["name"]`` field) under its name."""
    field = cls.model_fields.get("step")
    names = typing.get_args(field.annotation) if field is not None else ()
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{cls.__name__} needs a field `step: Literal['name']` to be a compression step")
    STEP_TYPES[names[0]] = cls
    _adapter.cache_clear()
    return cls


@functools.cache
def _adapter() -> TypeAdapter:
    types = tuple(STEP_TYPES.values())
    union = Union[types] if len(types) > 1 else types[0]  # noqa: UP007 (built from a runtime tuple)
    return TypeAdapter(Annotated[union, Field(discriminator="step")])


def _validate_step(value: Any, info: Any) -> BaseModel:
    if isinstance(value, tuple(STEP_TYPES.values())):
        return value
    if isinstance(value, dict) and value.get("step") not in STEP_TYPES:
        load_plugins()  # a step from a plugin that is not imported yet
    return _adapter().validate_python(value)


class _AnyStep:
    """One step of any registered type, resolved when validated (so steps registered later count)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _validate_step, serialization=core_schema.plain_serializer_function_ser_schema(_dump)
        )


def _dump(step: BaseModel) -> dict[str, Any]:
    return step.model_dump()


@register_step_type
class QuantizeStep(Strict):
    step: Literal["quantize"]
    #: int8: dynamic int8 (weights and activations, fbgemm or ONNX Runtime); int8-weight / int4-weight:
    #: weight-only for decoders (:mod:`tansuo.compress.weight_only`; see ``activations``)
    mode: Literal["int8", "int8-weight", "int4-weight"] = "int8"
    #: inputs per int4 group (int4-weight only; default 32)
    group_size: Literal[32, 64, 128] | None = None
    #: weight-only: quantize the output head too (a tied head as an int copy, the embedding stays fp32)
    head: bool = True
    #: weight-only: the layers' inputs kept fp32 (exact) or quantized to int8 per block of 32 on the fly
    #: (llama.cpp's way: integer dot products when decoding)
    activations: Literal["int8", "fp32"] = "fp32"
    #: Linear layers left in fp32, by name prefix (the classification head is small and sensitive)
    skip: list[str] = Field(default_factory=list)
    #: 7-bit activations (fbgemm's safe default without VNNI) or 8-bit; auto: whichever gives the model's
    #: logits on calibration batches the higher signal-to-noise ratio against fp32
    reduce_range: Literal["auto", True, False] = "auto"
    #: SmoothQuant's migration of activation outliers into the weights (its alpha, in (0, 1)), torch
    #: backend; auto: with 0.5 and without, whichever gives the higher SNR (as reduce_range)
    smooth: Literal["auto", "off"] | float = "auto"
    #: torch: fbgemm int8 Linear layers in the PyTorch model; onnxruntime: the model exported to ONNX and
    #: quantized by ONNX Runtime (families that declare onnx_inputs: bert, vit, resnet); auto: the faster here
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    #: activation ranges per sample (predictions independent of the batch) or per batch (quantize_dynamic)
    per_sample: bool = True
    calibration_batches: int = Field(4, gt=0, description="training batches for reduce_range=auto")
    #: accuracy-aware int8: the most quality the int8 model may lose on the validation split (points x100;
    #: a loss's own units); when the whole model loses more, its most sensitive Linear layers stay in fp32,
    #: one at a time, until it is within (torch backend; an ONNX Runtime variant outside it is dropped)
    max_drop: float | None = Field(None, ge=0)
    max_fp32_layers: int = Field(8, gt=0, description="most layers the accuracy-aware search keeps in fp32")

    @model_validator(mode="after")
    def _smooth_range(self) -> QuantizeStep:
        if isinstance(self.smooth, float) and not 0.0 < self.smooth < 1.0:
            raise ValueError(f"smooth must be auto, off or an alpha in (0, 1), got {self.smooth}")
        if self.group_size is not None and self.mode != "int4-weight":
            raise ValueError(f"group_size is for int4-weight only; {self.mode} takes none")
        if self.weight_only and self.backend == "onnxruntime":
            raise ValueError(f"{self.mode} runs on the torch backend only")
        return self

    @property
    def weight_only(self) -> bool:
        """int8-weight or int4-weight (:mod:`tansuo.compress.weight_only`)."""
        return self.mode.endswith("-weight")

    def describe(self) -> str:
        name = f"int4-weight g{self.group_size or 32}" if self.mode == "int4-weight" else self.mode
        return f"{name} int8-act" if self.weight_only and self.activations == "int8" else name


@register_step_type
class PruneStep(Strict):
    step: Literal["prune"]
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of all attention heads to remove")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of all feed-forward neurons to remove")
    unstructured: float | None = Field(None, gt=0, lt=1, description="global magnitude sparsity instead")
    importance: Literal["magnitude", "taylor"] = "taylor"
    score_batches: int = Field(16, gt=0, description="training batches for taylor importance")
    finetune_steps: int = Field(0, ge=0, description="optimizer steps of fine-tuning after pruning")
    finetune_epochs: float | None = Field(None, gt=0, description="the fine-tuning budget in epochs instead")
    #: gradual: ``stages`` cuts on Zhu & Gupta's cubic schedule over the first half of the fine-tuning
    #: budget (importance measured again before each), the second half to recover; one-shot: one cut first
    schedule: Literal["gradual", "one-shot"] = "gradual"
    stages: int = Field(4, gt=0, description="pruning events of the gradual schedule")
    distill: bool = Field(True, description="fine-tune with the unpruned model as the teacher")
    #: the unpruned model teaches on logits (and hidden states) alone by default: measured on MiniLM SST-2,
    #: 0.69 points lost against 1.26 with half the weight on the training labels (bench/compress.py)
    alpha: float = Field(0.0, ge=0, le=1, description="hard-label weight when fine-tuning with a teacher")
    temperature: float = Field(2.0, gt=0)
    hidden: float = Field(1.0, ge=0, description="weight of matching the teacher's hidden states (0: off)")
    hidden_layers: Literal["last", "all"] = Field("all", description="match every layer's output or the last")
    #: the most quality the pruned model may lose on the validation split (points; a loss's own units):
    #: the ratios given are the largest tried, scaled down by bisection until the fine-tuned model is within
    max_drop: float | None = Field(None, ge=0)
    search_candidates: int = Field(3, gt=0, description="pruned and fine-tuned candidates the search tries")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the bundle's train section")

    @model_validator(mode="after")
    def _something(self) -> PruneStep:
        if self.unstructured is None and self.heads == 0 and self.ffn == 0:
            raise ValueError("give heads and/or ffn (structured) or unstructured (a sparsity)")
        if self.unstructured is not None and (self.heads or self.ffn):
            raise ValueError("structured (heads, ffn) and unstructured pruning are separate steps")
        if self.finetune_epochs is not None and self.finetune_steps:
            raise ValueError("give the fine-tuning budget as finetune_steps or finetune_epochs, not both")
        return self

    @property
    def finetunes(self) -> bool:
        return bool(self.finetune_steps or self.finetune_epochs)

    def scaled(self, scale: float) -> PruneStep:
        """This step with every ratio multiplied by ``scale`` (a candidate of the ratio search)."""
        if self.unstructured is not None:
            ratios = {"unstructured": self.unstructured * scale}
        else:
            ratios = {"heads": self.heads * scale, "ffn": self.ffn * scale}
        return self.model_copy(update={**ratios, "max_drop": None})

    def describe(self) -> str:
        if self.finetune_epochs:
            budget = f" +{self.finetune_epochs:g} epochs"
        else:
            budget = f" +{self.finetune_steps} steps" if self.finetune_steps else ""
        search = f" within {self.max_drop:g}" if self.max_drop is not None else ""
        if self.unstructured is not None:
            return f"unstructured {self.unstructured:g}{budget}{search}"
        return f"prune heads={self.heads:g} ffn={self.ffn:g}{budget}{search}"


@register_step_type
class DistillStep(Strict):
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

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"distill {self.into or 'self'}" + (f" {extra}" if extra else "")


#: a step of any registered type (``{step: quantize, ...}``, ``{step: prune, ...}``, a plugin's)
Step = _AnyStep


class CompressRecipe(Strict):
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
        raise RecipeError(format_errors(e, title="invalid compression recipe")) from e


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


def describe(step: Any) -> str:
    """A short name for a step: ``int8``, ``prune heads=0.25 ffn=0.5``, ``distill minilm_l6 num_layers=3``
    (the step's own ``describe()``; a step type without one is named by its ``step``)."""
    own = getattr(step, "describe", None)
    return own() if callable(own) else str(step.step)


def recipe_from_options(
    *,
    recipe: Path | None = None,
    quantize: str | None = None,
    quantize_backend: str = "auto",
    group_size: int | None = None,
    quantize_head: bool = True,
    activations: str = "fp32",
    prune: str | None = None,
    importance: str = "taylor",
    finetune_steps: int = 0,
    finetune_epochs: float | None = None,
    schedule: str = "gradual",
    distill_into: str | None = None,
    student: dict[str, Any] | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    hidden: float | None = None,
    train: dict[str, Any] | None = None,
    max_drop: float | None = None,
    objective: str = "latency",
    threads: int | None = None,
) -> CompressRecipe:
    """The compression recipe ``tansuo compress`` runs: a recipe file (``train`` overrides and ``max_drop``
    applied to it), or the steps the flags name, in the order distill, prune, quantize.

    Raises:
        RecipeError: Both a recipe and step flags, no step at all, or an invalid step.
    """
    train = dict(train or {})
    if recipe is not None:
        if any(v is not None for v in (quantize, prune, distill_into)):
            raise RecipeError("give either --recipe or the step flags (--quantize, --prune, --distill-into)")
        spec = load_compress_recipe(recipe)
        steps = [
            s.model_copy(update={"train": {**s.train, **train}}) if "train" in type(s).model_fields else s
            for s in spec.steps
        ]
        update: dict[str, Any] = {"steps": steps}
        if max_drop is not None:
            update["max_drop"] = max_drop
        return spec.model_copy(update=update)
    raw_steps: list[dict[str, Any]] = []
    if distill_into is not None:
        raw_steps.append(
            {
                "step": "distill",
                "into": distill_into,
                "overrides": dict(student or {}),
                "alpha": alpha,
                "temperature": temperature,
                "hidden": hidden or 0.0,
                "train": train,
            }
        )
    if prune is not None:
        raw_steps.append(
            {
                "step": "prune",
                **parse_prune(prune),
                "importance": importance,
                "finetune_steps": finetune_steps,
                "finetune_epochs": finetune_epochs,
                "schedule": schedule,
                **({} if hidden is None else {"hidden": hidden}),
                # with --max-drop the largest ratio within it, judged on the validation split (the
                # choice between the variants then uses the held-out split)
                "max_drop": max_drop,
                "train": train,
            }
        )
    if group_size is not None and quantize != "int4-weight":
        raise RecipeError("--group-size goes with --quantize int4-weight")
    if activations != "fp32" and not (quantize or "").endswith("-weight"):
        raise RecipeError("--activations goes with --quantize int8-weight or int4-weight")
    if quantize is not None:
        # with --max-drop the int8 step is accuracy-aware (on the validation split; the choice between the
        # variants then uses the held-out split)
        q: dict[str, Any] = {"step": "quantize", "mode": quantize, "backend": quantize_backend}
        if quantize.endswith("-weight"):
            q.update(head=quantize_head, activations=activations)
            if group_size is not None:
                q["group_size"] = group_size
        else:
            q["max_drop"] = max_drop
        raw_steps.append(q)
    if not raw_steps:
        raise RecipeError(
            "nothing to do: give --quantize int8|int8-weight|int4-weight, --prune ..., --distill-into PRESET "
            "or --recipe"
        )
    raw: dict[str, Any] = {"steps": raw_steps, "max_drop": max_drop, "objective": objective}
    if threads:
        raw["threads"] = threads
    return load_compress_recipe(None, raw)
