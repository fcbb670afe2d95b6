"""The Task protocol: the one seam that knows a task.

A task turns records into batches, a batch into a loss, a split into metrics, and user input into
predictions. The trainer, checkpoints, bundles and the CLI only talk to this protocol, so a new task
(``classify``, ``translate``, ``recommend``) is one new module plus one line in ``tasks/__init__.py``.

Batches are plain ``dict[str, torch.Tensor]`` on the CPU; the trainer moves them to the device. Training
batches are a pure function of ``(seed, micro_step)``: resuming at a step needs no sampler state and gives
the same batches as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn

Batch = dict[str, torch.Tensor]


def batch_seed(seed: int, n: int, salt: int = 0) -> int:
    """A seed for micro-batch ``n`` of a run: distinct for every (seed, n, salt), stable across platforms."""
    return (seed * 1_000_003 + n * 7_919 + salt) % (2**63 - 1)


@runtime_checkable
class Task(Protocol):
    """What every task provides. See ``tasks/lm.py`` and ``tasks/image.py`` for the two implementations."""

    name: ClassVar[str]
    #: pydantic model that validates the recipe's ``data:`` section
    DataConfig: ClassVar[type[BaseModel]]
    #: metric that picks the best bundle unless the recipe says otherwise (losses go down, others up)
    default_metric: ClassVar[str]
    #: what ``count`` counts, for throughput ("tokens" or "samples")
    unit: ClassVar[str]
    #: the split ``tansuo eval`` uses: data the model never trained or was selected on when one exists
    heldout_split: ClassVar[str]

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

    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        """Predictions for what a person typed: file paths for images, texts for text tasks."""
        ...
