"""Image classification data as arrays: scikit-learn digits, NPZ and CSV files, single image files.

Every loader returns images as float32 ``(N, C, H, W)`` in the source's own units (0..16 for digits, 0..255
for 8-bit images) together with ``pixel_max``, the top of that range, so the task can normalise once and
apply the same scaling to an image given for prediction. Labels become ``0..K-1``; ``class_names`` keeps
what they were called. Nothing is unpickled: NumPy files are read with ``allow_pickle=False``.

Flat pixel rows (CSV rows, flat arrays) with more than one channel are read channels-last, pixel by pixel
``(H, W, C)``, the order in which a NumPy or Pillow image flattens.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tansuo.errors import DataError

logger = logging.getLogger(__name__)

IMAGES_KEYS = ("x", "images", "X", "data")
LABELS_KEYS = ("y", "labels", "Y", "targets")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv", ".txt")
_CSV_BATCH_LINES = 4096


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


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}; check the path")
    return path


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


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return path.open("r", encoding="utf-8", newline=None)


def _is_numeric_row(line: str) -> bool:
    try:
        [float(field) for field in line.split(",")]
    except ValueError:
        return False
    return True


def _bad_line_error(
    path: Path, numbered: list[tuple[int, str]], num_columns: int, error: Exception
) -> DataError:
    """Find the first line of ``numbered`` that does not parse and describe it."""
    for line_number, line in numbered:
        fields = line.split(",")
        if len(fields) != num_columns:
            return DataError(
                f"{path}, line {line_number}: expected {num_columns} comma-separated values (a label and "
                f"the pixels), found {len(fields)}; fix or remove that line"
            )
        for column, field in enumerate(fields, start=1):
            try:
                float(field)
            except ValueError:
                return DataError(
                    f"{path}, line {line_number}, column {column}: {field.strip()!r} is not a number; "
                    "fix or remove that line"
                )
    return DataError(f"{path}: cannot parse lines {numbered[0][0]}..{numbered[-1][0]} ({error})")


def load_csv_arrays(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int = 1,
    label_column: int = 0,
    has_header: bool | None = None,
    pixel_max: float | None = None,
) -> ImageArrays:
    """Load images stored one per row as comma-separated numbers, like the MNIST CSV files.

    Each row holds a numeric label (in column ``label_column``) and ``channels * image_size**2`` pixels,
    channels-last when there are several channels. Plain ``.csv`` and gzip-compressed ``.csv.gz`` are read;
    parsing is done by NumPy in batches of lines.

    Args:
        path: The CSV file.
        image_size: Side of the square images; inferred from the number of pixels when None.
        channels: Channels per pixel (1, 3 or 4).
        label_column: Index of the label column (negative counts from the end).
        has_header: Whether the first line is a header; detected (a line with a non-number) when None.
        pixel_max: Top of the pixel range; inferred with :func:`infer_pixel_max` when None.

    Returns:
        The data set; labels are mapped with :func:`map_labels`.

    Raises:
        DataError: If the file is missing or empty, a row has the wrong number of values or a non-number
            (naming the line), or the pixel count is not a square image.
    """
    path = _require_file(path, "CSV file")
    batches: list[np.ndarray] = []
    num_columns = 0
    try:
        with _open_text(path) as file:
            numbered: list[tuple[int, str]] = []
            header_checked = False
            parse_state: dict[str, bool] = {}
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                if not header_checked:
                    header_checked = True
                    skip = has_header if has_header is not None else not _is_numeric_row(line)
                    num_columns = len(line.split(","))
                    if skip:
                        logger.debug("%s: skipping header line %d", path, line_number)
                        continue
                numbered.append((line_number, line))
                if len(numbered) == _CSV_BATCH_LINES:
                    batches.append(_parse_csv_batch(path, numbered, num_columns, parse_state))
                    numbered = []
            if numbered:
                batches.append(_parse_csv_batch(path, numbered, num_columns, parse_state))
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read {path} ({error}); pass a UTF-8 .csv or gzip-compressed .csv.gz"
        ) from error
    if not batches:
        raise DataError(f"{path} holds no data rows; each row must be a label followed by pixel values")
    table = np.concatenate(batches)  # (N, columns)
    del batches
    label_index = label_column % num_columns
    raw_labels = table[:, label_index]
    pixels = table[:, 1:] if label_index == 0 else np.delete(table, label_index, axis=1)  # (N, C*H*W)
    num_pixels = pixels.shape[1]
    if image_size is None:
        side = math.isqrt(num_pixels // channels) if num_pixels % channels == 0 else 0
        if side < 1 or channels * side * side != num_pixels:
            raise DataError(
                f"{path}: rows have {num_pixels} pixel values, which is not {channels} channel(s) of a "
                "square image; pass image_size (and channels) to say how to read them"
            )
        image_size = side
    elif channels * image_size * image_size != num_pixels:
        raise DataError(
            f"{path}: rows have {num_pixels} pixel values but image_size={image_size} with {channels} "
            f"channel(s) needs {channels * image_size * image_size}; fix image_size or channels"
        )
    images = pixels.reshape(len(pixels), image_size, image_size, channels)  # (N, H, W, C)
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, C, H, W)
    _check_finite(images, str(path))
    labels, class_names = map_labels(raw_labels, str(path))
    if len(class_names) == 1 and len(labels) > 1:
        logger.warning(
            "%s: all rows have label %s in column %d; "
            "if the label is in another column (e.g. the last), pass label_column",
            path,
            class_names[0],
            label_column,
        )
    pixel_max = infer_pixel_max(images) if pixel_max is None else float(pixel_max)
    logger.info("%s: %d images of %s, %d classes", path, len(images), images.shape[1:], len(class_names))
    return ImageArrays(images, labels, class_names, pixel_max)


def _parse_csv_batch(
    path: Path, numbered: list[tuple[int, str]], num_columns: int, state: dict[str, bool]
) -> np.ndarray:
    """Parse lines to a float32 table; whole numbers are parsed as integers first, which is ~5x faster."""
    lines = [line for _, line in numbered]
    try:
        if state.get("integers", True):
            try:
                table = np.loadtxt(lines, delimiter=",", dtype=np.int64, ndmin=2).astype(np.float32)
            except ValueError:
                state["integers"] = False  # e.g. "0.5": parse this and later batches as floats
        if not state.get("integers", True):
            table = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2).astype(np.float32)
    except ValueError as error:
        raise _bad_line_error(path, numbered, num_columns, error) from error
    if table.shape[1] != num_columns:
        raise _bad_line_error(path, numbered, num_columns, ValueError("column count"))
    return table


def load_image_file(path: str | Path, *, image_size: int, channels: int, pixel_max: float) -> np.ndarray:
    """Read one image to predict on, as the model's input expects it.

    Picture files (PNG, JPEG, BMP, GIF, TIFF, WebP) are converted to grey (1 channel), RGB (3) or RGBA (4),
    resized to ``image_size`` x ``image_size`` with a bilinear filter (aspect ratio not kept) and scaled from
    0..255 to 0..``pixel_max``. Array files are taken as already in the source's units: ``.npy``, ``.npz``
    (its first array), ``.csv``/``.txt`` (numbers separated by commas or whitespace, one row or a grid), of
    shape (H, W) for one channel, (C, H, W), (H, W, C) or flat ``H*W*C`` (channels-last).

    Args:
        path: The image file.
        image_size: Side the model expects.
        channels: Channels the model expects (1, 3 or 4).
        pixel_max: Top of the training data's pixel range.

    Returns:
        (C, H, W) float32.

    Raises:
        DataError: If the file is missing, of an unknown type, unreadable, or of the wrong size.
    """
    path = _require_file(path, "image file")
    if channels not in (1, 3, 4):
        raise DataError(f"images must have 1, 3 or 4 channels, got {channels}")
    suffix = path.suffix.lower()
    if suffix in PILLOW_SUFFIXES:
        return _load_picture(path, image_size, channels, pixel_max)
    if suffix not in ARRAY_SUFFIXES:
        raise DataError(
            f"{path}: unknown image file type '{suffix}'; supported are "
            f"{', '.join(PILLOW_SUFFIXES + ARRAY_SUFFIXES)}"
        )
    try:
        if suffix in (".csv", ".txt"):
            text = path.read_text(encoding="utf-8").replace(",", " ")
            array = np.array(text.split(), dtype=np.float64)
        else:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    if not loaded.files:
                        raise DataError(f"{path} is an empty .npz archive; save the image array in it")
                    array = loaded[loaded.files[0]]
            else:
                array = loaded
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as error:
        raise DataError(
            f"cannot read {path} as an image array ({error}); save numbers with numpy.save, or write them "
            "as comma-separated text (Python objects are never loaded)"
        ) from error
    return image_from_array(array, image_size=image_size, channels=channels, name=str(path))


def _image_to_chw(array: np.ndarray, size: int, channels: int, path: Path | str) -> np.ndarray:
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 1 and array.size == channels * size * size:
        array = array.reshape(size, size, channels)
    if array.ndim == 2 and channels == 1 and array.shape == (size, size):
        array = array[None]
    if array.ndim == 3 and array.shape == (size, size, channels) and array.shape != (channels, size, size):
        array = array.transpose(2, 0, 1)
    if array.shape != (channels, size, size):
        hw = f", ({size}, {size})" if channels == 1 else ""
        raise DataError(
            f"{path} holds an array of shape {array.shape}; expected an image of shape ({channels}, {size}, "
            f"{size}), ({size}, {size}, {channels}){hw} or {channels * size * size} numbers"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def decode_picture(data: bytes, *, image_size: int, channels: int, pixel_max: float, name: str) -> np.ndarray:
    """A picture file's bytes (PNG, JPEG, BMP, ...) as the model's input, as :func:`load_image_file` reads
    a picture file; ``name`` says which input it is in error messages. Returns (C, H, W) float32."""
    if channels not in (1, 3, 4):
        raise DataError(f"images must have 1, 3 or 4 channels, got {channels}")
    return _load_picture(io.BytesIO(data), image_size, channels, pixel_max, name=name)


def image_from_array(array: np.ndarray, *, image_size: int, channels: int, name: str) -> np.ndarray:
    """An array of pixel values in the training data's units as the model's input (shapes as
    :func:`load_image_file` accepts them); ``name`` says which input it is in error messages."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name} holds {array.dtype} values; an image must be numbers")
    image = _image_to_chw(array, image_size, channels, name)
    if not np.all(np.isfinite(image)):
        raise DataError(f"{name} holds NaN or infinite values; an image must be finite numbers")
    return image


def _load_picture(
    source: Path | io.BytesIO, size: int, channels: int, pixel_max: float, name: str | None = None
) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only when a picture is read

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    try:
        with Image.open(source) as picture:
            picture = picture.convert(mode)
            if picture.size != (size, size):
                picture = picture.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(picture, dtype=np.float32)  # (H, W) or (H, W, C)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        reason = "not a picture format Pillow reads" if isinstance(error, UnidentifiedImageError) else error
        raise DataError(
            f"cannot read {name or source} as a picture ({reason}); use a PNG, JPEG or BMP file"
        ) from error
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
    return np.ascontiguousarray(array * (pixel_max / 255.0), dtype=np.float32)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random whole-pixel offset, filling the uncovered border with zeros.

    Offsets ``(dy, dx)`` are drawn uniformly from ``[-max_shift, max_shift]`` per image with
    ``torch.randint(-max_shift, max_shift + 1, (B, 2), generator=generator)``; output pixel ``(y, x)`` is
    input pixel ``(y - dy, x - dx)`` or zero outside the image. Vectorised: pad, then gather.

    Args:
        x: (B, C, H, W) images.
        max_shift: Largest shift in pixels; 0 returns ``x`` itself.
        generator: Random source, on the CPU or on ``x``'s device.

    Returns:
        (B, C, H, W) shifted images.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return x
    batch, channels, height, width = x.shape
    shifts = torch.randint(
        -max_shift, max_shift + 1, (batch, 2), generator=generator, device=generator.device
    )
    shifts = shifts.to(x.device)
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))  # (B, C, H+2m, W+2m)
    rows = torch.arange(height, device=x.device) + max_shift - shifts[:, :1]  # (B, H)
    cols = torch.arange(width, device=x.device) + max_shift - shifts[:, 1:]  # (B, W)
    batch_index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
