"""A synthetic-from-real dense-vision set: handwritten digits pasted on a black canvas (``mnist-canvas``).

Each canvas holds a seeded random number of digits, each at a seeded random scale and position, placed so
that no two digits' boxes overlap (as in multi-digit MNIST detection sets). Every digit gives a tight box,
an instance mask (its pixels brighter than ``threshold``) and the semantic class ``digit + 1`` on those
pixels (0 is background). The digits come from an MNIST CSV (``../shared/data/mnist-5k``: 784 pixels then
the label, read by :func:`~tansuo.data.image_csv.load_csv_arrays`) or from arrays (tests make their own).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tansuo.data.dense import DenseDataset, DenseSample, boxes_from_masks
from tansuo.data.splits import split_indices
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

DIGIT_NAMES = [str(d) for d in range(10)]


def load_digit_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Digits of an MNIST CSV (``.csv`` or ``.csv.gz``, label in the last column), or of the one such
    file in a folder.

    Returns:
        uint8 ``(M, H, W)`` images (0..255) and int64 ``(M,)`` labels 0..9.
    """
    from tansuo.data.image_csv import load_csv_arrays

    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted([*path.glob("*.csv"), *path.glob("*.csv.gz")])
        if len(found) != 1:
            raise DataError(f"{path} should hold one MNIST .csv or .csv.gz file, found {len(found)}")
        path = found[0]
    arrays = load_csv_arrays(path, label_column=-1, pixel_max=255.0)
    images = np.clip(arrays.images[:, 0], 0, 255).astype(np.uint8)  # (M, H, W)
    labels = np.array([int(arrays.class_names[i]) for i in arrays.labels], np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: labels must be digits 0..9, found {labels.min()}..{labels.max()}")
    return images, labels


def digit_pools(path: str | Path, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits of an MNIST CSV (:func:`load_digit_arrays`) split 80/10/10 by ``seed``: the train,
    validation and test pools, so canvases of different splits never share a digit."""
    images, labels = load_digit_arrays(path)
    return [(images[i], labels[i]) for i in split_indices(len(labels), (0.8, 0.1, 0.1), seed)]


def _resize(digit: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR), np.uint8)


def mnist_canvas(
    digits: tuple[np.ndarray, np.ndarray],
    n: int,
    *,
    size: int = 64,
    seed: int = 0,
    digits_per_image: tuple[int, int] = (1, 3),
    scale: tuple[float, float] = (0.75, 1.5),
    threshold: int = 128,
    max_tries: int = 30,
    log: bool = True,
) -> DenseDataset:
    """Make ``n`` canvases from ``digits`` (a pure function of the arguments).

    Args:
        digits: uint8 (M, h, w) digit images (0..255, white on black) and int64 (M,) labels 0..9.
        n: Number of canvases.
        size: Canvas side in pixels.
        seed: Seed of every draw.
        digits_per_image: Inclusive range of digits per canvas (fewer when one does not fit).
        scale: Range of a digit's scale relative to its own side (uniform).
        threshold: Pixel value above which a digit pixel belongs to its mask.
        max_tries: Positions tried per digit before it is left out.
        log: Log what was made (off for the canvases drawn afresh for each training batch).

    Returns:
        The canvases with names ``"0"`` .. ``"9"``: RGB images (grey), boxes, labels, masks and class maps.
    """
    images, labels = digits
    if images.ndim != 3 or len(images) != len(labels) or not len(images):
        raise DataError(
            f"digits must be (M, H, W) images and (M,) labels, got {images.shape}, {labels.shape}"
        )
    low, high = digits_per_image
    if not 0 <= low <= high:
        raise DataError(f"digits_per_image must be a range low <= high, got {digits_per_image}")
    side0 = max(images.shape[1:])
    if int(round(side0 * scale[0])) > size:
        raise DataError(f"digits of side {side0} at scale {scale[0]} do not fit a {size}-pixel canvas")
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        canvas = np.zeros((size, size), np.uint8)
        semantic = np.zeros((size, size), np.uint8)
        boxes: list[np.ndarray] = []
        masks, classes = [], []
        for _ in range(int(rng.integers(low, high + 1))):
            k = int(rng.integers(len(images)))
            side = min(size, max(4, int(round(side0 * rng.uniform(*scale)))))
            digit = _resize(images[k], side)
            mask_small = digit > threshold
            if not mask_small.any():
                continue
            tight = boxes_from_masks(mask_small[None])[0]  # within the pasted square
            for _try in range(max_tries):
                y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = tight + np.array([x, y, x, y], np.float32)
                if all(_disjoint(box, other) for other in boxes):
                    break
            else:
                continue
            region = canvas[y : y + side, x : x + side]
            np.maximum(region, digit, out=region)
            mask = np.zeros((size, size), bool)
            mask[y : y + side, x : x + side] = mask_small
            semantic[mask] = labels[k] + 1
            boxes.append(box)
            masks.append(mask)
            classes.append(int(labels[k]))
        samples.append(
            DenseSample(
                source=f"mnist-canvas #{i} (seed {seed})",
                image=np.repeat(canvas[:, :, None], 3, axis=2),
                boxes=np.array(boxes, np.float32).reshape(-1, 4),
                labels=np.array(classes, np.int64),
                masks=np.stack(masks) if masks else np.zeros((0, size, size), bool),
                semantic=semantic,
            )
        )
    (logger.info if log else logger.debug)(
        "mnist-canvas: %d canvases of %dx%d, %d digits",
        n,
        size,
        size,
        sum(map(len, [s.labels for s in samples])),
    )
    return DenseDataset(list(DIGIT_NAMES), samples)


def _disjoint(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])
