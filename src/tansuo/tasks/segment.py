"""Semantic segmentation (``segment``): a class for every pixel, by a ViT segmenter or a U-Net.

Sources (``data.source``): ``mnist-canvas`` (digits pasted on a canvas, class = digit + 1; the digit pool
is split 80/10/10 first, so validation and test canvases hold digits never trained on), ``semantic-png``
(class-index PNG folders), ``coco`` (an instances JSON: the objects' masks drawn into a class map) and
``yolo-seg`` (YOLO-seg polygon folders, likewise). Class 0 is background; pixels outside the image (the
letterbox padding) and ignored pixels (255) are not scored.

Images are letterboxed (or stretched) to ``image_size`` once, kept as uint8, and normalised per channel
with the training split's mean and std per batch, after the optional flip / zoom / shift augmentation that
moves the class maps with the pixels (kornia, seeded per batch). Metrics (mIoU, per-class IoU, pixel
accuracy, Dice) are computed on the model's input grid; predictions are mapped back to the original image.
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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tansuo.atomic import atomic_write
from tansuo.data.canvas import digit_pools, mnist_canvas
from tansuo.data.dense import IGNORE_INDEX, DenseDataset, keep_classes, read_image, semantic_from_instances
from tansuo.data.dense_draw import overlay_mask
from tansuo.data.dense_formats import read_coco_instances, read_names, read_semantic_pngs, read_yolo
from tansuo.data.dense_ops import Placement, augment_batch, image_to_input, resize_sample
from tansuo.errors import DataError
from tansuo.tasks.base import ONNX, Batch, TaskBase, batch_seed, register_task
from tansuo.tasks.metrics import pixel_confusion, segmentation_metrics

SPLITS = ("train", "val", "test")
SOURCES = ("mnist-canvas", "semantic-png", "coco", "yolo-seg")


class SegmentDataConfig(BaseModel):
    """The ``data:`` section of a ``segment`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = (
        "path",
        "train_images",
        "train_labels",
        "val_images",
        "val_labels",
        "test_images",
        "test_labels",
        "names",
    )

    source: Literal["mnist-canvas", "semantic-png", "coco", "yolo-seg"] = Field(
        "mnist-canvas", description="where images and masks come from"
    )
    path: str | None = Field(None, description="mnist-canvas: the MNIST CSV (label last) or its folder")
    train_images: str | None = Field(None, description="folder of training images (COCO: file_name root)")
    train_labels: str | None = Field(
        None,
        description="training masks: a PNG folder (semantic-png), a JSON (coco), a label folder (yolo-seg)",
    )
    val_images: str | None = Field(None, description="validation images; unset: val_fraction of train")
    val_labels: str | None = None
    test_images: str | None = Field(None, description="held-back images; unset: the validation set")
    test_labels: str | None = None
    names: str | list[str] | None = Field(
        None, description="class names: a YAML (names: / classes:) or text file, or a list; coco: the JSON's"
    )
    classes: list[str] | None = Field(None, description="keep only these classes; others become background")
    image_size: int = Field(64, gt=0, description="side of the model's square input")
    resize: Literal["letterbox", "stretch"] = Field("letterbox", description="how images reach image_size")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out when val is unset")
    background: int = Field(0, ge=0, description="semantic-png: the mask value of background")
    ignore_value: int | None = Field(255, description="semantic-png: mask value that is not scored")
    canvases: tuple[int, int, int] = Field((2000, 200, 200), description="mnist-canvas: train/val/test")
    digits_per_image: tuple[int, int] = Field((1, 3), description="mnist-canvas: fewest and most digits")
    digit_scale: tuple[float, float] = Field((0.75, 1.5), description="mnist-canvas: zoom of a 28px digit")
    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip in training")
    zoom: tuple[float, float] = Field((1.0, 1.0), description="random zoom range in training (1, 1: none)")
    translate: float = Field(0.0, ge=0, lt=1, description="largest random shift, a fraction of the side")
    fresh_canvases: bool = Field(
        False,
        description="mnist-canvas: new training canvases for every batch, drawn from the training digits "
        "(a pure function of seed and step), instead of the canvases[0] made once; canvases[0] then only "
        "sets the epoch's length",
    )
    dice_weight: float = Field(
        0.0, ge=0, description="weight of the Dice loss (kornia) added to the pixel cross-entropy (0: none)"
    )
    dice_average: Literal["macro", "micro"] = Field(
        "macro",
        description="Dice per class present, averaged (macro: small classes count as much as background), "
        "or over all pixels at once (micro)",
    )

    @model_validator(mode="after")
    def _needs(self) -> SegmentDataConfig:
        if self.fresh_canvases and self.source != "mnist-canvas":
            raise ValueError("fresh_canvases needs source mnist-canvas (other sources are files)")
        if self.source != "mnist-canvas" and (self.train_images is None or self.train_labels is None):
            raise ValueError(f"source {self.source} needs train_images and train_labels")
        if self.source in ("semantic-png", "yolo-seg") and self.names is None:
            raise ValueError(f"source {self.source} needs names (a YAML or text file, or a list)")
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError("give both val_images and val_labels, or neither")
        if (self.test_images is None) != (self.test_labels is None):
            raise ValueError("give both test_images and test_labels, or neither")
        if self.zoom[0] > self.zoom[1] or self.zoom[0] <= 0:
            raise ValueError(f"zoom must be a range 0 < low <= high, got {self.zoom}")
        return self

    @property
    def augments(self) -> bool:
        return self.hflip > 0 or self.zoom != (1.0, 1.0) or self.translate > 0


class SegmentPredictOptions(BaseModel):
    """What ``predict`` takes besides the image files (``tansuo predict BUNDLE a.jpg --draw out.png``)."""

    model_config = ConfigDict(extra="forbid")

    draw: str | None = Field(
        None, description="write the picture with the class mask over it here (NAME_<stem>.png for several)"
    )
    alpha: float = Field(0.5, ge=0, le=1, description="opacity of the drawn mask")


def _read_split(data: SegmentDataConfig, images: str, labels: str) -> DenseDataset:
    """One split of a file source, with class maps."""
    if data.source == "semantic-png":
        names = read_names(data.names) if isinstance(data.names, str) else list(data.names or [])
        return read_semantic_pngs(
            images, labels, names, background=data.background, ignore_value=data.ignore_value, lazy=True
        )
    if data.source == "coco":
        dataset = read_coco_instances(labels, images, lazy=True)
    else:
        names = read_names(data.names) if isinstance(data.names, str) else list(data.names or [])
        dataset = read_yolo(images, labels, names, lazy=True)
    for sample in dataset.samples:
        if sample.masks is None:
            raise DataError(f"{sample.source}: has boxes but no masks; segmentation needs polygons or RLE")
        sample.semantic = semantic_from_instances(sample).astype(np.uint8)
        sample.masks = None  # the class map is all this task keeps
    return dataset


def canvases(
    data: SegmentDataConfig, digits: tuple[np.ndarray, np.ndarray], n: int, seed: int, log: bool = True
) -> DenseDataset:
    """``n`` mnist-canvas canvases of ``digits`` as the config sets them (side ``image_size``)."""
    return mnist_canvas(
        digits,
        n,
        size=data.image_size,
        seed=seed,
        digits_per_image=data.digits_per_image,
        scale=data.digit_scale,
        log=log,
    )


def load_splits(data: SegmentDataConfig, seed: int) -> dict[str, DenseDataset]:
    """The train / val / test data sets a config names (before resizing)."""
    if data.source == "mnist-canvas":
        if data.path is None:
            raise DataError("data.path is not set; mnist-canvas needs the MNIST CSV (--data-dir or --data)")
        pools = digit_pools(data.path, seed)
        return {
            split: canvases(data, pool, n, batch_seed(seed, k, salt=11))
            for k, (split, pool, n) in enumerate(zip(SPLITS, pools, data.canvases, strict=True))
        }
    train = _read_split(data, data.train_images, data.train_labels)
    if data.val_images is not None:
        val = _read_split(data, data.val_images, data.val_labels)
    else:
        n_val = max(1, round(len(train) * data.val_fraction))
        perm = np.random.default_rng(seed).permutation(len(train))
        train, val = train.subset(perm[n_val:]), train.subset(perm[:n_val])
    test = _read_split(data, data.test_images, data.test_labels) if data.test_images else val
    for name, split in (("val", val), ("test", test)):
        if split.names != train.names:
            raise DataError(f"the {name} data has classes {split.names[:10]}, training {train.names[:10]}")
    return {"train": train, "val": val, "test": test}


def _tensors(dataset: DenseDataset, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, S, S) and uint8 class maps (N, S, S), resized."""
    images, maps = [], []
    for sample in dataset.samples:
        resized, _ = resize_sample(sample, size, mode)
        images.append(torch.from_numpy(resized.image).permute(2, 0, 1))
        maps.append(torch.from_numpy(resized.semantic.astype(np.uint8)))
    return torch.stack(images), torch.stack(maps)


def prepare_splits(
    data: SegmentDataConfig, seed: int
) -> tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The class names (after ``data.classes``) and every split resized, as uint8 tensors (a test set that
    is the validation set is prepared once)."""
    loaded = load_splits(data, seed)
    names: list[str] = []
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, dataset in loaded.items():
        same = next((k for k in out if loaded[k] is dataset), None)
        if same is not None:
            out[split] = out[same]
            continue
        kept = keep_classes(dataset, data.classes)
        names = names or kept.names
        out[split] = _tensors(kept, data.image_size, data.resize)
    return names, out


@register_task
class SegmentTask(TaskBase):
    """Give every pixel a class (0: background)."""

    name: ClassVar[str] = "segment"
    DataConfig: ClassVar[type[BaseModel]] = SegmentDataConfig
    default_metric: ClassVar[str] = "miou"
    unit: ClassVar[str] = "samples"
    heldout_split: ClassVar[str] = "test"
    abilities: ClassVar[frozenset[str]] = frozenset({ONNX})
    PredictOptions: ClassVar[type[BaseModel]] = SegmentPredictOptions

    def __init__(
        self,
        data: SegmentDataConfig,
        seed: int,
        info: dict[str, Any],
        splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        self.data, self.seed = data, seed
        self.names: list[str] = info["names"]  # object classes; class map value k is names[k - 1]
        self.mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(info["std"]).view(1, 3, 1, 1)
        self._splits = splits
        self._train_digits: tuple[np.ndarray, np.ndarray] | None = None  # fresh_canvases' pool

    @property
    def class_names(self) -> list[str]:
        """Names of the model's K outputs: ``background`` then the object classes."""
        return ["background", *self.names]

    # ------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> SegmentTask:
        assert isinstance(data, SegmentDataConfig)
        names, splits = prepare_splits(data, seed)
        images = splits["train"][0].double() / 255.0  # (N, 3, S, S)
        info = {
            "names": names,
            "mean": images.mean(dim=(0, 2, 3)).tolist(),
            "std": (images.std(dim=(0, 2, 3)) + 1e-6).tolist(),
        }
        return cls(data, seed, info, splits)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> SegmentTask:
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = SegmentDataConfig.model_validate(info["data"])
        if data_path is not None:
            data = data.model_copy(update={"path": data_path})
        return cls(data, info["seed"], info, splits=None)

    def state(self) -> dict[str, Any]:
        return {"names": self.names, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise DataError(f"the segment task has splits {SPLITS}, not {split!r}")
        if self._splits is None:
            names, splits = prepare_splits(self.data, self.seed)
            if names != self.names:
                raise DataError(
                    f"the data has classes {names[:10]}, but the model was trained on {self.names[:10]}"
                )
            self._splits = splits
        return self._splits[split]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or 0..255 float images -> zero mean, unit variance per channel (training statistics)."""
        return (x.float() / 255.0 - self.mean.to(x.device)) / self.std.to(x.device)

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.names) + 1, "image_size": self.data.image_size, "in_channels": 3}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return max(1, len(self._split("train")[0]) // batch_size)

    def _fresh_batch(self, batch_size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``n`` of new canvases (``data.fresh_canvases``): uint8 images and class maps."""
        if self._train_digits is None:
            assert self.data.path is not None
            self._train_digits = digit_pools(self.data.path, self.seed)[0]
        made = canvases(self.data, self._train_digits, batch_size, batch_seed(self.seed, n, salt=13), False)
        return _tensors(made, self.data.image_size, self.data.resize)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        images, maps = self._split("train")
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, perm = -1, None
        for n in count(start):
            if self.data.fresh_canvases:
                fresh_images, fresh_maps = self._fresh_batch(batch_size, n)
                x, y = fresh_images.float(), fresh_maps.long()
            else:
                e, k = divmod(n, per_epoch)
                if e != epoch:
                    epoch = e
                    g = torch.Generator().manual_seed(batch_seed(self.seed, e, salt=1))
                    perm = torch.randperm(len(images), generator=g)
                idx = perm[k * batch_size : (k + 1) * batch_size]
                x, y = images[idx].float(), maps[idx].long()
            if self.data.augments:
                x, y, _, _ = augment_batch(
                    x,
                    batch_seed(self.seed, n, salt=2),
                    semantic=y,
                    hflip=self.data.hflip,
                    scale=self.data.zoom,
                    translate=self.data.translate,
                )
            yield {"x": self.normalize(x), "y": y}

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(P, K)`` and classes ``(P,)`` of the scored pixels of the batch."""
        scores = model(batch["x"])  # (B, K, H, W)
        flat = scores.permute(0, 2, 3, 1).reshape(-1, scores.shape[1])  # (B * H * W, K)
        target = batch["y"].reshape(-1)
        keep = target != IGNORE_INDEX
        return flat[keep], target[keep]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Pixel-wise cross-entropy over the scored pixels (ignored ones left out), plus ``data.dice_weight``
        times kornia's Dice loss (``data.dice_average``: per class present, averaged, by default)."""
        scores = model(batch["x"]).float()  # (B, K, H, W)
        loss = F.cross_entropy(scores, batch["y"], ignore_index=IGNORE_INDEX)
        if self.data.dice_weight > 0:
            from kornia.losses import dice_loss

            dice = dice_loss(scores, batch["y"], average=self.data.dice_average, ignore_index=IGNORE_INDEX)
            loss = loss + self.data.dice_weight * dice
        return loss

    def count(self, batch: Batch) -> int:
        return len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        images, maps = self._split(split)
        model.eval()
        k = len(self.names) + 1
        confusion = torch.zeros(k, k, dtype=torch.long)
        loss_sum, scored = 0.0, 0
        for i in range(0, len(images), batch_size):
            x = self.normalize(images[i : i + batch_size]).to(device)
            y = maps[i : i + batch_size].long()
            scores = model(x).float().cpu()  # (B, K, H, W)
            keep = int((y != IGNORE_INDEX).sum())
            if keep:
                loss = F.cross_entropy(scores, y, ignore_index=IGNORE_INDEX, reduction="sum")
                loss_sum, scored = loss_sum + float(loss), scored + keep
            confusion += pixel_confusion(scores.argmax(1), y, k, IGNORE_INDEX)
        metrics = {"loss": loss_sum / max(scored, 1), **segmentation_metrics(confusion, self.class_names)}
        return metrics

    # ------------------------------------------------------------ prediction
    @torch.no_grad()
    def segment_images(
        self, model: nn.Module, images: list[np.ndarray], device: torch.device
    ) -> list[np.ndarray]:
        """Class maps (uint8 (H, W), values 0..K-1) of RGB uint8 images (H, W, 3) of any size: each is
        resized as in training, scored, and its scores mapped back to the original pixels."""
        model.eval()
        size, out = self.data.image_size, []
        placements = [Placement.fit(im.shape[0], im.shape[1], size, self.data.resize) for im in images]
        x = torch.stack([image_to_input(im, p) for im, p in zip(images, placements, strict=True)])
        scores = model(self.normalize(x).to(device)).float().cpu()  # (B, K, S, S)
        for s, placement in zip(scores, placements, strict=True):
            out.append(placement.scores_to_original(s).argmax(0).to(torch.uint8).numpy())
        return out

    def areas(self, mask: np.ndarray) -> dict[str, float]:
        """Share of the image's pixels of each class present, largest first."""
        counts = np.bincount(mask.reshape(-1), minlength=len(self.class_names))
        shares = {n: float(c) / mask.size for n, c in zip(self.class_names, counts, strict=True) if c}
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    def predict(
        self,
        model: nn.Module,
        inputs: list[str],
        device: torch.device,
        draw: str | None = None,
        alpha: float = 0.5,
    ) -> list[dict[str, Any]]:
        """The share of each class's pixels in each image file; with ``draw``, also the image with its class
        mask over it (``draw`` for one input, ``<draw stem>_<input stem>.png`` for several)."""
        images = [read_image(Path(p).expanduser()) for p in inputs]
        masks = self.segment_images(model, images, device)
        rows = []
        for path, image, mask in zip(inputs, images, masks, strict=True):
            row: dict[str, Any] = {"input": path, "height": mask.shape[0], "width": mask.shape[1]}
            row["areas"] = self.areas(mask)
            if draw is not None:
                target = Path(draw).expanduser()
                if len(inputs) > 1:
                    target = target.with_name(f"{target.stem}_{Path(path).stem}.png")
                picture = overlay_mask(image, mask, self.class_names, alpha=alpha)
                atomic_write(target, lambda tmp, picture=picture: tmp.write_bytes(picture))
                row["drawn"] = str(target)
            rows.append(row)
        return rows

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        shown = list(row["areas"].items())
        parts = [f"{name} {share:.1%}" for name, share in shown[: max(top, 1)]]
        more = f"  (+{len(shown) - top} more)" if len(shown) > top else ""
        drawn = f"  [drawn: {row['drawn']}]" if "drawn" in row else ""
        return f"{row['input']}  ->  {'  '.join(parts)}{more}{drawn}"
