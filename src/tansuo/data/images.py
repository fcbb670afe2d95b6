"""Image classification data as arrays: the labelled set in memory, label mapping, scikit-learn digits and
NPZ files. CSV files are read by :mod:`tansuo.data.image_csv`, single images to predict on by
:mod:`tansuo.data.pictures`.

Every loader returns images as float32 ``(N, C, H, W)`` in the source's own units (0..16 for digits, 0..255
for 8-bit images) together with ``pixel_max``, the top of that range, so the task can normalise once and
apply the same scaling to an image given for prediction. Labels become ``0..K-1``; ``class_names`` keeps
what they were called. Nothing is unpickled: NumPy files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tansuo.data.pictures import _require_file

# Moved to tansuo.data.pictures; still importable from here (tansuo.serve.endpoints.image does).
from tansuo.data.pictures import decode_picture as decode_picture
from tansuo.data.pictures import image_from_array as image_from_array
from tansuo.data.pictures import load_image_file as load_image_file
from tansuo.errors import DataError

logger = logging.getLogger(__name__)

IMAGES_KEYS = ("x", "images", "X", "data")
LABELS_KEYS = ("y", "labels", "Y", "targets")


@dataclass
class ImageArrays:
    """A labelled image data set held in memory.

    Attributes:
        images: (N, C, H, W) float32 in the source's units.
        labels: (N,) int64 class ids in ``0..num_classes-1``.
        class_names: Name of each class id.
        pixel_max: The largest value a pixel can take in the source's units (16, 255, 1.0, ...).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    pixel_max: float

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, channels, height, width = self.images.shape
        return channels, height, width


def infer_pixel_max(images: np.ndarray) -> float:
    """Guess the top of the pixel range from the data: the first of 1, 16, 255, 65535 not below its maximum.

    16 is the scikit-learn digits range, 255 that of 8-bit images. A maximum above 65535 is returned as it is.
    Pass ``pixel_max`` to a loader to override the guess.
    """
    if images.size == 0:
        return 1.0
    top = float(images.max())
    for limit in (1.0, 16.0, 255.0, 65535.0):
        if top <= limit:
            return limit
    return top


def map_labels(
    raw: np.ndarray, source: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Turn raw labels into ids ``0..K-1`` and class names.

    Labels are replaced by their index in the sorted list of distinct values, whose string forms become the
    class names; labels that are already ``0..K-1`` keep their ids. When ``class_names`` is given (e.g. an
    NPZ's ``class_names`` array), integer labels index into it as they are.

    Args:
        raw: (N,) labels: integers, whole-number floats, booleans or strings.
        source: File named in error messages.
        class_names: Known names of ids ``0..len-1``.

    Returns:
        ``(labels, class_names)`` with labels int64.
    """
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise DataError(f"{source}: labels must be one value per image, got an array of shape {raw.shape}")
    if raw.dtype.kind == "S":
        raw = raw.astype(str)
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise DataError(f"{source}: labels hold NaN or infinite values; every image needs a class label")
    integral = raw.dtype.kind in "biu" or (raw.dtype.kind == "f" and bool(np.all(raw == np.round(raw))))
    if class_names is not None:
        if not integral:
            raise DataError(f"{source}: with class_names in the file, labels must be integer class ids")
        ids = raw.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(class_names)):
            raise DataError(
                f"{source}: labels range over {ids.min()}..{ids.max()} but class_names has "
                f"{len(class_names)} names; labels must be ids 0..{len(class_names) - 1}"
            )
        return ids, list(class_names)
    if raw.dtype.kind not in "biufU":
        raise DataError(f"{source}: labels of type {raw.dtype} are not supported; use integers or strings")
    values = raw.astype(np.int64) if integral else raw
    uniques, ids = np.unique(values, return_inverse=True)
    return ids.astype(np.int64).reshape(-1), [str(value) for value in uniques.tolist()]


def load_digits_arrays() -> ImageArrays:
    """scikit-learn's bundled handwritten digits (no network): 1797 images of 1x8x8, pixels 0..16.

    Returns:
        The data set with class names ``"0"`` to ``"9"`` and ``pixel_max`` 16.
    """
    from sklearn.datasets import load_digits  # heavy import, only when asked for

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    return ImageArrays(images, labels, [str(i) for i in range(10)], pixel_max=16.0)


def _to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W) float32, C in 1, 3, 4."""
    channel_counts = (1, 3, 4)
    if images.ndim == 3:
        return images.astype(np.float32)[:, None]
    if images.ndim == 4:
        first, last = images.shape[1] in channel_counts, images.shape[3] in channel_counts
        if first and last:  # tiny images: prefer the reading whose image is square
            last = images.shape[1] == images.shape[2] and images.shape[2] != images.shape[3]
            first = not last
        if last:
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        if first:
            return images.astype(np.float32)
    raise DataError(
        f"{source}: images have shape {images.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
        "with C = 1, 3 or 4 channels"
    )


def _check_finite(images: np.ndarray, source: str) -> None:
    if not np.all(np.isfinite(images)):
        bad = int(np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))[0])
        raise DataError(f"{source}: image {bad} holds NaN or infinite pixels; fix or remove it")


def load_npz_arrays(
    path: str | Path,
    *,
    images_key: str | None = None,
    labels_key: str | None = None,
    pixel_max: float | None = None,
) -> ImageArrays:
    """Load a labelled image set from a NumPy ``.npz`` file (never unpickling anything).

    Args:
        path: The ``.npz`` file.
        images_key: Array holding the images; found among ``x, images, X, data`` when None.
        labels_key: Array holding the labels; found among ``y, labels, Y, targets`` when None.
        pixel_max: Top of the pixel range; inferred with :func:`infer_pixel_max` when None.

    Returns:
        The data set. Images may be (N, H, W), (N, H, W, C) or (N, C, H, W); labels may be integers or
        strings (see :func:`map_labels`); an optional ``class_names`` string array names integer labels.

    Raises:
        DataError: If the file is missing or unreadable, holds object arrays, lacks the arrays, or the arrays
            do not fit together.
    """
    path = _require_file(path, "NPZ file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}); save it with numpy.savez") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive; save images and labels with numpy.savez"
        )
    with archive:
        keys = list(archive.files)
        images_key = _pick_key(keys, images_key, IMAGES_KEYS, "images", path)
        labels_key = _pick_key(keys, labels_key, LABELS_KEYS, "labels", path)
        try:
            raw_images = archive[images_key]
            raw_labels = archive[labels_key]
            names = archive["class_names"] if "class_names" in keys else None
        except ValueError as error:  # object arrays need pickle, which we refuse
            raise DataError(
                f"{path} holds Python objects (pickled arrays), which are never loaded for safety; "
                "save plain numeric images and numeric or string labels"
            ) from error
    if len(raw_images) != len(raw_labels):
        raise DataError(
            f"{path}: {len(raw_images)} images in '{images_key}' but {len(raw_labels)} labels in "
            f"'{labels_key}'; each image needs one label"
        )
    if raw_images.dtype.kind not in "biuf":
        raise DataError(f"{path}: images in '{images_key}' have type {raw_images.dtype}; expected numbers")
    images = _to_nchw(raw_images, str(path))
    _check_finite(images, str(path))
    class_names = [str(name) for name in names.tolist()] if names is not None else None
    labels, class_names = map_labels(raw_labels, str(path), class_names)
    pixel_max = infer_pixel_max(images) if pixel_max is None else float(pixel_max)
    logger.info("%s: %d images of %s, %d classes", path, len(images), images.shape[1:], len(class_names))
    return ImageArrays(images, labels, class_names, pixel_max)


def _pick_key(keys: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise DataError(f"{path} has no array '{wanted}'; its arrays are {keys}")
        return wanted
    for key in candidates:
        if key in keys:
            return key
    raise DataError(
        f"{path} has no {what} array named one of {list(candidates)}; its arrays are {keys}; "
        f"pass {what}_key to choose one"
    )
