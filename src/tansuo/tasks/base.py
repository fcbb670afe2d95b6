"""The Task protocol: the one seam that knows a task.

A task turns records into batches, a batch into a loss, a split into metrics, and user input into
predictions. The trainer, checkpoints, bundles and the CLI only talk to this protocol, so a new task
(``classify``, ``translate``, ``recommend``) is one module whose class is decorated with
:func:`register_task`; a module outside the package joins through :mod:`tansuo.plugins`.

Optional abilities are declared in ``abilities`` (:data:`GENERATE`: the task has ``generate``; :data:`ONNX`:
its predictions run on the model's plain forward, so an ONNX export can stand in for the model;
:data:`EXAMPLES`: it addresses single examples, for DP-SGD and the membership audit), never probed.
:class:`TaskBase` gives the protocol's defaults.

Batches are plain ``dict[str, torch.Tensor]`` on the CPU; the trainer moves them to the device. Training
batches are a pure function of ``(seed, micro_step)``: resuming at a step needs no sampler state and gives
the same batches as an uninterrupted run.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from tansuo.errors import RecipeError, TansuoError
from tansuo.plugins import load_plugins

Batch = dict[str, torch.Tensor]

#: abilities a task may declare
GENERATE = "generate"  #: ``generate(model, prompt, ...)`` continues a prompt (``tansuo generate``)
ONNX = "onnx"  #: predictions use only the model's forward, so an ONNX Runtime model can stand in
#: the task's data are examples it can address one by one, and its ``loss`` is the mean of per-example
#: losses that involve no other example (no MixUp, no batch statistics): ``split_size(split)``,
#: ``examples(split, indices, step=None)`` (a batch of those examples; with ``step``, augmented as training
#: micro-batch ``step`` would be) and ``example_losses(model, batch)`` (one loss per example, ``(B,)``).
#: What DP-SGD (``train.privacy``: Poisson sampling, per-example clipping) and the membership audit
#: (``tansuo audit``: members are the training split, non-members the held-out one) need.
EXAMPLES = "examples"


def batch_seed(seed: int, n: int, salt: int = 0) -> int:
    """A seed for micro-batch ``n`` of a run: distinct for every (seed, n, salt), stable across platforms."""
    return (seed * 1_000_003 + n * 7_919 + salt) % (2**63 - 1)


@runtime_checkable
class Task(Protocol):
    """What every task provides; :class:`TaskBase` gives the optional parts, ``tasks/image.py`` is a short
    example and ``tests/plugins/regress.py`` one written outside the package."""

    name: ClassVar[str]
    #: pydantic model that validates the recipe's ``data:`` section
    DataConfig: ClassVar[type[BaseModel]]
    #: metric that picks the best bundle unless the recipe says otherwise (losses go down, others up)
    default_metric: ClassVar[str]
    #: what ``count`` counts, for throughput ("tokens" or "samples")
    unit: ClassVar[str]
    #: the split ``tansuo eval`` uses: data the model never trained or was selected on when one exists
    heldout_split: ClassVar[str]
    #: optional abilities (:data:`GENERATE`, :data:`ONNX`)
    abilities: ClassVar[frozenset[str]]
    #: the options ``predict`` takes besides its inputs (``tansuo predict -o NAME=VALUE``): a pydantic model
    #: whose fields are keyword arguments of ``predict``; :class:`NoOptions` for none
    PredictOptions: ClassVar[type[BaseModel]]
    #: what the default metric is divided by to give the ``quality`` that compression and the explorer
    #: compare and show x100 as points: 1 for a fraction (accuracy), 100 for a score in points already (BLEU)
    quality_scale: ClassVar[float]

    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> Task:
        """Prepare the data named by a validated ``data:`` section; ``work_dir`` holds derived files."""
        ...

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> Task:
        """Rebuild the task from a bundle's ``task.json`` (and tokenizer); ``data_path`` relocates data."""
        ...

    def model_overrides(self) -> dict[str, Any]:
        """Model config fields the data decides (vocabulary size, classes, image size, context length)."""
        ...

    def steps_per_epoch(self, batch_size: int) -> int | None:
        """Micro-batches in one pass over the training split, or None for streams sampled at random."""
        ...

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        """Endless training micro-batches, starting with micro-batch number ``start``."""
        ...

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model scores and against what: logits ``(N, K)`` and targets ``(N,)`` (one row per
        example, token or masked position). ``loss`` is their cross-entropy; distillation compares the
        logits of a student and a teacher."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of one batch (already on the model's device)."""
        ...

    def count(self, batch: Batch) -> int:
        """How many ``unit`` a batch holds."""
        ...

    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        """Metrics on a split (``val`` or ``test``); must not change the model or global RNG state.

        Values are floats, except structured entries (a confusion matrix, per-class figures: dicts or lists)
        that are recorded in metrics.jsonl and metrics.json but not logged, tabled or used to pick the best.
        """
        ...

    def save(self, bundle_dir: Path) -> None:
        """Write ``task.json`` and any assets (``tokenizer.json``) into a bundle folder being built."""
        ...

    def predict(
        self, model: nn.Module, inputs: list[str], device: torch.device, **options: Any
    ) -> list[dict[str, Any]]:
        """Predictions for what a person typed: file paths for images, texts for text tasks, histories for
        recommendations; ``options`` are fields of :attr:`PredictOptions` (``tansuo predict -o k=5``)."""
        ...

    def read_inputs(self, path: Path) -> list[str]:
        """Inputs for ``predict`` read from a file (``tansuo predict --input FILE``)."""
        ...

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        """One line (or a few) of plain text for a person, from one ``predict`` result."""
        ...

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        """Positional arguments of ``model`` for one batch of ``batch_size`` typical inputs (``seq_len``
        tokens for text): what measurement times and what ONNX export traces."""
        ...

    def timed_call(
        self, model: nn.Module, batch_size: int, seq_len: int, calls: int
    ) -> tuple[str, Callable[[], object]]:
        """What one timed call of ``model`` at ``batch_size`` is (measurement's latency and throughput), made
        ready for ``calls`` calls: a description ("forward": one pass over :meth:`example_input`; a
        decoder's "decode step": one new token per row after a ``seq_len``-token prompt) and the call."""
        ...


T = TypeVar("T", bound=type)

TASKS: dict[str, type[Task]] = {}


def register_task(cls: T) -> T:
    """Registers a task class under its ``name``. Use as a class decorator.

    Raises:
        ValueError: If another class already holds the name.
    """
    previous = TASKS.get(cls.name)
    if (
        previous is not None
        and previous.__qualname__ + previous.__module__ != cls.__qualname__ + cls.__module__
    ):
        raise ValueError(f"task {cls.name!r} is already registered by {previous.__module__}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: Any) -> type[Task]:
    """The task class registered as ``name`` (plugins are loaded first if it is not known yet).

    Raises:
        RecipeError: For an unknown name, suggesting the closest and listing the others.
    """
    if name not in TASKS:
        load_plugins()
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), list(TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"invalid recipe:\n  task: must be one of {sorted(TASKS)} (got {name!r}).{hint}")


class NoOptions(BaseModel):
    """A task whose ``predict`` takes no options."""

    model_config = ConfigDict(extra="forbid")


def predict_options(task: Task, pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings (``tansuo predict -o``) checked against the task's ``PredictOptions``, as
    keyword arguments of its ``predict`` (only those given; values converted as the fields say).

    Raises:
        TansuoError: A pair without ``=``, or a name or value the task does not take (naming its options).
    """
    schema: type[BaseModel] = getattr(task, "PredictOptions", NoOptions)
    raw: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise TansuoError(f"-o {pair!r}: expected NAME=VALUE, for example -o k=5")
        raw[name.strip()] = value
    try:
        return schema.model_validate(raw).model_dump(include=set(raw))
    except ValidationError as e:
        fields = {n: f.description or "" for n, f in schema.model_fields.items()}
        offered = "; ".join(f"{n} ({d})" if d else n for n, d in fields.items()) or "none"
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "options"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            shown = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
            lines.append(f"  -o {where}: {msg}{shown}")
        raise TansuoError(
            f"invalid predict option for {task.name!r} bundles:\n"
            + "\n".join(lines)
            + f"\noptions: {offered}"
        ) from None


class TaskBase:
    """The protocol's defaults, for tasks to subclass: no optional abilities, no predict options, inputs as
    arguments only, predictions printed as JSON, ``task.json`` from :meth:`state`, the model's own example
    input."""

    name: ClassVar[str]
    abilities: ClassVar[frozenset[str]] = frozenset()
    PredictOptions: ClassVar[type[BaseModel]] = NoOptions
    quality_scale: ClassVar[float] = 1.0
    #: what preparing the data did, for the run's log (metrics.jsonl's "data" event); e.g. PII scrubbed
    data_report: dict[str, Any] = {}  # noqa: RUF012  (replaced per instance, never mutated)
    #: what preparing the data computed from the training examples outside training (input statistics, a
    #: tokenizer trained on them), so outside DP-SGD's guarantee, and how to avoid it; None: nothing.
    #: ``train.privacy`` refuses a task that says something here.
    training_statistics: str | None = None
    seed: int
    data: BaseModel

    def state(self) -> dict[str, Any]:
        """What ``task.json`` records besides the task name, seed and data section (labels, sizes)."""
        return {}

    def context_length(self) -> int | None:
        """Tokens of context each trained token has (a window's length), for counting attention FLOPs;
        None where the task does not train on windows of a fixed length (the model's ``max_seq_len`` then
        stands in, an upper bound)."""
        return None

    def save_assets(self, bundle_dir: Path) -> None:
        """Files the task needs in a bundle besides ``task.json`` (a tokenizer)."""

    def save(self, bundle_dir: Path) -> None:
        info = {"task": self.name, "seed": self.seed, "data": self.data.model_dump(), **self.state()}
        (bundle_dir / "task.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        self.save_assets(bundle_dir)

    def read_inputs(self, path: Path) -> list[str]:
        raise TansuoError(f"{self.name!r} bundles take their inputs as arguments, not --input")

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return json.dumps(row)

    def example_input(self, model: nn.Module, batch_size: int, seq_len: int) -> tuple[torch.Tensor, ...]:
        return (model.example_input(batch_size),)

    def timed_call(
        self, model: nn.Module, batch_size: int, seq_len: int, calls: int
    ) -> tuple[str, Callable[[], object]]:
        args = self.example_input(model, batch_size, seq_len)
        return "forward", lambda: model(*args)


def format_probabilities(row: dict[str, Any], top: int) -> str:
    """``input  ->  label  (a: 0.900  b: 0.100)`` for a classifier's prediction."""
    probs = sorted(row["probabilities"].items(), key=lambda kv: -kv[1])[:top]
    shown = "  ".join(f"{k}: {v:.3f}" for k, v in probs)
    return f"{row['input']}  ->  {row['label']}  ({shown})"
