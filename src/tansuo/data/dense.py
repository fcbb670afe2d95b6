"""Dense vision data: images with boxes, instance masks and semantic class maps, for detection and
segmentation.

One sample is a :class:`DenseSample`; a data set is a :class:`DenseDataset` (class ``names`` and samples).
The loaders of the file formats users bring are in :mod:`tansuo.data.dense_formats` (COCO instances JSON,
YOLO txt folders, semantic and instance mask PNG folders), the synthetic digits-on-a-canvas set in
:mod:`tansuo.data.canvas`, resizing and box- and mask-aware augmentation in :mod:`tansuo.data.dense_ops`.

Conventions (shared by every loader, task and endpoint):

- ``image``: uint8 ``(H, W, 3)`` RGB (greyscale files are converted), or None with ``path`` set for a
  sample whose pixels are read on first use.
- ``boxes``: float32 ``(N, 4)`` ``x1, y1, x2, y2`` in pixels of the image, ``x2`` and ``y2`` exclusive (a
  one-pixel object at column 3 spans 3..4), as torchvision's and COCO's boxes.
- ``labels``: int64 ``(N,)`` indices into ``names``.
- ``masks``: optional bool ``(N, H, W)``, one per object.
- ``semantic``: optional int64 ``(H, W)`` class map: ``0`` is background, ``k`` (1..K) is ``names[k-1]``
  and :data:`IGNORE_INDEX` (255) marks pixels that are not scored (the loss and the metrics skip them).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tansuo.errors import DataError

logger = logging.getLogger(__name__)

#: value of a semantic map's pixels that are not scored
IGNORE_INDEX = 255
#: how far (in pixels) a box may reach past the image border before it is an error; within it, boxes are
#: clipped (annotation tools round outward)
BOX_TOLERANCE = 1.0
#: picture files the folder loaders list
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def max_image_pixels() -> int:
    """The largest image (in pixels) read: Pillow's ``Image.MAX_IMAGE_PIXELS`` (its decompression-bomb
    limit), 89,478,485 unless set otherwise."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def _open_checked(source, name: str):
    """Open a picture lazily with Pillow, refusing decompression bombs before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(source)
    except Image.DecompressionBombError as error:
        raise DataError(
            f"{name} has more than the {max_image_pixels():,} pixels allowed (a possible decompression bomb: "
            f"{error}); shrink the image"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, UnidentifiedImageError):
            raise DataError(
                f"cannot read {name} as an image (not a picture format Pillow reads); use a PNG or JPEG file"
            ) from error
        raise DataError(
            f"cannot read {name} as an image ({error}); the file is damaged or truncated"
        ) from error
    width, height = picture.size
    if width * height > max_image_pixels():
        picture.close()
        raise DataError(
            f"{name} is {width}x{height} pixels, more than the {max_image_pixels():,} allowed (a possible "
            "decompression bomb); shrink the image"
        )
    return picture


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only."""
    with _open_checked(path, str(path)) as picture:
        width, height = picture.size
    return height, width


def read_image(source, name: str | None = None) -> np.ndarray:
    """Decode a picture (a path, or a binary file object such as ``io.BytesIO``) as RGB.

    Greyscale, palette and RGBA pictures are converted to RGB (alpha dropped).

    Args:
        source: The file path or file object.
        name: What error messages call it (default: the path).

    Returns:
        uint8 ``(H, W, 3)``.

    Raises:
        DataError: For an unreadable or truncated file, or one larger than :func:`max_image_pixels`.
    """
    from PIL import Image

    name = name or str(source)
    picture = _open_checked(source, name)
    try:
        with picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode {name} ({error}); the file is damaged or truncated") from error
    return np.ascontiguousarray(array)


def read_label_png(path: Path, name: str | None = None) -> np.ndarray:
    """A class-index or object-id PNG (8- or 16-bit grey, or palette indices) as int64 ``(H, W)``.

    Raises:
        DataError: For an unreadable file or one with colour channels (a class map has one value a pixel).
    """
    name = name or str(path)
    picture = _open_checked(path, name)
    try:
        with picture:
            if picture.mode in ("RGB", "RGBA"):
                raise DataError(
                    f"{name} is a colour ({picture.mode}) image; a mask must hold one class or object id "
                    "a pixel (8- or 16-bit greyscale, or palette indices)"
                )
            array = np.asarray(picture, dtype=np.int64)
    except OSError as error:
        raise DataError(f"cannot decode {name} ({error}); the file is damaged or truncated") from error
    if array.ndim != 2:
        raise DataError(f"{name} has shape {array.shape}; a mask must be (H, W)")
    return array


@dataclass
class DenseSample:
    """One image and its objects (see the module docstring for the conventions).

    Attributes:
        source: The image's file name (or a made-up name), named in error messages.
        image: uint8 (H, W, 3) RGB, or None until :meth:`pixels` reads ``path``.
        boxes: float32 (N, 4) xyxy in pixels.
        labels: int64 (N,) indices into the data set's ``names``.
        masks: bool (N, H, W) instance masks, or None.
        semantic: int64 (H, W) class map (0 background, k = names[k-1], 255 ignored), or None.
        path: The image file, for samples read lazily.
        size: (H, W) of the image (known without decoding it).
        crowd: bool (N,) COCO's ``iscrowd`` (a region of many objects, ignored by COCO's metrics), or None.
    """

    source: str
    image: np.ndarray | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    masks: np.ndarray | None = None
    semantic: np.ndarray | None = None
    path: Path | None = None
    size: tuple[int, int] | None = None
    crowd: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image is not None:
            if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
                raise ValueError(f"{self.source}: image must be uint8 (H, W, 3), got {self.image.shape}")
            self.size = (int(self.image.shape[0]), int(self.image.shape[1]))
        elif self.path is None:
            raise ValueError(f"{self.source}: a sample needs its image or the path to read it from")
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.boxes)} boxes but {len(self.labels)} labels")
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)

    @property
    def height(self) -> int:
        return self.pixels().shape[0] if self.size is None else self.size[0]

    @property
    def width(self) -> int:
        return self.pixels().shape[1] if self.size is None else self.size[1]

    def pixels(self) -> np.ndarray:
        """The image, read from ``path`` on first use (and not kept: a lazy data set stays small)."""
        if self.image is not None:
            return self.image
        assert self.path is not None
        image = read_image(self.path)
        if self.size is not None and image.shape[:2] != self.size:
            raise DataError(f"{self.path} changed size since it was listed; reload the data set")
        return image

    def loaded(self) -> DenseSample:
        """This sample with its image in memory."""
        return self if self.image is not None else replace(self, image=self.pixels())


@dataclass
class DenseDataset:
    """Class names and samples; indexing returns samples with their image in memory.

    Attributes:
        names: Object class names; ``labels`` index into it and semantic value ``k`` is ``names[k-1]``.
        samples: The samples (images read now or on first use).
    """

    names: list[str]
    samples: list[DenseSample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> DenseSample:
        return self.samples[index].loaded()

    @property
    def semantic_names(self) -> list[str]:
        """Names of the semantic map's values: ``background`` then ``names``."""
        return ["background", *self.names]

    def subset(self, indices: Sequence[int]) -> DenseDataset:
        return DenseDataset(list(self.names), [self.samples[int(i)] for i in indices])


def check_sample(sample: DenseSample, num_classes: int) -> DenseSample:
    """Check a sample against its image and class count, clipping boxes that reach past the border by at
    most :data:`BOX_TOLERANCE` pixels.

    Raises:
        DataError: Naming ``sample.source``: a class outside ``0..num_classes-1``, a box outside the image or
            with x2 < x1, a mask or class map whose size differs from the image's, a semantic value above
            ``num_classes`` (other than :data:`IGNORE_INDEX`).
    """
    height, width = sample.height, sample.width
    labels = sample.labels
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(
            f"{sample.source}: class {bad} is outside the {num_classes} class names (0..{num_classes - 1}); "
            "fix the label or add the class to names"
        )
    if sample.masks is not None and sample.masks.shape != (len(labels), height, width):
        raise DataError(
            f"{sample.source}: masks have shape {sample.masks.shape[1:]} (H, W) but the image is "
            f"{height}x{width} (H x W); masks must match their image's size"
        )
    if sample.semantic is not None:
        if sample.semantic.shape != (height, width):
            raise DataError(
                f"{sample.source}: the class mask is {sample.semantic.shape[0]}x{sample.semantic.shape[1]} "
                f"but the image is {height}x{width} (H x W); masks must match their image's size"
            )
        values = np.unique(sample.semantic)
        bad = values[(values < 0) | ((values > num_classes) & (values != IGNORE_INDEX))]
        if len(bad):
            raise DataError(
                f"{sample.source}: the class mask holds value {int(bad[0])}, outside background 0, classes "
                f"1..{num_classes} and ignored {IGNORE_INDEX}"
            )
    boxes = sample.boxes
    if len(boxes):
        if not np.all(np.isfinite(boxes)):
            raise DataError(f"{sample.source}: a box holds NaN or infinite coordinates")
        low = np.array([0, 0, 0, 0], np.float32) - BOX_TOLERANCE
        high = np.array([width, height, width, height], np.float32) + BOX_TOLERANCE
        outside = np.any((boxes < low) | (boxes > high), axis=1)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DataError(
                f"{sample.source}: box {i} {boxes[i].round(2).tolist()} (xyxy pixels) lies outside the "
                f"{width}x{height} image; fix its coordinates"
            )
        inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if inverted.any():
            i = int(np.flatnonzero(inverted)[0])
            raise DataError(f"{sample.source}: box {i} {boxes[i].tolist()} has x2 < x1 or y2 < y1")
        sample.boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    return sample


def keep_classes(dataset: DenseDataset, classes: Sequence[str] | None) -> DenseDataset:
    """Keep only the named classes (``data.classes: [person]``), in the order given.

    Objects of other classes are dropped; their semantic pixels become background (0); ignored pixels stay
    ignored. ``None`` keeps everything.

    Raises:
        DataError: For a name not among ``dataset.names`` (with the closest one).
    """
    if classes is None:
        return dataset
    index = {name: i for i, name in enumerate(dataset.names)}
    missing = [c for c in classes if c not in index]
    if missing:
        close = difflib.get_close_matches(missing[0], dataset.names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"data.classes: {missing[0]!r} is not a class of this data set.{hint} "
            f"It has {len(dataset.names)} classes: {', '.join(dataset.names[:30])}"
            + (" ..." if len(dataset.names) > 30 else "")
        )
    if len(set(classes)) != len(classes):
        raise DataError(f"data.classes names a class twice: {list(classes)}")
    new_label = np.full(len(dataset.names), -1, np.int64)
    for j, name in enumerate(classes):
        new_label[index[name]] = j
    # semantic value v (1..K) -> new value, 0 -> 0, IGNORE -> IGNORE
    lut = np.zeros(max(IGNORE_INDEX, len(dataset.names)) + 1, np.int64)
    lut[1 : len(dataset.names) + 1] = new_label + 1  # dropped classes (-1) become 0
    lut[IGNORE_INDEX] = IGNORE_INDEX
    samples = []
    for s in dataset.samples:
        keep = new_label[s.labels] >= 0 if len(s.labels) else np.zeros(0, bool)
        samples.append(
            replace(
                s,
                boxes=s.boxes[keep],
                labels=new_label[s.labels][keep] if len(s.labels) else s.labels,
                masks=None if s.masks is None else s.masks[keep],
                semantic=None if s.semantic is None else lut[s.semantic],
                crowd=None if s.crowd is None else s.crowd[keep],
            )
        )
    return DenseDataset(list(classes), samples)


def semantic_from_instances(sample: DenseSample) -> np.ndarray:
    """A class map from instance masks (``labels + 1`` where each mask is set, 0 elsewhere; later objects
    are drawn over earlier ones)."""
    if sample.masks is None:
        raise DataError(f"{sample.source}: has no instance masks to make a class mask from")
    semantic = np.zeros((sample.height, sample.width), np.int64)
    for mask, label in zip(sample.masks, sample.labels, strict=True):
        semantic[mask] = int(label) + 1
    return semantic


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (x2, y2 exclusive) of bool masks ``(N, H, W)``; an empty mask gives a zero box."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes
