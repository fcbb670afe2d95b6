"""One image to predict on: a picture file (PNG, JPEG, ...), its bytes, an array file or an array, as the
model's input, (C, H, W) float32 in the training data's units. Nothing is unpickled: NumPy files are read
with ``allow_pickle=False``.

Flat arrays with more than one channel are read channels-last, pixel by pixel ``(H, W, C)``, the order in
which a NumPy or Pillow image flattens.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from tansuo.errors import DataError

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv", ".txt")


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}; check the path")
    return path


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
