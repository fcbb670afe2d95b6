"""``POST /v1/segment`` in process: the task's own masks as PNG and RLE, and bad pictures as 4xx."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tansuo.bundle import load_bundle, save_bundle
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tansuo.tasks import TASKS
from tests.helpers import segment_recipe, write_digits_csv

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained U-Net bundle on tiny canvases (serving does not care whether it learned anything)."""
    folder = tmp_path_factory.mktemp("segment-serve")
    raw = segment_recipe(write_digits_csv(folder / "digits.csv"), folder / "run", model="unet_test")
    recipe, data = validate_recipe(raw)
    task = TASKS["segment"].from_recipe(data, recipe.seed, folder / "data")
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **task.model_overrides())
    model.model_name = recipe.model.name
    return save_bundle(folder / "bundle", model, task)


def _client(bundle: Path, limits: Limits | None = None) -> TestClient:
    return TestClient(create_app(Server(load_bundle(bundle), ServeConfig(limits=limits or Limits()), CPU)))


def _picture(height: int = 20, width: int = 30, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_segment_answers_as_the_task_does(bundle: Path) -> None:
    from pycocotools import mask as mask_utils

    b = load_bundle(bundle)
    image = np.asarray(Image.open(io.BytesIO(_picture())).convert("RGB"))
    want = b.task.segment_images(b.model, [image], CPU)[0]
    with _client(bundle) as c:
        png = c.post("/v1/segment", json={"inputs": {"image": "data:image/png;base64," + _b64(_picture())}})
        rle = c.post("/v1/segment", json={"inputs": [{"image": _b64(_picture())}], "mask_format": "rle"})
        card = c.get("/v1/model").json()
    assert png.status_code == 200 and rle.status_code == 200
    answer = png.json()
    assert answer["classes"] == b.task.class_names
    got = answer["predictions"][0]
    assert (got["height"], got["width"]) == (20, 30)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask_png"]))))  # palette indices = ids
    np.testing.assert_array_equal(mask, want)
    assert got["areas"] == pytest.approx(b.task.areas(want))
    for name, encoded in rle.json()["predictions"][0]["mask_rle"].items():
        decoded = mask_utils.decode({"size": encoded["size"], "counts": encoded["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), want == b.task.class_names.index(name))
    assert (
        card["endpoint"] == "/v1/segment" and card["input"] == "image" and card["labels"][0] == "background"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": {"image": "%%%"}}, 422, "not valid base64"),
        ({"inputs": {"image": _b64(b"hello, not a picture")}}, 422, "not a picture"),
        ({"inputs": {"image": _b64(_picture(fmt="JPEG")[:300])}}, 422, "truncated"),
        ({"inputs": {"image": _b64(_picture(fmt="JPEG")[:900])}}, 422, "truncated"),  # header intact
        ({"inputs": {"image": _b64(_picture(200, 100))}}, 413, "200 = 20,000 pixels; at most 10,000"),
        ({"inputs": []}, 422, "inputs is empty"),
        ({"inputs": [{"image": _b64(_picture())}] * 5}, 413, "at most 4"),
        ({"inputs": {"image": _b64(_picture())}, "mask_format": "gif"}, 422, "mask_format"),
        ({"inputs": {"pixels": [[0]]}}, 422, "pixels"),
    ],
)
def test_bad_pictures_are_4xx(bundle: Path, body: dict, status: int, message: str) -> None:
    with _client(bundle, Limits(max_pixels=10_000, max_items=4)) as c:
        r = c.post("/v1/segment", json=body)
        ok = c.post("/v1/segment", json={"inputs": {"image": _b64(_picture())}})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert ok.status_code == 200  # the server keeps serving


def test_a_body_over_the_limit_is_refused(bundle: Path) -> None:
    with _client(bundle, Limits(max_body_bytes=2_000)) as c:
        r = c.post("/v1/segment", json={"inputs": {"image": _b64(_picture(60, 60))}})
    assert r.status_code == 413
