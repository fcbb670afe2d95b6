"""Image arrays from digits, NPZ and CSV; single image files; random shifts."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tansuo.data import (
    ImageArrays,
    infer_pixel_max,
    load_csv_arrays,
    load_digits_arrays,
    load_image_file,
    load_npz_arrays,
    random_shift,
)
from tansuo.errors import DataError


def _images(n: int = 6, channels: int = 1, size: int = 4) -> np.ndarray:
    """(N, C, H, W) integers 0..255, every pixel different so layouts cannot be confused."""
    return (np.arange(n * channels * size * size).reshape(n, channels, size, size) % 256).astype(np.uint8)


def test_digits() -> None:
    data = load_digits_arrays()
    assert isinstance(data, ImageArrays)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == np.float32
    assert data.labels.shape == (1797,) and data.labels.dtype == np.int64
    assert data.images.min() == 0 and data.images.max() == 16 and data.pixel_max == 16
    assert data.class_names == [str(i) for i in range(10)] and data.num_classes == 10
    assert set(data.labels.tolist()) == set(range(10))
    assert data.image_shape == (1, 8, 8)


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    channels = 1 if layout == "NHW" else 3
    expected = _images(channels=channels)  # (N, C, H, W)
    stored = {"NHW": expected[:, 0], "NHWC": expected.transpose(0, 2, 3, 1), "NCHW": expected}[layout]
    path = tmp_path / "data.npz"
    np.savez(path, images=stored, labels=np.array([0, 1, 2, 0, 1, 2]))
    data = load_npz_arrays(path)
    np.testing.assert_array_equal(data.images, expected.astype(np.float32))
    assert data.images.dtype == np.float32 and data.image_shape == (channels, 4, 4)
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2] and data.class_names == ["0", "1", "2"]
    assert data.pixel_max == 255.0


def test_npz_string_and_sparse_labels(tmp_path: Path) -> None:
    path = tmp_path / "named.npz"
    np.savez(path, x=_images(), y=np.array(["dog", "cat", "dog", "eel", "cat", "cat"]))
    data = load_npz_arrays(path)
    assert data.class_names == ["cat", "dog", "eel"]
    assert data.labels.tolist() == [1, 0, 1, 2, 0, 0] and data.labels.dtype == np.int64
    np.savez(path, X=_images(), Y=np.array([7, 3, 7, 3, 9, 9]))  # other key names, arbitrary ints
    data = load_npz_arrays(path)
    assert data.class_names == ["3", "7", "9"] and data.labels.tolist() == [1, 0, 1, 0, 2, 2]
    np.savez(path, a=_images(), b=np.array([0, 1, 0, 1, 0, 1]), class_names=np.array(["no", "yes", "maybe"]))
    data = load_npz_arrays(path, images_key="a", labels_key="b", pixel_max=1.0)
    assert data.class_names == ["no", "yes", "maybe"] and data.num_classes == 3 and data.pixel_max == 1.0


def test_npz_refuses_pickle(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    labels = np.empty(2, dtype=object)
    labels[:] = [{"a": 1}, {"b": 2}]
    np.savez(path, x=np.zeros((2, 4, 4)), y=labels)
    with pytest.raises(DataError, match="never loaded"):
        load_npz_arrays(path)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_npz_arrays(tmp_path / "missing.npz")
    path = tmp_path / "keys.npz"
    np.savez(path, pictures=_images(), y=np.zeros(6))
    with pytest.raises(DataError, match=r"its arrays are \['pictures', 'y'\]; pass images_key"):
        load_npz_arrays(path)
    np.savez(path, x=_images(), y=np.zeros(5))
    with pytest.raises(DataError, match="6 images .* but 5 labels"):
        load_npz_arrays(path)
    np.savez(path, x=np.zeros((6, 5, 5, 7)), y=np.zeros(6))
    with pytest.raises(DataError, match="expected \\(N, H, W\\)"):
        load_npz_arrays(path)
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz_arrays(not_zip)


def test_infer_pixel_max() -> None:
    assert infer_pixel_max(np.array([0.0, 0.5, 1.0])) == 1.0
    assert infer_pixel_max(np.array([0.0, 16.0])) == 16.0
    assert infer_pixel_max(np.array([0.0, 14.2])) == 16.0
    assert infer_pixel_max(np.array([0, 200])) == 255.0
    assert infer_pixel_max(np.array([0, 4000])) == 65535.0


def _write_csv(path: Path, rows: np.ndarray, header: bool) -> None:
    lines = [",".join(["label"] + [f"pixel{i}" for i in range(rows.shape[1] - 1)])] if header else []
    lines += [",".join(str(v) for v in row) for row in rows.tolist()]
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as file:
            file.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(("name", "header"), [("a.csv", True), ("b.csv", False), ("c.csv.gz", True)])
def test_csv(tmp_path: Path, name: str, header: bool) -> None:
    images = _images(n=5, size=3)
    labels = np.array([4, 0, 4, 1, 0])
    path = tmp_path / name
    _write_csv(path, np.concatenate([labels[:, None], images.reshape(5, -1)], axis=1), header)
    data = load_csv_arrays(path)
    np.testing.assert_array_equal(data.images, images)
    assert data.class_names == ["0", "1", "4"] and data.labels.tolist() == [2, 0, 2, 1, 0]
    assert data.pixel_max == 255.0


def test_csv_label_column_channels_and_floats(tmp_path: Path) -> None:
    images = _images(n=3, channels=3, size=2) / 255.0  # (N, C, H, W), fractional values
    flat = images.transpose(0, 2, 3, 1).reshape(3, -1)  # channels-last rows
    path = tmp_path / "rgb.csv"
    _write_csv(path, np.concatenate([flat, np.array([[1], [0], [1]])], axis=1), header=False)
    data = load_csv_arrays(path, channels=3, label_column=-1, image_size=2)
    np.testing.assert_allclose(data.images, images, rtol=1e-6)
    assert data.labels.tolist() == [1, 0, 1] and data.pixel_max == 1.0


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("label,p0,p1,p2,p3\n1,0,0,0,0\n2,0,0,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv, line 3: expected 5 comma-separated values .* found 4"):
        load_csv_arrays(path)
    path.write_text("1,0,0,0,0\n\n2,0,x,0,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv, line 3, column 3: 'x' is not a number"):
        load_csv_arrays(path, has_header=False)
    path.write_text("1,0,0,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="not 1 channel.*pass image_size"):
        load_csv_arrays(path)
    with pytest.raises(DataError, match="image_size=2 with 1 channel.*needs 4"):
        load_csv_arrays(path, image_size=2)
    path.write_text("label,p0\n", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        load_csv_arrays(path)


def test_image_file_png(tmp_path: Path) -> None:
    pixels = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    image = load_image_file(tmp_path / "grey.png", image_size=2, channels=1, pixel_max=16.0)
    assert image.shape == (1, 2, 2) and image.dtype == np.float32
    np.testing.assert_allclose(image[0], pixels / 255.0 * 16.0, rtol=1e-6)
    big = np.full((20, 30, 3), 200, dtype=np.uint8)
    Image.fromarray(big, mode="RGB").save(tmp_path / "big.jpg")
    image = load_image_file(tmp_path / "big.jpg", image_size=8, channels=1, pixel_max=255.0)
    assert image.shape == (1, 8, 8)
    np.testing.assert_allclose(image, 200.0, atol=2.0)  # resized and turned grey
    image = load_image_file(tmp_path / "big.jpg", image_size=4, channels=3, pixel_max=1.0)
    assert image.shape == (3, 4, 4) and 0.7 < image.mean() < 0.8


def test_image_file_arrays(tmp_path: Path) -> None:
    expected = _images(n=1, channels=3, size=4)[0].astype(np.float32)  # (C, H, W)
    np.save(tmp_path / "chw.npy", expected)
    np.save(tmp_path / "hwc.npy", expected.transpose(1, 2, 0))
    np.savez(tmp_path / "one.npz", image=expected.reshape(1, 3, 4, 4))
    (tmp_path / "flat.csv").write_text(
        ",".join(map(str, expected.transpose(1, 2, 0).ravel())), encoding="utf-8"
    )
    for name in ["chw.npy", "hwc.npy", "one.npz", "flat.csv"]:
        image = load_image_file(tmp_path / name, image_size=4, channels=3, pixel_max=255.0)
        np.testing.assert_array_equal(image, expected)
    grid = np.arange(9, dtype=np.float32).reshape(3, 3)
    (tmp_path / "grid.txt").write_text("\n".join(" ".join(map(str, row)) for row in grid), encoding="utf-8")
    image = load_image_file(tmp_path / "grid.txt", image_size=3, channels=1, pixel_max=16.0)
    np.testing.assert_array_equal(image, grid[None])


def test_image_file_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((3, 3)))
    with pytest.raises(DataError, match=r"shape \(3, 3\); expected an image of shape \(1, 8, 8\)"):
        load_image_file(tmp_path / "small.npy", image_size=8, channels=1, pixel_max=16.0)
    (tmp_path / "image.gif2").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown image file type '.gif2'; supported are .png"):
        load_image_file(tmp_path / "image.gif2", image_size=8, channels=1, pixel_max=16.0)
    (tmp_path / "fake.png").write_text("not a picture", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read .*fake.png as a picture"):
        load_image_file(tmp_path / "fake.png", image_size=8, channels=1, pixel_max=16.0)
    (tmp_path / "words.csv").write_text("1,2,three", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read .*words.csv"):
        load_image_file(tmp_path / "words.csv", image_size=8, channels=1, pixel_max=16.0)
    objects = np.empty(1, dtype=object)
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match="never loaded"):
        load_image_file(tmp_path / "objects.npy", image_size=8, channels=1, pixel_max=16.0)
    with pytest.raises(DataError, match="not found"):
        load_image_file(tmp_path / "missing.png", image_size=8, channels=1, pixel_max=16.0)


def _manual_shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """torch.roll, then zero the rows and columns that wrapped around."""
    out = torch.roll(image, shifts=(dy, dx), dims=(-2, -1)).clone()
    if dy > 0:
        out[..., :dy, :] = 0
    elif dy < 0:
        out[..., dy:, :] = 0
    if dx > 0:
        out[..., :, :dx] = 0
    elif dx < 0:
        out[..., :, dx:] = 0
    return out


def test_random_shift() -> None:
    x = torch.arange(1, 1 + 16 * 2 * 5 * 6, dtype=torch.float32).reshape(16, 2, 5, 6)
    assert random_shift(x, 0, torch.Generator().manual_seed(0)) is x
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    offsets = torch.randint(-2, 3, (16, 2), generator=torch.Generator().manual_seed(0))  # the documented draw
    assert len({tuple(row) for row in offsets.tolist()}) > 1
    for image, result, (dy, dx) in zip(x, shifted, offsets.tolist(), strict=True):
        torch.testing.assert_close(result, _manual_shift(image, dy, dx))
    again = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    assert not torch.equal(shifted, random_shift(x, 2, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError):
        random_shift(x, -1, torch.Generator())
