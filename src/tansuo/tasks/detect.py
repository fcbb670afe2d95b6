"""Object detection (``detect``): boxes and classes with an anchor-free (FCOS) detector.

Sources (``data.source``): ``mnist-canvas`` (digits of an MNIST CSV pasted on canvases; the digits are split
80/10/10 first, so validation canvases show digits never seen in training), ``yolo`` (an Ultralytics data
YAML: ``path``, ``train``, ``val`` image folders, labels where ``images`` becomes ``labels`` in the path, and
``names``) and ``coco`` (instances JSON files and their image folders). ``classes`` keeps a subset.
Every image is letterboxed once to the model's square input (``image_size``) and kept as uint8; training
batches add kornia's box-aware flip and affine (``data.augment``), seeded per batch. Ground truth is kept
in original pixels, so evaluation (COCO mAP through pycocotools, ``tasks/detection_metrics.py``) and
predictions map boxes back through the letterbox first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tansuo.data.dense import DenseDataset, check_sample, keep_classes, read_image
from tansuo.data.dense_ops import Placement, augment_batch, image_to_input, resize_sample
from tansuo.errors import DataError
from tansuo.models.det_head import head_points
from tansuo.tasks.base import ONNX, Batch, TaskBase, batch_seed, register_task
from tansuo.tasks.detection_metrics import ImageBoxes, detection_metrics
from tansuo.tasks.fcos import class_logits, decode, fcos_loss

SPLITS = ("train", "val", "test")  # test: mnist-canvas with three canvases counts only
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255  # ImageNet's, in 0..255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


class DetectDataConfig(BaseModel):
    """The ``data:`` section of a ``detect`` recipe."""

    model_config = ConfigDict(extra="forbid")
    #: fields naming data files, resolved against --data-dir when relative
    path_fields: ClassVar[tuple[str, ...]] = (
        "path", "names", "train_images", "train_labels", "val_images", "val_labels"
    )  # fmt: skip

    source: Literal["mnist-canvas", "yolo", "coco"] = Field(
        "mnist-canvas", description="where the images and boxes come from"
    )
    path: str | None = Field(
        None,
        description="mnist-canvas: the MNIST CSV (or its folder); yolo: an Ultralytics data YAML (or give "
        "the folders below)",
    )
    train_images: str | None = Field(None, description="yolo, coco: the training images folder")
    train_labels: str | None = Field(None, description="yolo: the training labels folder; coco: its JSON")
    val_images: str | None = Field(None, description="yolo, coco: the validation images folder")
    val_labels: str | None = Field(None, description="yolo: the validation labels folder; coco: its JSON")
    names: str | None = Field(None, description="yolo folders: a YAML with names: (or one name a line)")
    classes: list[str] | None = Field(None, description="keep only these classes (others are dropped)")
    image_size: int = Field(128, gt=0, description="side of the square model input (images letterboxed)")
    canvases: tuple[int, int] | tuple[int, int, int] = Field(
        (2000, 200),
        description="mnist-canvas: train and val canvases, and test canvases when a third count is given "
        "(then the held-back figure is the test split's)",
    )
    canvas_size: int = Field(128, gt=0, description="mnist-canvas: canvas side in pixels")
    digits_per_image: tuple[int, int] = Field((1, 4), description="mnist-canvas: digits per canvas")
    digit_scale: tuple[float, float] = Field((0.75, 1.5), description="mnist-canvas: digit scale range")
    augment: bool = Field(True, description="random flip and affine (kornia, box-aware) on training batches")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip (0 for digits)")
    scale: tuple[float, float] = Field((0.75, 1.25), description="random zoom range")
    translate: float = Field(0.1, ge=0, lt=1, description="largest random shift, a fraction of the side")
    center_radius: float = Field(1.5, gt=0, description="FCOS centre sampling radius, in strides")
    fresh_canvases: bool = Field(
        False,
        description="mnist-canvas: new training canvases for every batch, drawn from the training digits "
        "(a pure function of seed and step), instead of the canvases[0] made once; canvases[0] then only "
        "sets the epoch's length",
    )

    @model_validator(mode="after")
    def _needs(self) -> DetectDataConfig:
        if self.fresh_canvases and self.source != "mnist-canvas":
            raise ValueError("fresh_canvases needs source mnist-canvas (other sources are files)")
        folders = ("train_images", "train_labels", "val_images", "val_labels")
        if self.source == "coco" or (self.source == "yolo" and self.path is None):
            needed = folders + (("names",) if self.source == "yolo" else ())
            missing = [f for f in needed if not getattr(self, f)]
            if missing:
                raise ValueError(
                    f"source {self.source} needs {', '.join(missing)}"
                    + (" (or path: an Ultralytics data YAML)" if self.source == "yolo" else "")
                )
        elif self.path is None:
            what = "the MNIST CSV" if self.source == "mnist-canvas" else "the Ultralytics data YAML"
            raise ValueError(f"source {self.source} needs path: {what}")
        return self


class PredictOptions(BaseModel):
    """``tansuo predict -o``: what detections are kept."""

    model_config = ConfigDict(extra="forbid")
    score_threshold: float = Field(0.3, ge=0, le=1, description="lowest score kept")
    max_detections: int = Field(100, gt=0, description="most boxes per image")
    iou_threshold: float = Field(0.6, gt=0, le=1, description="NMS: overlap above which a box is dropped")
    draw: str | None = Field(
        None, description="write the picture with its boxes here (NAME_<stem>.png for several inputs)"
    )


def _yolo(config_path: str) -> dict[str, DenseDataset]:
    """Train and val data sets of an Ultralytics data YAML."""
    import yaml

    from tansuo.data.dense_formats import read_names, read_yolo

    path = Path(config_path).expanduser()
    if not path.is_file():
        raise DataError(f"YOLO data YAML not found: {path}; check data.path (or --data-dir)")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    root = path.parent / str(config.get("path") or ".")
    names = read_names(path)
    out = {}
    for split in ("train", "val"):
        if split not in config:
            raise DataError(f"{path} has no {split!r} entry (a folder of {split} images)")
        images = root / str(config[split])
        labels = Path(str(images).replace(f"images{'/'}", "labels/", 1)) if "images/" in str(images) else None
        if labels is None:
            raise DataError(f"{path}: {split} folder {images} has no 'images/' part to find its labels/ by")
        out[split] = read_yolo(images, labels, names, lazy=True)
    return out


def canvases(
    data: DetectDataConfig, digits: tuple[np.ndarray, np.ndarray], n: int, seed: int, log: bool = True
) -> DenseDataset:
    """``n`` mnist-canvas canvases of ``digits`` as the config sets them."""
    from tansuo.data.canvas import mnist_canvas

    return mnist_canvas(
        digits,
        n,
        size=data.canvas_size,
        seed=seed,
        digits_per_image=data.digits_per_image,
        scale=data.digit_scale,
        log=log,
    )


def load_splits(data: DetectDataConfig, seed: int) -> dict[str, DenseDataset]:
    """The train and val data sets a data config names (all classes, before ``classes``), and test for
    mnist-canvas given three canvas counts."""
    if data.source == "mnist-canvas":
        from tansuo.data.canvas import digit_pools

        assert data.path is not None
        train, val, test = digit_pools(data.path, seed)
        made = {
            "train": canvases(data, train, data.canvases[0], seed),
            "val": canvases(data, val, data.canvases[1], seed + 1),
        }
        if len(data.canvases) == 3:
            made["test"] = canvases(data, test, data.canvases[2], seed + 2)
        return made
    if data.source == "yolo" and data.path is not None:
        return _yolo(data.path)
    if data.source == "yolo":
        from tansuo.data.dense_formats import read_names, read_yolo

        names = read_names(str(data.names))
        return {
            "train": read_yolo(str(data.train_images), str(data.train_labels), names, lazy=True),
            "val": read_yolo(str(data.val_images), str(data.val_labels), names, lazy=True),
        }
    from tansuo.data.dense_formats import read_coco_instances

    return {
        "train": read_coco_instances(str(data.train_labels), str(data.train_images), lazy=True),
        "val": read_coco_instances(str(data.val_labels), str(data.val_images), lazy=True),
    }


class _Split:
    """One split letterboxed to the model input: uint8 images ``(N, 3, S, S)``, boxes on the input and in
    original pixels, labels, placements."""

    def __init__(self, dataset: DenseDataset, size: int) -> None:
        images, self.boxes, self.labels, self.original, self.placements = [], [], [], [], []
        for i in range(len(dataset)):
            sample = replace(check_sample(dataset[i], len(dataset.names)), masks=None, semantic=None)
            resized, placement = resize_sample(sample, size)  # boxes only: masks are not resized
            images.append(torch.from_numpy(resized.image).permute(2, 0, 1))
            self.boxes.append(torch.from_numpy(resized.boxes).float())
            self.labels.append(torch.from_numpy(sample.labels).long())
            self.original.append(torch.from_numpy(sample.boxes).float())
            self.placements.append(placement)
        if not images:
            raise DataError("a detection split holds no images")
        self.images = torch.stack(images)  # (N, 3, S, S) uint8

    def __len__(self) -> int:
        return len(self.images)


def pad_boxes(boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image boxes and labels as ``(B, M, 4)`` and ``(B, M)`` tensors, padded with label -1."""
    most = max((len(b) for b in boxes), default=0)
    out_boxes = torch.zeros(len(boxes), most, 4)
    out_labels = torch.full((len(boxes), most), -1, dtype=torch.long)
    for i, (b, label) in enumerate(zip(boxes, labels, strict=True)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(b)] = label
    return out_boxes, out_labels


@register_task
class DetectTask(TaskBase):
    """Find objects: a box, a class and a score for each."""

    name: ClassVar[str] = "detect"
    DataConfig: ClassVar[type[BaseModel]] = DetectDataConfig
    default_metric: ClassVar[str] = "map"
    unit: ClassVar[str] = "samples"
    heldout_split: ClassVar[str] = "val"
    abilities: ClassVar[frozenset[str]] = frozenset({ONNX})
    PredictOptions: ClassVar[type[BaseModel]] = PredictOptions

    def __init__(self, data: DetectDataConfig, seed: int, class_names: list[str]) -> None:
        self.data, self.seed = data, seed
        if data.source == "mnist-canvas" and len(data.canvases) == 3:
            self.heldout_split = "test"  # type: ignore[misc]
        self.class_names = class_names
        self.image_size = data.image_size
        self._splits: dict[str, _Split] = {}
        self._point_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._train_digits: tuple[np.ndarray, np.ndarray] | None = None  # fresh_canvases' pool

    @classmethod
    def from_recipe(cls, data: BaseModel, seed: int, work_dir: Path) -> DetectTask:
        assert isinstance(data, DetectDataConfig)
        datasets = {k: keep_classes(v, data.classes) for k, v in load_splits(data, seed).items()}
        task = cls(data, seed, list(datasets["train"].names))
        task._splits = {k: _Split(v, data.image_size) for k, v in datasets.items()}
        return task

    @classmethod
    def from_bundle(cls, bundle_dir: Path, data_path: str | None = None) -> DetectTask:
        info = json.loads((bundle_dir / "task.json").read_text(encoding="utf-8"))
        data = DetectDataConfig.model_validate(info["data"])
        if data_path is not None:
            data = data.model_copy(update={"path": data_path})
        return cls(data, info["seed"], info["class_names"])

    def state(self) -> dict[str, Any]:
        return {"class_names": self.class_names}

    def _split(self, split: str) -> _Split:
        if split not in SPLITS:
            raise DataError(f"the detect task has splits {SPLITS}, not {split!r}")
        if split == "test" and self.heldout_split != "test":
            raise DataError(
                "this detect data has no test split (train and val only); a mnist-canvas recipe gets one "
                "with three counts in data.canvases"
            )
        if split not in self._splits:
            datasets = load_splits(self.data, self.seed)
            dataset = keep_classes(datasets[split], self.data.classes)
            if list(dataset.names) != self.class_names:
                raise DataError(
                    f"the data has classes {dataset.names[:20]}, but the model was trained on "
                    f"{self.class_names}"
                )
            self._splits[split] = _Split(dataset, self.image_size)
        return self._splits[split]

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """0..255 pixels -> ImageNet-normalised input."""
        return (x.float() - MEAN.to(x.device)) / STD.to(x.device)

    # ------------------------------------------------------------ Task protocol
    def model_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.class_names), "image_size": self.image_size, "in_channels": 3}

    def steps_per_epoch(self, batch_size: int) -> int | None:
        return max(1, len(self._split("train")) // batch_size)

    def _fresh_batch(self, batch_size: int, n: int) -> _Split:
        """Micro-batch ``n`` of new canvases (``data.fresh_canvases``), letterboxed as a split is."""
        if self._train_digits is None:
            from tansuo.data.canvas import digit_pools

            assert self.data.path is not None
            self._train_digits = digit_pools(self.data.path, self.seed)[0]
        made = canvases(self.data, self._train_digits, batch_size, batch_seed(self.seed, n, salt=13), False)
        return _Split(made, self.image_size)

    def train_batches(self, batch_size: int, start: int) -> Iterator[Batch]:
        train = self._split("train")
        per_epoch = self.steps_per_epoch(batch_size)
        assert per_epoch is not None
        epoch, perm = -1, torch.arange(0)
        for n in count(start):
            if self.data.fresh_canvases:
                source = self._fresh_batch(batch_size, n)
                idx = list(range(len(source)))
            else:
                e, k = divmod(n, per_epoch)
                if e != epoch:
                    epoch = e
                    g = torch.Generator().manual_seed(batch_seed(self.seed, e, salt=1))
                    perm = torch.randperm(len(train), generator=g)
                source, idx = train, perm[k * batch_size : (k + 1) * batch_size].tolist()
            x = source.images[idx].float()
            boxes = [source.boxes[i] for i in idx]
            labels = [source.labels[i] for i in idx]
            if self.data.augment:
                x, _, moved, _ = augment_batch(
                    x,
                    batch_seed(self.seed, n, salt=2),
                    boxes=boxes,
                    hflip=self.data.hflip,
                    scale=self.data.scale,
                    translate=self.data.translate,
                )
                assert moved is not None
                kept = [((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2) for b in moved]
                boxes = [b[m] for b, m in zip(moved, kept, strict=True)]
                labels = [y[m] for y, m in zip(labels, kept, strict=True)]
            padded, padded_labels = pad_boxes(boxes, labels)
            yield {"x": self.normalize(x), "boxes": padded, "labels": padded_labels}

    def _points(self, model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's head points and their strides, from its config (``image_size``, ``strides``): a
        compiled model, a pruned or int8 one and an ONNX Runtime session all have it."""
        config = getattr(model, "_orig_mod", model).config
        key = (config.image_size, tuple(config.strides), str(device))
        if key not in self._point_cache:
            points, strides = head_points(config.image_size, list(config.strides))
            self._point_cache[key] = (points.to(device), strides.to(device))
        return self._point_cache[key]

    def logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every point's class logits and its FCOS-assigned class (-100 for background points); the loss is
        not their cross-entropy but FCOS's focal, GIoU and centre-ness terms."""
        out = model(batch["x"])
        points, strides = self._points(model, out.device)
        return class_logits(out, points, strides, batch["boxes"], batch["labels"])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(batch["x"])
        points, strides = self._points(model, out.device)
        loss, _ = fcos_loss(out, points, strides, batch["boxes"], batch["labels"], self.data.center_radius)
        return loss

    def count(self, batch: Batch) -> int:
        return len(batch["x"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int, device: torch.device) -> dict[str, Any]:
        data = self._split(split)
        model.eval()
        predictions, targets = [], []
        for i in range(0, len(data), batch_size):
            out = model(self.normalize(data.images[i : i + batch_size]).to(device))
            for j, det in enumerate(decode(out.cpu(), image_size=self.image_size), start=i):
                boxes = torch.from_numpy(data.placements[j].boxes_to_original(det.boxes.numpy()))
                predictions.append(ImageBoxes(boxes, det.labels, det.scores))
                targets.append(ImageBoxes(data.original[j], data.labels[j]))
        return detection_metrics(predictions, targets, self.class_names)

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        inputs: list[str],
        device: torch.device,
        score_threshold: float = 0.3,
        max_detections: int = 100,
        iou_threshold: float = 0.6,
        draw: str | None = None,
    ) -> list[dict[str, Any]]:
        """Detect objects in image files: per image its size and boxes (label, score, ``xyxy`` pixels); with
        ``draw``, also the picture with its boxes (``draw`` for one input, ``<stem>_<input stem>.png`` for
        several)."""
        from tansuo.atomic import atomic_write
        from tansuo.data.dense_draw import draw_boxes

        images = [read_image(Path(p).expanduser()) for p in inputs]
        rows = self.predict_images(
            model, images, inputs, device, score_threshold, max_detections, iou_threshold
        )
        if draw is not None:
            for path, image, row in zip(inputs, images, rows, strict=True):
                target = Path(draw).expanduser()
                if len(inputs) > 1:
                    target = target.with_name(f"{target.stem}_{Path(path).stem}.png")
                picture = draw_boxes(image, row["detections"], self.class_names)
                atomic_write(target, lambda tmp, picture=picture: tmp.write_bytes(picture))
                row["drawn"] = str(target)
        return rows

    @torch.no_grad()
    def predict_images(
        self,
        model: nn.Module,
        images: list[np.ndarray],
        names: list[str],
        device: torch.device,
        score_threshold: float = 0.3,
        max_detections: int = 100,
        iou_threshold: float = 0.6,
    ) -> list[dict[str, Any]]:
        """Detect objects in uint8 ``(H, W, 3)`` RGB images already read; ``names`` label the answers."""
        model.eval()
        placements = [Placement.fit(im.shape[0], im.shape[1], self.image_size) for im in images]
        x = torch.stack([image_to_input(im, p) for im, p in zip(images, placements, strict=True)])
        out = model(self.normalize(x).to(device)).cpu()
        found = decode(
            out,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
            image_size=self.image_size,
        )
        rows = []
        for name, image, placement, det in zip(names, images, placements, found, strict=True):
            boxes = placement.boxes_to_original(det.boxes.numpy())
            rows.append(
                {
                    "input": name,
                    "width": int(image.shape[1]),
                    "height": int(image.shape[0]),
                    "detections": [
                        {
                            "label": self.class_names[int(k)],
                            "score": round(float(s), 4),
                            "box": [round(float(v), 1) for v in box],
                        }
                        for box, s, k in zip(boxes, det.scores, det.labels, strict=True)
                    ],
                }
            )
        return rows

    def format_prediction(self, row: dict[str, Any], top: int) -> str:
        found = row["detections"]
        head = f"{row['input']}  ->  {len(found)} object{'s' * (len(found) != 1)}"
        lines = [
            f"  {d['label']}  {d['score']:.3f}  [{', '.join(f'{v:.1f}' for v in d['box'])}]" for d in found
        ]
        drawn = [f"  [drawn: {row['drawn']}]"] if "drawn" in row else []
        return "\n".join([head, *lines, *drawn])
