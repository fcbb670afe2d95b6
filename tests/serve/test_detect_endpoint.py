"""``POST /v1/detect`` in process: the task's own answers, the cap on detections, bad input as 4xx."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tansuo.bundle import load_bundle, save_bundle
from tansuo.data.dense import read_image
from tansuo.models import create_model
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tests.helpers import detect_recipe, task_from, write_yolo_boxes

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained detector bundle (serving does not care whether it learned) and a picture."""
    folder = tmp_path_factory.mktemp("detect-serve")
    task = task_from(detect_recipe(write_yolo_boxes(folder / "d", train=2, val=1), folder / "run"))
    torch.manual_seed(0)
    model = create_model("resnet_det_test", **task.model_overrides())
    model.model_name = "resnet_det_test"
    return save_bundle(folder / "bundle", model, task), folder / "d" / "images" / "val" / "000.png"


def _client(bundle: Path, limits: Limits | None = None) -> TestClient:
    return TestClient(create_app(Server(load_bundle(bundle), ServeConfig(limits=limits or Limits()), CPU)))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_detect_answers_as_predict_does(bundle: tuple[Path, Path]) -> None:
    folder, picture = bundle
    b = load_bundle(folder)
    want = b.task.predict_images(b.model, [read_image(picture)], ["x"], CPU, 0.0, 5, 0.6)[0]
    with _client(folder, Limits(max_detections=5)) as c:
        r = c.post(
            "/v1/detect", json={"image": "data:image/png;base64," + _b64(picture), "score_threshold": 0}
        )
        card = c.get("/v1/model").json()
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["width"], got["height"]) == (48, 40)
    assert len(got["detections"]) == 5  # the server's cap is the default
    assert [d["box"] for d in got["detections"]] == [d["box"] for d in want["detections"]]
    assert [d["score"] for d in got["detections"]] == pytest.approx([d["score"] for d in want["detections"]])
    assert "red" in str(card)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"image": "not base64!"}, 422, "base64"),
        ({"image": base64.b64encode(b"GIF89a truncated").decode()}, 422, "image"),
        ({"image": "", "score_threshold": 2}, 422, "score_threshold"),
        ({"image": "", "max_detections": 500}, 422, "--max-detections"),
        ({"image": "", "colour": "red"}, 422, "colour"),
    ],
)
def test_bad_input_is_a_4xx_saying_why(bundle: tuple[Path, Path], body: dict, status: int, says: str) -> None:
    folder, picture = bundle
    body = {**body, "image": body["image"] or _b64(picture)}
    with _client(folder) as c:
        r = c.post("/v1/detect", json=body)
    assert r.status_code == status, r.text
    assert says in r.text
