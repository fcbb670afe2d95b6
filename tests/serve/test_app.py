"""The HTTP server in process (FastAPI's TestClient): every task's endpoint, errors, auth, metrics, card."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tansuo.bundle import load_bundle, save_bundle
from tansuo.errors import TansuoError
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tansuo.tasks import TASKS
from tests.helpers import classify_recipe, image_recipe, lm_recipe, mlm_recipe, run

CPU = torch.device("cpu")


def untrained_bundle(raw: dict, out: Path, scale: float = 1.0) -> Path:
    """A bundle of a freshly initialised model (serving does not care whether it learned anything)."""
    recipe, data = validate_recipe(raw)
    torch.manual_seed(0)
    task = TASKS[recipe.task].from_recipe(data, recipe.seed, out / "data")
    model = create_model(recipe.model.name, **{**task.model_overrides(), **recipe.model.overrides})
    if scale != 1.0:  # spread the logits, so greedy decoding has no near-ties
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    model.model_name = recipe.model.name
    return save_bundle(out / "bundle", model, task, metrics={"test": {"accuracy": 0.5}})


@pytest.fixture
def text_bundle(sentiment_tsv: Path, tmp_path: Path) -> Path:
    return untrained_bundle(classify_recipe(sentiment_tsv, tmp_path / "run"), tmp_path / "text")


@pytest.fixture
def image_bundle(image_npz: Path, tmp_path: Path) -> Path:
    return untrained_bundle(image_recipe(image_npz, tmp_path / "run"), tmp_path / "image")


@pytest.fixture
def lm_bundle(text_file: Path, tmp_path: Path) -> Path:
    return untrained_bundle(lm_recipe(text_file, tmp_path / "run"), tmp_path / "lm", scale=3.0)


def client(bundle: Path, **config) -> TestClient:
    limits = config.pop("limits", Limits())
    server = Server(load_bundle(bundle), ServeConfig(limits=limits, **config), CPU)
    return TestClient(create_app(server))


def test_text_classifier_answers_one_text_or_a_list(text_bundle: Path) -> None:
    b = load_bundle(text_bundle)
    texts = ["a really good movie", "dull and boring plot", "the film"]
    expected = b.task.predict(b.model, texts, CPU)
    with client(text_bundle) as c:
        assert c.get("/ready").json() == {"ready": True}
        one = c.post("/v1/predict", json={"inputs": texts[0]})
        many = c.post("/v1/predict", json={"inputs": texts})
    assert one.status_code == 200 and many.status_code == 200
    assert one.json()["predictions"][0]["label"] == expected[0]["label"]
    for got, want in zip(many.json()["predictions"], expected, strict=True):
        assert got["input"] == want["input"] and got["label"] == want["label"]
        for k, v in want["probabilities"].items():
            assert got["probabilities"][k] == pytest.approx(v, abs=1e-5)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_classifier_takes_pictures_and_pixel_arrays(image_bundle: Path) -> None:
    b = load_bundle(image_bundle)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, b.task.pixel_max, size=(8, 8))
    picture = rng.integers(0, 256, size=(8, 8))
    expected = b.task.predict_arrays(
        b.model,
        np.stack([pixels[None], picture[None] * (b.task.pixel_max / 255.0)]).astype(np.float32),
        ["a", "b"],
        CPU,
    )
    with client(image_bundle) as c:
        r = c.post(
            "/v1/predict",
            json={
                "inputs": [{"pixels": pixels.tolist()}, {"image": "data:image/png;base64," + _png(picture)}]
            },
        )
        card = c.get("/v1/model").json()
    assert r.status_code == 200, r.text
    for got, want in zip(r.json()["predictions"], expected, strict=True):
        assert got["label"] == want["label"]
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
    assert card["task"] == "image" and card["input"] == "image" and card["image_shape"] == [1, 8, 8]
    assert card["labels"] == b.task.class_names and card["metrics"] == {"test": {"accuracy": 0.5}}


BAD_TEXT_REQUESTS = [
    (b'{"inputs": ', 422, "not valid JSON"),
    (b'{"inputs": 5}', 422, "inputs"),
    (b'{"inputs": ["ok", 3]}', 422, "inputs"),
    (b"{}", 422, "inputs: Field required"),
    (b'{"inputs": "hi", "extra": 1}', 422, "extra"),
    (b'{"inputs": "   "}', 422, "empty text"),
    (b'{"inputs": []}', 422, "empty"),
    (json.dumps({"inputs": ["w"] * 65}).encode(), 413, "--max-items"),
    (json.dumps({"inputs": "x" * 100_000}).encode(), 413, "--max-text-chars"),
    (b'{"inputs": "\xff\xfe"}', 400, "UTF-8"),
    (b"[1, 2]", 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_TEXT_REQUESTS)
def test_bad_requests_get_a_4xx_that_says_why(
    text_bundle: Path, body: bytes, status: int, message: str
) -> None:
    with client(text_bundle) as c:
        r = c.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["error"]
        assert c.post("/v1/predict", json={"inputs": "still serving"}).status_code == 200


def test_a_body_that_is_not_json_says_so(text_bundle: Path) -> None:
    with client(text_bundle) as c:
        r = c.post("/v1/predict", data={"inputs": "good"})  # a form, as curl -d sends by default
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
        no_type = c.post("/v1/predict", content=b'{"inputs": "good"}')
        assert no_type.status_code == 415


def test_body_over_the_limit_is_refused_before_parsing(text_bundle: Path) -> None:
    with client(text_bundle, limits=Limits(max_body_bytes=1000)) as c:
        r = c.post("/v1/predict", content=b"x" * 10_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]
        errors = c.get("/metrics").text
    assert 'tansuo_requests_total{endpoint="/v1/predict",status="413"} 1' in errors


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"image": "not base64!"}, "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a but not really").decode()}, "as a picture"),
        ({"pixels": [[1, 2], [3]]}, "rectangular"),
        ({"pixels": [[1.0] * 5] * 5}, "shape"),
        ({"pixels": [["a"] * 8] * 8}, "pixels"),
        ({}, "exactly one"),
    ],
)
def test_bad_images_get_a_422(image_bundle: Path, item: dict, message: str) -> None:
    with client(image_bundle) as c:
        r = c.post("/v1/predict", json={"inputs": item})
        assert r.status_code == 422 and message in r.json()["error"], r.text


def test_api_key(text_bundle: Path) -> None:
    with client(text_bundle, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/predict", json={"inputs": "good"}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/model", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/predict", json={"inputs": "good"}, headers=ok).status_code == 200
        assert c.get("/v1/model", headers=ok).json()["auth"] is True


def test_generation_alone_streamed_and_limited(lm_bundle: Path) -> None:
    b = load_bundle(lm_bundle)
    expected = b.task.generate(b.model, "to be", max_new_tokens=12, temperature=0.0)[len("to be") :]
    with client(lm_bundle, limits=Limits(max_new_tokens=12)) as c:
        r = c.post("/v1/generate", json={"prompt": "to be", "max_new_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json() == {"completion": expected, "tokens": 12}
        seeded = [
            c.post("/v1/generate", json={"prompt": "or", "max_new_tokens": 8, "seed": 7}).json()
            for _ in range(2)
        ]
        assert seeded[0] == seeded[1]
        with c.stream(
            "POST",
            "/v1/generate",
            json={"prompt": "to be", "max_new_tokens": 12, "temperature": 0, "stream": True},
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert "".join(e.get("token", "") for e in events) == expected
        assert events[-1] == {"done": True, "completion": expected, "tokens": 12}
        too_many = c.post("/v1/generate", json={"prompt": "to be", "max_new_tokens": 13})
        assert too_many.status_code == 422 and "at most 12 (--max-new-tokens)" in too_many.json()["error"]
        unknown = c.post("/v1/generate", json={"prompt": "to be \u4f60"})
        assert unknown.status_code == 422 and "vocabulary" in unknown.json()["error"]
        wrong = c.post("/v1/generate", json={"prompt": "hi", "temperature": "hot"})
        assert wrong.status_code == 422 and "temperature" in wrong.json()["error"]
        metrics = c.get("/metrics").text
    assert "tansuo_generated_tokens_total 42" in metrics  # 12 + 2 x 8 + 12, and 2 at warm-up


def test_metrics_card_page_and_docs(text_bundle: Path) -> None:
    with client(text_bundle) as c:
        for _ in range(3):
            c.post("/v1/predict", json={"inputs": ["good", "bad"]})
        c.post("/v1/predict", json={"inputs": ""})
        metrics = c.get("/metrics").text
        card = c.get("/v1/model").json()
        page = c.get("/")
        docs = c.get("/openapi.json").json()
    assert 'tansuo_requests_total{endpoint="/v1/predict",status="200"} 3' in metrics
    assert 'tansuo_request_errors_total{endpoint="/v1/predict"} 1' in metrics
    assert 'tansuo_batch_size_count{endpoint="/v1/predict"} 3' in metrics
    assert 'tansuo_items_total{endpoint="/v1/predict"} 7' in metrics  # 3 x 2 and the warm-up text
    assert "tansuo_request_duration_seconds_bucket" in metrics
    assert card["task"] == "classify" and card["labels"] == ["0", "1"] and card["endpoint"] == "/v1/predict"
    assert card["batching"] == {"max_batch": 32, "max_wait_ms": 5.0} and card["limits"]["max_items"] == 64
    assert page.status_code == 200 and 'id="form"' in page.text
    assert "/v1/predict" in docs["paths"]


def test_onnxruntime_backend_gives_the_same_answers(text_bundle: Path) -> None:
    pytest.importorskip("onnxruntime")
    texts = ["a really good movie", "dull and boring plot"]
    with client(text_bundle) as c:
        torch_answers = c.post("/v1/predict", json={"inputs": texts}).json()["predictions"]
    with client(text_bundle, backend="onnxruntime") as c:
        onnx_answers = c.post("/v1/predict", json={"inputs": texts}).json()["predictions"]
        assert c.get("/v1/model").json()["backend"] == "onnxruntime"
    for a, b in zip(torch_answers, onnx_answers, strict=True):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_int8_bundle_serves_on_torch(text_bundle: Path, tmp_path: Path) -> None:
    from tansuo.compress import Int8DynamicConfig, quantize_

    b = load_bundle(text_bundle)
    names = quantize_(b.model, Int8DynamicConfig(reduce_range=True, per_sample=True))
    b.model.compression = [
        {"step": "quantize", "backend": "torch", "modules": names, "reduce_range": True, "per_sample": True}
    ]
    out = save_bundle(tmp_path / "int8", b.model, b.task)
    with client(out) as c:
        r = c.post("/v1/predict", json={"inputs": "good film"})
        card = c.get("/v1/model").json()
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("0", "1")
    assert [rec["step"] for rec in card["compression"]] == ["quantize"]


def test_unservable_combinations_are_refused(lm_bundle: Path, text_bundle: Path) -> None:
    with pytest.raises(TansuoError, match="--backend torch"):
        Server(load_bundle(lm_bundle), ServeConfig(backend="onnxruntime"), CPU)
    with pytest.raises(TansuoError, match="torch or onnxruntime"):
        Server(load_bundle(text_bundle), ServeConfig(backend="tensorrt"), CPU)


def test_serve_command_refuses_bad_setups_with_exit_2(
    lm_bundle: Path, text_bundle: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    cases = [
        ([str(lm_bundle), "--backend", "onnxruntime"], "--backend torch"),
        ([str(text_bundle), "--api-key-file", str(empty)], "holds no key"),
        ([str(text_bundle), "--api-key-file", str(tmp_path / "missing")], "cannot read"),
        ([str(tmp_path / "nothing")], "bundle not found"),
    ]
    for args, message in cases:
        code, out, err = run(["serve", *args, "--port", "0"], monkeypatch, capsys)
        assert code == 2 and message in err, (args, err)


def test_fill_mask_model_serves_predict(tmp_path: Path) -> None:
    corpus = tmp_path / "counting.txt"
    corpus.write_text("\n".join(" ".join(str(i + j) for j in range(8)) for i in range(60)) + "\n")
    bundle = untrained_bundle(mlm_recipe(corpus, tmp_path / "run"), tmp_path / "mlm")
    b = load_bundle(bundle)
    expected = b.task.predict(b.model, ["3 4 [MASK] 6"], CPU)[0]
    with client(bundle) as c:
        r = c.post("/v1/predict", json={"inputs": "3 4 [MASK] 6"})
        no_mask = c.post("/v1/predict", json={"inputs": "3 4 5 6"})
        card = c.get("/v1/model").json()
    assert r.status_code == 200 and r.json()["predictions"][0]["masks"] == expected["masks"]
    assert no_mask.status_code == 422 and "[MASK]" in no_mask.json()["error"]
    assert card["task"] == "mlm" and card["input"] == "masked-text"
