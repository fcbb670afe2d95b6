"""Recipes: one YAML file describes a whole run (task, data, model, training), validated before any work.

A recipe has four sections. ``task`` picks the Task; ``data`` is validated by that task's own ``DataConfig``;
``model`` names a registered preset plus overrides; ``train`` is :class:`TrainConfig`. Any field can be
overridden from the command line with ``--set section.field=value`` (the value is parsed as YAML).

Every validation problem becomes a :class:`~tansuo.errors.RecipeError` that names the field path, the bad
value and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from tansuo.errors import RecipeError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; recipes mean a number, so floats without a dot are floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class Strict(BaseModel):
    """Base of every schema a user writes (recipes, explore sections, compression steps): unknown fields are
    errors, and so are assignments of invalid values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Which registered model to build, and the fields to change from its preset."""

    name: str = Field(description="a name from `tansuo models`")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config fields to change")
    init_from: str | None = Field(
        None,
        description="bundle folder, Hugging Face BERT folder, or .pth checkpoint (efficientnet-lite0: the "
        "packaged ImageNet weights, effnet_det) whose weights start the run",
    )


class LoRASettings(Strict):
    """``train.lora``: freeze the model and train low-rank adapters on the named Linear layers (LoRA, Hu et
    al. 2021); the bundle keeps them, and ``adapter/`` in it holds them alone in PEFT's layout."""

    r: int = Field(8, gt=0, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] | str = Field(
        "all-linear",
        description="suffixes of Linear layer names, one or a list (q_proj, kv_proj, attn.out_proj ...) "
        "or all-linear: every Linear layer but the output head",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapters (a fresh head: [head])"
    )


class PrivacySettings(Strict):
    """``train.privacy``: train with DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"):
    each step samples every training example independently (Poisson), clips each example's gradient to
    ``max_grad_norm`` and adds Gaussian noise whose scale is calibrated, before training, so that the whole
    run spends ``target_epsilon`` at ``delta`` (Opacus' accountants and optimizer; ``train/privacy.py``)."""

    target_epsilon: float = Field(gt=0, description="the privacy budget the whole run may spend")
    delta: float = Field(1e-5, gt=0, lt=1, description="probability the guarantee fails; below 1/examples")
    max_grad_norm: float = Field(1.0, gt=0, description="each example's gradient is clipped to this L2 norm")
    accountant: Literal["prv", "rdp"] = Field(
        "prv",
        description="prv: privacy random variables (Gopi et al. 2021, tight); rdp: Renyi DP (Mironov 2017, "
        "a looser upper bound, faster)",
    )
    clipping: Literal["flat", "per_layer"] = Field(
        "flat",
        description="flat: each example's whole gradient to max_grad_norm; per_layer: each trained tensor's "
        "part to max_grad_norm / sqrt(tensors) (Opacus' per-layer clipping)",
    )
    group_norms: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="clip groups of parameters apart, {name prefix: norm}: each example's gradient of a "
        "group to the group's norm, the rest to max_grad_norm, and each group's noise in proportion to its "
        "norm (noise_multiplier * sqrt(groups) * norm); e.g. {head: 3.0} so that a fresh head, whose "
        "gradients dwarf a pretrained body's, does not take the whole clipping budget",
    )

    grad_sample_mode: Literal["auto", "ghost"] = Field(
        "auto",
        description="auto: every example's gradient, from Opacus' hooks where they apply, else "
        "torch.func.vmap; ghost: ghost clipping (Li et al. 2021, Opacus' fast gradient clipping): each "
        "example's gradient norm from the layers' inputs and output gradients, then one backward of the "
        "losses weighted by their clipping factors: the same clipped sums without per-example gradients in "
        "memory (train/dp_ghost.py)",
    )

    @model_validator(mode="after")
    def _groups(self) -> PrivacySettings:
        if self.group_norms and self.clipping != "flat":
            raise ValueError(
                "train.privacy.group_norms clips groups apart; it does not combine with clipping: per_layer"
            )
        if self.grad_sample_mode == "ghost" and self.clipping != "flat":
            raise ValueError(
                "train.privacy.grad_sample_mode ghost clips with one backward per group; use clipping: flat "
                "(with group_norms if the groups need norms of their own)"
            )
        return self


class TrainConfig(Strict):
    """How to train: optimisation, schedule, evaluation and where the run is written."""

    out_dir: str = Field("runs/run", description="run folder: checkpoint, metrics log and bundle")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; or give epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the training split (fixed-size data)")
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(
        0.0, ge=0, description="learning rate at the end of the cosine decay; the floor of inverse_sqrt"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up to lr over these steps")
    schedule: Literal["cosine", "constant", "inverse_sqrt"] = Field(
        "cosine",
        description="after the warm-up: cosine to min_lr at the last step, constant lr, or inverse_sqrt "
        "(fairseq's: lr * sqrt(warmup_steps / step), floored at min_lr)",
    )
    weight_decay: float = Field(0.1, ge=0, description="applied to matrices only, not biases or norms")
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise lr decay: layer i of L learns at lr * layer_decay^(L+1-i)"
    )
    lr_scales: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="{name prefix: factor}: the parameters under a prefix learn at lr * factor (e.g. "
        "{head: 20} for a fresh head on a pretrained body under DP-SGD)",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="adamw (betas beta1, beta2; decoupled weight decay) or sgd (momentum; weight decay as "
        "an L2 term): DP-SGD on small networks from scratch is usually run with SGD and momentum",
    )
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's momentum")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 turns clipping off")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = once per epoch or at end")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at each evaluation")
    best_metric: str | None = Field(None, description="metric that picks the best bundle; task default")
    best_mode: Literal["min", "max"] | None = None
    early_stop_patience: int = Field(0, ge=0, description="evaluations without improvement; 0 = never")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0 keeps torch's default. Small models train faster on 1"
    )
    compile: bool = Field(
        False,
        description="torch.compile the model for training steps; the first step's time (the compilation) "
        "is logged apart from throughput as a 'compile' event in metrics.jsonl",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA, fp32 elsewhere; fp32; bf16 or fp16 autocast (fp16 with a "
        "gradient scaler). A precision the device cannot autocast to is an error",
    )
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = Field(
        "auto",
        description="the optimizer's implementation: fused kernel, foreach (multi-tensor) or a per-parameter "
        "for-loop; auto: fused on CPU and CUDA, else torch's default",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each transformer layer's activations in the backward pass instead of "
        "storing them: less memory, about one more forward pass of time",
    )
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights (e.g. 0.999; warmed up as "
        "min(decay, (1 + n) / (10 + n)) after n steps), used for evaluation and the bundle; None: off",
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="on several processes (torchrun, --nproc-per-node): ddp replicates the model, fsdp "
        "shards parameters, gradients and optimizer state; auto is ddp",
    )
    dist_timeout: float = Field(
        1800, gt=0, description="seconds a process waits for the others (rank 0 evaluating) before failing"
    )
    lora: LoRASettings | None = Field(None, description="train LoRA adapters on a frozen model; None: off")
    trainable: list[str] | None = Field(
        None,
        description="train only the parameters whose names match one of these shell patterns, the rest "
        'frozen (["*.bias", "head.*"]: BitFit, the biases and the head); None: all',
    )
    privacy: PrivacySettings | None = Field(
        None, description="differentially private training (DP-SGD) to a target epsilon; None: off"
    )

    @model_validator(mode="after")
    def _lr_bounds(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    @model_validator(mode="after")
    def _private_combinations(self) -> TrainConfig:
        if self.privacy is None:
            return self
        # each refused switch would change what an example contributes to a step, or hide the per-example
        # gradients DP-SGD clips
        refused = {
            "grad_accum": (
                self.grad_accum != 1,
                "a step is one Poisson-sampled batch; set train.grad_accum=1",
            ),
            "precision": (
                self.precision == "fp16",
                "fp16's loss scaling skips steps the accountant has counted; use bf16 or fp32",
            ),
            "compile": (
                self.compile,
                "per-example gradients run under torch.func.vmap; set train.compile=false",
            ),
            "activation_checkpointing": (
                self.activation_checkpointing,
                "per-example gradients run under torch.func.vmap; set train.activation_checkpointing=false",
            ),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"train.privacy does not combine with train.{name}: {why}")
        return self


class Recipe(Strict):
    """A whole run. ``data`` stays a plain mapping here; the task validates it (see `validate_recipe`)."""

    task: str
    seed: int = 1337
    data: dict[str, Any] = Field(default_factory=dict)
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


def format_errors(err: ValidationError, prefix: str = "", title: str = "invalid recipe") -> str:
    """A pydantic error as the lines a user reads: ``  section.field: what is wrong (got value)``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the recipe docs for allowed fields)"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        lines.append(f"  {path or '<recipe>'}: {msg}{shown}")
    return f"{title}:\n" + "\n".join(lines)


def apply_overrides(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` assignments to a raw recipe mapping; values are parsed as YAML."""
    out = copy.deepcopy(raw)
    for item in sets:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected FIELD=VALUE, for example --set train.lr=3e-4")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item!r}: empty field name; write it as section.field=value")
        try:
            value = _yaml(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML ({e})") from e
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {p} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p}; pass a YAML file such as recipes/digits-vit.yaml")
    try:
        raw = _yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping with task, data, model and train sections")
    return raw


def validate_recipe(raw: dict[str, Any]) -> tuple[Recipe, BaseModel]:
    """Validate a raw recipe; returns the recipe and the task's validated data config."""
    from tansuo.models import check_overrides
    from tansuo.tasks import get_task

    task_class = get_task(raw.get("task"))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_errors(e)) from None
    check_overrides(recipe.model.name, recipe.model.overrides)  # before any data is prepared
    try:
        data = task_class.DataConfig.model_validate(recipe.data)
    except ValidationError as e:
        raise RecipeError(format_errors(e, prefix="data")) from None
    if recipe.train.max_steps is None and recipe.train.epochs is None:
        raise RecipeError("invalid recipe:\n  train: give train.max_steps or train.epochs")
    return recipe, data


def apply_data_dir(raw: dict[str, Any], data_dir: str | Path) -> dict[str, Any]:
    """Resolve the relative data file names of a raw recipe against ``data_dir`` (``--data-dir``).

    Which ``data:`` fields name files is the task's to say (its DataConfig's ``path_fields``); absolute paths
    are kept.
    """
    from tansuo.tasks import get_task

    task_class = get_task(raw.get("task"))
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"--data-dir {data_dir}: not a folder; pass the folder that holds the data files")
    out = copy.deepcopy(raw)
    data = out.get("data") or {}
    if not isinstance(data, dict):
        raise RecipeError("invalid recipe:\n  data: must be a mapping")
    fields: tuple[str, ...] = getattr(task_class.DataConfig, "path_fields", ())
    named = [k for k in fields if isinstance(data.get(k), str)]
    if not named:
        raise RecipeError(
            f"--data-dir {data_dir}: the recipe names no data file to look for there (data."
            f"{' / data.'.join(fields) or 'path'}); add one with --set, or pass the file with --data"
        )
    for key in named:
        if not Path(data[key]).expanduser().is_absolute():
            data[key] = str(folder / data[key])
    out["data"] = data
    return out


def read_recipe(
    path: str | Path, sets: list[str] | None = None, data_dir: str | Path | None = None
) -> dict[str, Any]:
    """Read a recipe file, apply ``--set`` overrides and resolve data files against ``data_dir``: the raw
    mapping, not yet validated (training and explore recipes validate it differently)."""
    raw = apply_overrides(read_recipe_file(path), sets or [])
    if data_dir is not None:
        raw = apply_data_dir(raw, data_dir)
    return raw


def load_recipe(
    path: str | Path, sets: list[str] | None = None, data_dir: str | Path | None = None
) -> tuple[Recipe, BaseModel]:
    """Read, override (``--set``), resolve data files against ``data_dir`` and validate a recipe file."""
    return validate_recipe(read_recipe(path, sets, data_dir))
