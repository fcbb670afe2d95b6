"""Image classification (``image``): ViT or the ResNet baseline on arrays of small images.

Sources: scikit-learn's bundled 8x8 digits, an NPZ file, or CSV rows (label then pixels, as MNIST CSVs).
The data is split once with a seeded permutation (default 80/10/10 train/val/test). Images stay in their
source units in memory and are normalised per channel on the fly with the training split's mean and std
(or the given ``data.mean`` / ``data.std``: a private run needs public ones),
after augmentation (random shifts of up to ``max_shift`` pixels, then optionally RandAugment or
TrivialAugment), so shifted-in borders are true background. MixUp / CutMix (``mixup``, ``cutmix``) turn the
training targets into (B, K) probabilities; ``label_smoothing`` smooths the training loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from tansuo.data import (
    ImageArrays,
    auto_augment,
    load_csv_arrays,
    load_digits_arrays,
    load_image_file,
    load_npz_arrays,
    mix_batch,
    random_shift,
    split_indices,
)
from tansuo.errors import DataError
from tansuo.tasks.base import EXAMPLES, ONNX, Batch, TaskBase, batch_seed, format_probabilities, register_task
from tansuo.tasks.metrics import classifier_metrics

SPLITS = ("train", "val", "test")


class ImageDataConfig(BaseModel):
    """The ``data:`` section of an ``image`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = ("path",)

    source: Literal["digits", "npz", "csv"] = Field("digits", description="where the images come from")
    path: str | None = Field(None, description="the .npz or .csv(.gz) file; --data PATH sets it")
    image_size: int | None = Field(None, gt=0, description="side of square CSV images; inferred if unset")
    channels: int = Field(1, ge=1, le=4)
    label_column: int = Field(0, description="CSV column holding the label; -1 for the last")
    splits: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train/val/test fractions")
    max_shift: int = Field(1, ge=0, description="random shift augmentation in pixels; 0 turns it off")
    augment: Literal["none", "randaugment", "trivialaugment"] = Field(
        "none", description="automatic augmentation policy (kornia) after the shifts; grey or RGB images"
    )
    mixup: float = Field(0.0, ge=0, le=1, description="probability that a training batch is mixed by MixUp")
    cutmix: float = Field(0.0, ge=0, le=1, description="probability that a training batch is mixed by CutMix")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="training loss against (1 - e) * target + e / classes; 0 turns it off"
    )
    top_k: int = Field(5, gt=0, description="also report top-k accuracy when there are more than k classes")
    mean: list[float] | None = Field(
        None,
        min_length=1,
        description="per-channel mean in source units (one value or one per channel) that inputs are "
        "normalised with; unset: the training split's. A private run (train.privacy) needs public values: "
        "the training split's are a statistic DP-SGD does not cover (MNIST in 0-255: 33.32)",
    )
    std: list[float] | None = Field(
        None, min_length=1, description="per-channel standard deviation, as mean (MNIST in 0-255: 78.57)"
    )

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"every standard deviation must be positive, got {v}")
        return v

    @field_validator("splits")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"the three fractions must be positive and sum to 1 (they sum to {sum(v):.4f})")
        return v

    @model_validator(mode="after")
    def _statistics(self) -> ImageDataConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give data.mean and data.std together (or neither: the training split's)")
        return self

    @model_validator(mode="after")
    def _mixing(self) -> ImageDataConfig:
        if self.mixup + self.cutmix > 1.0 + 1e-9:
            raise ValueError(
                f"mixup ({self.mixup}) + cutmix ({self.cutmix}) must not exceed 1: they are the chances of "
                "one batch being mixed either way"
            )
        return self


def load_arrays(data: ImageDataConfig) -> ImageArrays:
    """Load the images a data config names."""
    if data.source == "digits":
        return load_digits_arrays()
    if data.path is None:
        raise DataError(
            f"data.path is not set; source {data.source!r} needs --data PATH to a .{data.source} file"
        )
    if not Path(data.path).expanduser().is_file():
        raise DataError(
            f"data file not found: {data.path}; pass --data PATH to an existing .{data.source} file"
        )
    if data.source == "npz":
        return load_npz_arrays(data.path)
    return load_csv_arrays(
        data.path, image_size=data.image_size, channels=data.channels, label_column=data.label_column
    )


@register_task
class ImageTask(TaskBase):
    """Classify small images into a fixed set of classes."""

    name: ClassVar[str] = "image"
    DataConfig: ClassVar[type[BaseModel]] = ImageDataConfig
    default_metric: ClassVar[str] = "accuracy"
    unit: ClassVar[str] = "samples"
    heldout_split: ClassVar[str] = "test"
    abilities: ClassVar[frozenset[str]] = frozenset({ONNX, EXAMPLES})

    def __init__(
        self, data: ImageDataConfig, seed: int, info: dict[str, Any], arrays: ImageArrays | None
    ) -> None:
        self.data, self.seed = data, seed
        self.class_names: list[str] = info["class_names"]
        self.image_shape: tuple[int, int, int] = tuple(info["image_shape"])
        self.pixel_max: float = info["pixel_max"]
        self.mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(info["std"]).view(1, -1, 1, 1)
        self._arrays = arrays
        self._split_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if data.mean is None:
            self.training_statistics = (
                "inputs are normalised with the training images' per-channel mean and std; set data.mean "
                "and data.std to public values (MNIST in 0-255 pixels: data.mean=[33.32] data.std=[78.57])"
            )

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> ImageTask:
        assert isinstance(data, ImageDataConfig)
        arrays = load_arrays(data)
        train_idx = split_indices(len(arrays.labels), data.splits, seed)[0]
        channels = arrays.image_shape[0]
        if data.mean is not None and data.std is not None:  # given (public) statistics
            for name, given in (("mean", data.mean), ("std", data.std)):
                if len(given) not in (1, channels):
                    raise DataError(
                        f"data.{name} has {len(given)} values; the images have {channels} channels"
                    )
            mean = np.broadcast_to(np.asarray(data.mean, dtype=np.float64), (channels,))
            std = np.broadcast_to(np.asarray(data.std, dtype=np.float64), (channels,))
        else:
            train = arrays.images[train_idx]
            mean = train.mean(axis=(0, 2, 3))
            std = train.std(axis=(0, 2, 3)) + 1e-6
        if data.augment != "none" and arrays.image_shape[0] not in (1, 3):
            raise DataError(
                f"data.augment {data.augment} needs grey or RGB images; these have {arrays.image_shape[0]} "
                "channels. Set data.augment=none"
            )
        info = {
            "class_names": list(arrays.class_names),
            "image_shape": list(arrays.image_shape),
            "pixel_max": float(arrays.pixel_max),
            "mean": mean.tolist(),
            "std": std.tolist(),
        }
        return cls(data, seed, info, arrays)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> ImageTask:
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = ImageDataConfig.model_validate(info["data"])
        if data_path is not None:
            data = data.model_copy(update={"path": data_path})
        return cls(data, info["seed"], info, arrays=None)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (source units, float32) and labels of one split, loaded on first use."""
        if split not in SPLITS:
            raise DataError(f"the image task has splits {SPLITS}, not {split!r}")
        if split not in self._split_cache:
            if self._arrays is None:
                self._arrays = load_arrays(self.data)
                if list(self._arrays.class_names) != self.class_names:
                    raise DataError(
                        f"the data at {self.data.path or self.data.source} has classes "
                        f"{list(self._arrays.class_names)}, but the model was trained on {self.class_names}"
                    )
            parts = split_indices(len(self._arrays.labels), self.data.splits, self.seed)
            for name, idx in zip(SPLITS, parts, strict=True):
                self._split_cache[name] = (
                    torch.from_numpy(np.ascontiguousarray(self._arrays.images[idx], dtype=np.float32)),
                    torch.from_numpy(np.asarray(self._arrays.labels[idx], dtype=np.int64)),
                )
        return self._split_cache[split]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Source units -> zero mean, unit variance per channel (training split or given statistics)."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        c, h, _ = self.image_shape
        return {"num_classes": len(self.class_names), "image_size": h, "in_channels": c}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return max(1, len(self._split("train")[1]) // batch_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        images, labels = self._split("train")
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, perm = -1, None
        for n in count(start):
            e, k = divmod(n, per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(
                    len(labels), generator=torch.Generator().manual_seed(batch_seed(self.seed, e, salt=1))
                )
            idx = perm[k * batch_size : (k + 1) * batch_size]
            x, y = self.normalize(self._augment(images[idx], n)), labels[idx]
            if self.data.mixup or self.data.cutmix:
                # every batch gets soft targets (one-hot when it is not mixed): one batch layout
                seed = batch_seed(self.seed, n, salt=4)
                x, y = mix_batch(x, y, len(self.class_names), self.data.mixup, self.data.cutmix, seed)
            yield {"x": x, "y": y}

    def _augment(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Micro-batch ``n``'s shifts and automatic augmentation (source units in and out)."""
        if self.data.max_shift:
            g = torch.Generator().manual_seed(batch_seed(self.seed, n, salt=2))
            x = random_shift(x, self.data.max_shift, g)
        if self.data.augment != "none":
            x = auto_augment(x, self.data.augment, self.pixel_max, batch_seed(self.seed, n, salt=3))
        return x

    # ------------------------------------------------------------ examples (DP-SGD, membership audit)
    def split_size(self, split: str) -> int:
        return len(self._split(split)[1])

    def examples(self, split: str, indices: torch.Tensor, step: int | None = None) -> Batch:
        """Images ``indices`` of ``split``; with ``step``, shifted and augmented as training micro-batch
        ``step`` is (never mixed: MixUp and CutMix blend examples, which DP-SGD's per-example clipping
        cannot allow).

        Raises:
            DataError: ``step`` is given and data.mixup or data.cutmix is set.
        """
        images, labels = self._split(split)
        x = images[indices]
        if step is not None:
            if self.data.mixup or self.data.cutmix:
                raise DataError(
                    "data.mixup / data.cutmix blend the examples of a batch, so no gradient belongs to one "
                    "example and DP-SGD cannot clip it; set data.mixup=0 and data.cutmix=0 with train.privacy"
                )
            x = self._augment(x, step)
        return {"x": self.normalize(x), "y": labels[indices]}

    def example_losses(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]).float(), batch["y"], reduction="none")

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["x"]), batch["y"]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy against class indices, or against (B, K) probabilities when the batch is mixed;
        label smoothing applies to training only (evaluation reports the plain loss)."""
        logits = model(batch["x"]).float()
        return F.cross_entropy(logits, batch["y"], label_smoothing=self.data.label_smoothing)

    def count(self, batch: Batch) -> int:
        return len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        images, labels = self._split(split)
        model.eval()
        logits = torch.cat(
            [
                model(self.normalize(images[i : i + batch_size]).to(device)).float().cpu()
                for i in range(0, len(labels), batch_size)
            ]
        )
        return classifier_metrics(logits, labels, self.class_names, self.data.top_k)

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        return format_probabilities(row, top)

    def state(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "image_shape": list(self.image_shape),
            "pixel_max": self.pixel_max,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], device: torch.device) -> list[dict[str, Any]]:
        """Label each image file (pictures or arrays, see :func:`load_image_file`)."""
        c, h, _ = self.image_shape
        x = np.stack([load_image_file(p, image_size=h, channels=c, pixel_max=self.pixel_max) for p in inputs])
        return self.predict_arrays(model, x, inputs, device)

    @torch.no_grad()
    def predict_arrays(
        self, model: nn.Module, x: np.ndarray, names: list[str], device: torch.device
    ) -> list[dict[str, Any]]:
        """Label images already read: ``x`` (N, C, H, W) in the training data's units; ``names`` label
        the rows of the answer."""
        model.eval()
        probs = model(self.normalize(torch.from_numpy(x).float()).to(device)).float().softmax(-1).cpu()
        out = []
        for name, p in zip(names, probs, strict=True):
            top = int(p.argmax())
            out.append(
                {
                    "input": name,
                    "label": self.class_names[top],
                    "probability": float(p[top]),
                    "probabilities": {n: float(v) for n, v in zip(self.class_names, p, strict=True)},
                }
            )
        return out
