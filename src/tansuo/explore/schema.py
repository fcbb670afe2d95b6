"""The ``explore:`` section of a recipe: what to search, how to judge it, and how long to look.

An explore recipe is an ordinary training recipe (task, data, model, train: the base every trial starts
from) plus an ``explore:`` section::

    explore:
      study: runs/explore-quickstart     # the study folder (default: runs/explore-<recipe name>)
      candidates:                        # presets, each with fixed overrides, searched fields, train fields
        - {model: vit_digits, space: {embed_dim: [32, 64], num_layers: {low: 1, high: 3}}, train: {epochs: 9}}
        - {model: resnet_digits}
      train: {lr: {low: 1.0e-3, high: 5.0e-3, log: true}, epochs: [10, 20]}   # searched train fields
      variants:                          # compression variants applied to every trained model
        - {name: plain}
        - {name: int8, steps: [{step: quantize, backend: torch}]}
        - {name: pruned, families: [vit], steps: [{step: prune, heads: 0.5, ffn: 0.5, finetune_steps: 100}]}
        - {name: distilled, families: [vit], steps: [{step: distill, overrides: {num_layers: 1}}]}
      objectives: [quality, latency]     # quality is maximised; latency, size, train_time, params, memory,
                                         # privacy (membership-inference AUC, tansuo audit)
      constraints: ["latency <= 5", "size <= 10", "quality >= 0.97"]
      sampler: auto                      # tpe (one objective), nsga2 (several), or grid
      budget: {trials: 20, minutes: 30}
      recommend: {max_drop: 1.0}         # quality the pick may give up for speed/size (points; loss units)

A searched field is a list of choices or a range ``{low, high, step, log}`` (integers when ``low`` and
``high`` are). Steps are ``tansuo compress`` steps (:mod:`tansuo.variants.steps`); a ``distill`` step without
``into`` trains a student of the candidate's own architecture with ``overrides`` changed.

Every problem is a :class:`~tansuo.errors.RecipeError` naming the field path (``explore.candidates.0.space``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from tansuo.errors import RecipeError
from tansuo.recipe import Strict, format_errors
from tansuo.variants.steps import CompressRecipe, Step


@dataclass(frozen=True)
class Metric:
    """A figure a variant is judged by: where it comes from in the measurements, its unit and direction."""

    key: str  # key in a variant's figures
    unit: str
    direction: Literal["maximize", "minimize"]
    scale: float = 1.0  # figures[key] * scale is the value in `unit`
    title: str = ""


#: The vocabulary of objectives and constraints. Quality is the task's default metric on the held-back split.
METRICS: dict[str, Metric] = {
    "quality": Metric("quality", "", "maximize", 1.0, "quality"),  # a loss quality: ExploreSpec.quality
    "latency": Metric("latency_ms_p50", "ms", "minimize", 1.0, "latency p50 at batch 1"),
    "latency_p95": Metric("latency_ms_p95", "ms", "minimize", 1.0, "latency p95 at batch 1"),
    "size": Metric("size_bytes", "MB", "minimize", 1e-6, "size on disk"),
    "params": Metric("params", "M", "minimize", 1e-6, "parameters"),
    "memory": Metric("peak_rss_mb", "MB", "minimize", 1.0, "peak memory"),
    "train_time": Metric("train_seconds", "s", "minimize", 1.0, "training + compression time"),
    # the membership-inference audit's highest AUC (0.5: nothing leaks); measured only when an objective or
    # a constraint names it (tansuo.audit)
    "privacy": Metric("privacy_auc", "AUC", "minimize", 1.0, "membership-inference AUC"),
}


class Range(Strict):
    """A numeric range: integers when ``low`` and ``high`` are integers (and ``step`` too, if given)."""

    low: float | int
    high: float | int
    step: float | int | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("give either log: true or a step, not both")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int)
        )

    def grid(self) -> list[float | int]:
        """Every value of the range, for a grid search; raises ValueError for a continuous range."""
        if self.is_int:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ValueError("a grid needs a list of choices or a range with a step")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


Param = list[Any] | Range | int | float | str | bool


class Candidate(Strict):
    model: str = Field(description="a registered preset (`tansuo models`)")
    label: str | None = Field(None, description="name in reports; default: the preset's name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed model config fields")
    space: dict[str, Param] = Field(default_factory=dict, description="searched model config fields")
    train: dict[str, Any] = Field(default_factory=dict, description="fixed train fields for this candidate")

    @property
    def name(self) -> str:
        return self.label or self.model


class Variant(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="folder-safe name")
    steps: list[Step] = Field(default_factory=list, description="compress steps; none: the trained model")
    families: list[str] | None = Field(None, description="model families it applies to; None: all")


class Budget(Strict):
    trials: int | None = Field(None, gt=0, description="trials in the whole study (all workers)")
    minutes: float | None = Field(None, gt=0, description="no new trial starts after this long")


class Recommend(Strict):
    max_drop: float = Field(1.0, ge=0, description="quality points below the best the pick may give up")


class Measure(Strict):
    threads: int = Field(1, gt=0, description="torch threads while timing (recorded in the results)")
    reps: int = Field(50, gt=0, description="timed batch-1 calls per variant")
    large_batch: int = Field(32, gt=0, description="batch of the throughput measurement")
    seq_len: int = Field(128, gt=0, description="tokens per input when timing text models")
    rounds: int = Field(
        1, gt=0, description="> 1: time a trial's variants again in rounds of fresh processes"
    )


class Audit(Strict):
    """How ``privacy`` is measured (``tansuo audit``), when an objective or constraint names it."""

    examples: int = Field(1000, gt=0, description="training members audited, and as many held-out examples")
    reference_models: int = Field(
        0, ge=0, description="reference models for the calibrated attack (2+, one training run each); 0: loss"
    )


class Explore(Strict):
    study: str | None = Field(None, description="study folder; default runs/explore-<recipe name>")
    candidates: list[Candidate] = Field(min_length=1)
    train: dict[str, Param] = Field(default_factory=dict, description="train fields: fixed or searched")
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="plain")], min_length=1)
    objectives: list[str] = Field(default_factory=lambda: ["quality"], min_length=1)
    constraints: list[str] = Field(default_factory=list)
    sampler: Literal["auto", "tpe", "nsga2", "grid"] = "auto"
    budget: Budget = Field(default_factory=Budget)
    recommend: Recommend = Field(default_factory=Recommend)
    measure: Measure = Field(default_factory=Measure)
    audit: Audit = Field(default_factory=Audit)
    seed: int | None = Field(None, description="sampler seed; default: the recipe's seed")
    nproc_per_node: int = Field(
        1,
        gt=0,
        description="processes that train each trial (torchrun; train.parallel says DDP or FSDP); "
        "1: in the explorer's own process",
    )


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound`` in the metric's unit (latency in ms, size in MB)."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    def violation(self, value: float) -> float:
        """How far ``value`` is outside the bound (0 when satisfied), in the metric's unit."""
        return max(0.0, value - self.bound) if self.op == "<=" else max(0.0, self.bound - value)

    def __str__(self) -> str:
        unit = METRICS[self.metric].unit
        return f"{self.metric} {self.op} {self.bound:g}{(' ' + unit) if unit else ''}"


_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def parse_constraint(text: str, where: str) -> Constraint:
    """``"latency <= 5"`` to a :class:`Constraint`; a bad one is a RecipeError naming ``where``."""
    m = _CONSTRAINT.match(text)
    if not m:
        raise RecipeError(
            f"invalid recipe:\n  {where}: {text!r} is not METRIC <= NUMBER or METRIC >= NUMBER "
            f"(for example 'latency <= 5'; metrics: {', '.join(METRICS)})"
        )
    name, op, number = m.groups()
    if name not in METRICS:
        raise RecipeError(f"invalid recipe:\n  {where}: unknown metric {name!r}; use one of {list(METRICS)}")
    try:
        bound = float(number)
    except ValueError:
        raise RecipeError(f"invalid recipe:\n  {where}: {number!r} is not a number") from None
    return Constraint(name, op, bound)  # type: ignore[arg-type]


@dataclass
class ExploreSpec:
    """A validated explore recipe: the base recipe every trial starts from, plus the search."""

    base: dict[str, Any]  # the raw training recipe without `explore` (validated once, for every candidate)
    explore: Explore
    constraints: list[Constraint]
    study_dir: Path
    families: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate name -> model family
    quality: str = "maximize"  # the direction of the task's quality metric (accuracy up, a loss down)

    def direction(self, metric: str) -> str:
        """Whether ``metric`` is maximised or minimised in this study."""
        return self.quality if metric == "quality" else METRICS[metric].direction

    @property
    def directions(self) -> list[str]:
        return [self.direction(o) for o in self.explore.objectives]

    @property
    def sampler(self) -> str:
        if self.explore.sampler != "auto":
            return self.explore.sampler
        return "tpe" if len(self.explore.objectives) == 1 else "nsga2"

    @property
    def candidates(self) -> dict[str, Candidate]:
        return {c.name: c for c in self.explore.candidates}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the search space as trial parameters (for ``sampler: grid``)."""
        points = []
        train = _grid_axes(self.explore.train, "train")
        for c in self.explore.candidates:
            axes = {"candidate": [c.name], **_grid_axes(c.space, c.name), **train}
            for values in itertools.product(*axes.values()):
                points.append(dict(zip(axes, values, strict=True)))
        return points


def _grid_axes(space: dict[str, Param], prefix: str) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {}
    for field, spec in space.items():
        if isinstance(spec, list):
            axes[f"{prefix}.{field}"] = spec
        elif isinstance(spec, Range):
            axes[f"{prefix}.{field}"] = spec.grid()
    return axes


def _error(err: ValidationError, prefix: str) -> RecipeError:
    return RecipeError(format_errors(err, prefix))


def _model_fields(model: str, where: str) -> tuple[str, set[str]]:
    from tansuo.models import get_model_entry

    try:
        entry = get_model_entry(model)
    except ValueError as e:
        raise RecipeError(f"invalid recipe:\n  {where}: {e}") from None
    return entry.family, set(entry.fields)


def _check_space(space: dict[str, Param], allowed: set[str], where: str, what: str) -> None:
    for field, spec in space.items():
        if field not in allowed:
            raise RecipeError(
                f"invalid recipe:\n  {where}.{field}: not a field of {what}; choose from {sorted(allowed)}"
            )
        if isinstance(spec, list):
            if not spec:
                raise RecipeError(f"invalid recipe:\n  {where}.{field}: an empty list of choices")
            bad = [v for v in spec if not isinstance(v, int | float | str | bool) and v is not None]
            if bad:
                raise RecipeError(
                    f"invalid recipe:\n  {where}.{field}: choices must be numbers, strings or booleans "
                    f"(got {bad[0]!r})"
                )
            if len(set(map(repr, spec))) != len(spec):
                raise RecipeError(f"invalid recipe:\n  {where}.{field}: repeated choices {spec}")


def load_explore(raw: dict[str, Any], recipe_path: str | Path) -> ExploreSpec:
    """Validate an explore recipe (a raw mapping read from ``recipe_path``)."""
    from tansuo.recipe import TrainConfig, validate_recipe

    if not isinstance(raw.get("explore"), dict):
        raise RecipeError(
            f"invalid recipe:\n  explore: {recipe_path} has no explore: section; see recipes/quickstart.yaml"
        )
    base = {k: v for k, v in raw.items() if k != "explore"}
    try:
        explore = Explore.model_validate(raw["explore"])
    except ValidationError as e:
        raise _error(e, "explore") from None
    for i, c in enumerate(explore.candidates):  # unknown models named where they are written
        _model_fields(c.model, f"explore.candidates.{i}.model")
    if "model" not in base:  # the model section is the first candidate's unless given
        base["model"] = {"name": explore.candidates[0].model}
    validate_recipe(base)  # the base must be a valid training recipe on its own

    names = [c.name for c in explore.candidates]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise RecipeError(
                f"invalid recipe:\n  explore.candidates.{i}.label: {name!r} names two candidates; give "
                "each a distinct label"
            )
    train_fields = set(TrainConfig.model_fields) - {"out_dir", "device"}
    families = {}
    for i, c in enumerate(explore.candidates):
        where = f"explore.candidates.{i}"
        family, fields = _model_fields(c.model, f"{where}.model")
        families[c.name] = family
        _check_space(c.space, fields, f"{where}.space", c.model)
        unknown = sorted(set(c.overrides) - fields)
        if unknown:
            raise RecipeError(
                f"invalid recipe:\n  {where}.overrides.{unknown[0]}: not a field of {c.model}; "
                f"choose from {sorted(fields)}"
            )
        unknown = sorted(set(c.train) - train_fields)
        if unknown:
            raise RecipeError(
                f"invalid recipe:\n  {where}.train.{unknown[0]}: not a train field; choose from "
                f"{sorted(train_fields)}"
            )
        both = sorted(set(c.overrides) & set(c.space))
        if both:
            raise RecipeError(
                f"invalid recipe:\n  {where}.space.{both[0]}: both fixed (overrides) and searched"
            )
    _check_space(explore.train, train_fields, "explore.train", "the train section (out_dir is the study's)")

    for i, v in enumerate(explore.variants):
        try:
            if v.steps:
                CompressRecipe.model_validate({"steps": [s.model_dump() for s in v.steps]})
        except ValidationError as e:
            raise _error(e, f"explore.variants.{i}") from None
        for j in range(i):
            w = explore.variants[j]
            if w.name == v.name and (
                v.families is None or w.families is None or set(v.families) & set(w.families)
            ):
                raise RecipeError(
                    f"invalid recipe:\n  explore.variants.{i}.name: {v.name!r} is used twice; two variants "
                    "may share a name only when their families lists do not overlap"
                )
        known = set(families.values())
        for fam in v.families or []:
            if fam not in known:
                raise RecipeError(
                    f"invalid recipe:\n  explore.variants.{i}.families: no candidate is a {fam!r} model "
                    f"(the candidates' families: {sorted(known)})"
                )

    for i, name in enumerate(explore.objectives):
        if name not in METRICS:
            raise RecipeError(
                f"invalid recipe:\n  explore.objectives.{i}: unknown objective {name!r}; use {list(METRICS)}"
            )
        if explore.objectives.index(name) != i:
            raise RecipeError(f"invalid recipe:\n  explore.objectives.{i}: {name!r} is listed twice")
    constraints = [parse_constraint(c, f"explore.constraints.{i}") for i, c in enumerate(explore.constraints)]

    spec = ExploreSpec(
        base, explore, constraints, Path(explore.study or f"runs/explore-{Path(recipe_path).stem}")
    )
    spec.families = families
    spec.quality = quality_direction(str(base["task"]))
    _check_privacy(spec)
    if spec.sampler == "grid":
        for i, c in enumerate(explore.candidates):
            for field, p in c.space.items():
                if isinstance(p, Range) and not p.is_int and p.step is None:
                    raise RecipeError(
                        f"invalid recipe:\n  explore.candidates.{i}.space.{field}: a grid needs a list of "
                        "choices or a range with a step"
                    )
        for field, p in explore.train.items():
            if isinstance(p, Range) and not p.is_int and p.step is None:
                raise RecipeError(
                    f"invalid recipe:\n  explore.train.{field}: a grid needs a list of choices or a range "
                    "with a step"
                )
    elif explore.budget.trials is None and explore.budget.minutes is None:
        raise RecipeError(
            "invalid recipe:\n  explore.budget: give trials and/or minutes (a grid may omit both: it runs "
            "every combination)"
        )
    return spec


def _check_privacy(spec: ExploreSpec) -> None:
    """``privacy`` needs a task whose members can be audited one by one (the EXAMPLES ability)."""
    from tansuo.tasks import EXAMPLES, get_task

    named = "privacy" in spec.explore.objectives or any(c.metric == "privacy" for c in spec.constraints)
    task = get_task(spec.base["task"])
    if named and EXAMPLES not in task.abilities:
        raise RecipeError(
            f"invalid recipe:\n  explore.objectives: privacy (the membership-inference audit) needs single "
            f"training examples, which the {task.name!r} task does not address; it works for image and "
            "classify studies"
        )


def quality_direction(task: str) -> str:
    """The direction of a task's quality metric, as the trainer judges it: losses and perplexity go down."""
    from tansuo.tasks import get_task
    from tansuo.train.trainer import metric_mode

    return "maximize" if metric_mode(get_task(task).default_metric) == "max" else "minimize"


def load_explore_recipe(
    path: str | Path, sets: list[str] | None = None, data_dir: str | Path | None = None
) -> ExploreSpec:
    """Read, override (``--set``, also ``explore.*`` fields), resolve ``--data-dir`` and validate."""
    from tansuo.recipe import read_recipe

    return load_explore(read_recipe(path, sets, data_dir), path)
