"""The real ``tansuo serve`` as a subprocess on 127.0.0.1: load, bad input, and the try-it page in chromium.

Every server here serves an untrained bundle saved by the test itself (tests never read ../shared). The
text classifier's weights get random noise on top of their initialisation, so that different texts get
clearly different probabilities and an answer handed to the wrong request would be noticed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tansuo.bundle import load_bundle, save_bundle
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.tasks import TASKS
from tests.helpers import (
    chromium_path,
    free_port,
    image_recipe,
    lm_recipe,
    segment_recipe,
    translate_recipe,
    write_digits_csv,
    write_parallel,
)

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 180.0
LABELS = ["negative", "neutral", "positive"]
FILLER = ["the", "a", "movie", "film", "plot", "acting", "story", "was", "is", "really", "quite", "not"]
CUES = ["very", "and", "but", "good", "bad", "dull", "fun", "superb", "awful", "boring", "lovely", "charming"]
WORDS = FILLER + CUES + ["tedious", "moving", "clumsy", "brilliant", "weak"]


# --------------------------------------------------------------------------------------------- server
def _command() -> list[str]:
    script = Path(sys.executable).with_name("tansuo")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tansuo.cli"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    def metrics(self) -> str:
        r = httpx.get(self.url + "/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return r.text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _start(bundle: Path, log_path: Path, args: list[str]) -> Server:
    """Starts ``tansuo serve`` on a free port and waits for GET /ready (a port taken meanwhile: retry)."""
    env = {k: v for k, v in os.environ.items() if k != "TANSUO_API_KEY"}
    for _ in range(3):
        port = free_port()
        cmd = [*_command(), "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), *args]
        with log_path.open("wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = Server(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        server.stop()
        if "address already in use" not in server.log().lower():
            break
    pytest.fail(
        f"`{' '.join(cmd)}` was not ready within {READY_TIMEOUT_S:g} s "
        f"(exit code {process.poll()}); its output:\n{server.log()[-6000:]}"
    )


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``serve(bundle, *flags)`` starts a server; every one started is terminated at the module's end."""
    started: list[Server] = []

    def start(bundle: Path, *args: str) -> Server:
        log = tmp_path_factory.mktemp("serve-log") / "server.log"
        server = _start(bundle, log, ["--threads", "1", *args])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _no_server_errors(server: Server) -> None:
    """The server is still up, answered no request with a 5xx and logged no traceback."""
    assert server.process.poll() is None, server.log()[-4000:]
    five = [line for line in server.metrics().splitlines() if re.search(r'status="5\d\d"', line)]
    assert not five, five
    assert "Traceback" not in server.log(), server.log()[-6000:]


# -------------------------------------------------------------------------------------------- bundles
def _save_untrained(raw: dict, path: Path, noise: float = 0.0) -> Path:
    recipe, data = validate_recipe(raw)
    task = TASKS[recipe.task].from_recipe(data, recipe.seed, Path(recipe.train.out_dir) / "data")
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.name, **{**task.model_overrides(), **recipe.model.overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return save_bundle(path, model, task)


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40))))


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bert_test with three labels, its tokenizer learned from 150 made-up sentences."""
    tmp = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    rows = [f"{_sentence(rng)}\t{LABELS[i % 3]}" for i in range(150)]
    (tmp / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    raw = {
        "task": "classify",
        "seed": 3,
        "data": {"train": str(tmp / "train.tsv"), "vocab_size": 300, "max_seq_len": 32},
        "model": {"name": "bert_test", "overrides": {"dropout": 0.0}},
        "train": {"out_dir": str(tmp / "run"), "max_steps": 1},
    }
    return _save_untrained(raw, tmp / "bundle", noise=0.5)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image")
    rng = np.random.default_rng(0)
    np.savez(tmp / "x.npz", x=rng.uniform(0, 2, size=(40, 8, 8)).astype(np.float32), y=np.arange(40) % 4)
    return _save_untrained(image_recipe(tmp / "x.npz", tmp / "run"), tmp / "bundle")


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt_test with a 16-token context over a character tokenizer."""
    tmp = tmp_path_factory.mktemp("lm")
    (tmp / "corpus.txt").write_text("to be or not to be, that is the question\n" * 40, encoding="utf-8")
    return _save_untrained(lm_recipe(tmp / "corpus.txt", tmp / "run"), tmp / "bundle")


@pytest.fixture(scope="module")
def text_server(serve: Callable[..., Server], text_bundle: Path) -> Server:
    return serve(text_bundle, "--max-batch", "32")


# ------------------------------------------------------------------------------------------- (a) load
def _requests(n: int, texts: list[str], seed: int) -> list[list[str]]:
    """``n`` requests: mostly one text, every seventh a list of three."""
    rng = np.random.default_rng(seed)
    return [list(rng.choice(texts, size=3 if i % 7 == 0 else 1)) for i in range(n)]


async def _send_all(url: str, requests: list[list[str]], clients: int) -> list[tuple[list[str], int, Any]]:
    """Sends every request from ``clients`` concurrent clients; returns (texts, status, body) for each."""
    answers: list[tuple[list[str], int, Any]] = []
    todo = iter(requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for texts in todo:
                body = {"inputs": texts[0] if len(texts) == 1 else texts}
                r = await client.post("/v1/predict", json=body)
                try:
                    answer = r.json()
                except json.JSONDecodeError:
                    answer = r.text
                answers.append((texts, r.status_code, answer))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return answers


def _check_answers(answers: list[tuple[list[str], int, Any]], expected: dict[str, dict[str, Any]]) -> None:
    failures = []
    for texts, status, body in answers:
        if status != 200:
            failures.append(f"{texts}: {status} {body}")
            continue
        predictions = body["predictions"]
        if len(predictions) != len(texts):
            failures.append(f"{texts}: {len(predictions)} predictions")
        for text, p in zip(texts, predictions, strict=False):
            want = expected[text]
            close = all(abs(p["probabilities"][k] - v) <= 1e-4 for k, v in want["probabilities"].items())
            if p["input"] != text or p["label"] != want["label"] or not close:
                failures.append(f"{text!r}: got {p}, expected {want}")
    assert not failures, f"{len(failures)} wrong answers, e.g.:\n" + "\n".join(failures[:5])


def _histogram(metrics: str, name: str, endpoint: str) -> dict[str, float]:
    """Bucket counts of a histogram (by ``le``), with ``count`` and ``sum``."""
    out = {}
    for line in metrics.splitlines():
        m = re.match(
            rf'{name}_(bucket|count|sum)\{{endpoint="{re.escape(endpoint)}"(?:,le="([^"]+)")?\}} (\S+)$', line
        )
        if m:
            out[m.group(2) if m.group(1) == "bucket" else m.group(1)] = float(m.group(3))
    return out


def _counter(metrics: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


def test_load_2000_requests_from_64_clients_all_answered_correctly_and_memory_stays_flat(
    text_server: Server, text_bundle: Path
) -> None:
    rng = np.random.default_rng(1)
    texts = sorted({_sentence(rng) for _ in range(300)})
    bundle = load_bundle(text_bundle)
    expected = {t: bundle.task.predict(bundle.model, [t], torch.device("cpu"))[0] for t in texts}
    distinct = {tuple(round(v, 3) for v in e["probabilities"].values()) for e in expected.values()}
    assert len(distinct) > 0.9 * len(texts)  # a mixed-up answer cannot pass for the right one
    assert len({e["label"] for e in expected.values()}) >= 2

    warm_up = asyncio.run(_send_all(text_server.url, _requests(300, texts, seed=2), clients=64))
    _check_answers(warm_up, expected)
    rss_warm = text_server.rss_kib()
    before = text_server.metrics()

    load = _requests(2000, texts, seed=3)
    answers = asyncio.run(_send_all(text_server.url, load, clients=64))
    assert len(answers) == 2000
    _check_answers(answers, expected)

    rss_after = text_server.rss_kib()
    assert rss_after <= 1.10 * rss_warm, f"VmRSS grew from {rss_warm} KiB to {rss_after} KiB"
    after = text_server.metrics()
    errors = [_counter(m, "tansuo_request_errors_total", endpoint="/v1/predict") for m in (before, after)]
    assert errors[1] == errors[0], f"{errors[1] - errors[0]:g} requests answered with an error"
    ok = [_counter(m, "tansuo_requests_total", endpoint="/v1/predict", status="200") for m in (before, after)]
    assert ok[1] - ok[0] == 2000
    items = [_counter(m, "tansuo_items_total", endpoint="/v1/predict") for m in (before, after)]
    assert items[1] - items[0] == sum(len(r) for r in load)
    batches = [_histogram(m, "tansuo_batch_size", "/v1/predict") for m in (before, after)]
    alone = batches[1]["1"] - batches[0]["1"]
    total = batches[1]["count"] - batches[0]["count"]
    assert total - alone > 0, f"no batch of more than one item in {total:g} batches"
    assert batches[1]["+Inf"] == batches[1]["count"] and batches[1]["32"] == batches[1]["count"]  # <= 32


# -------------------------------------------------------------------------------------- (b) bad input
def _png(size: int = 8) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _chunks(total: int, size: int = 1 << 16) -> Iterator[bytes]:
    yield b'{"inputs": "'
    for _ in range(total // size):
        yield b"a" * size
    yield b'"}'


def _expect_4xx(r: httpx.Response, status: int | None, words: str, case: str) -> None:
    assert 400 <= r.status_code < 500, f"{case}: {r.status_code} {r.text[:500]}"
    if status is not None:
        assert r.status_code == status, f"{case}: {r.status_code} {r.text[:500]}"
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), f"{case}: {body}"
    assert re.search(words, body["error"], re.I), f"{case}: {body['error']!r} does not mention {words!r}"


JSON = {"Content-Type": "application/json"}
TEXT_CASES: list[tuple[str, dict[str, Any], int | None, str]] = [
    ("malformed JSON", {"content": b'{"inputs": "good', "headers": JSON}, 422, "not valid JSON"),
    ("JSON that is not an object", {"content": b"[1, 2]", "headers": JSON}, 422, "dictionary|object"),
    ("a number for the text", {"json": {"inputs": 5}}, 422, "inputs.*string"),
    ("a number in the list", {"json": {"inputs": ["good", 3]}}, 422, "inputs.*string"),
    ("null inputs", {"json": {"inputs": None}}, 422, "inputs"),
    ("missing inputs", {"json": {}}, 422, "inputs: field required"),
    ("a field the API does not have", {"json": {"inputs": "x", "path": "/etc/passwd"}}, 422, "path.*extra"),
    ("empty string", {"json": {"inputs": ""}}, 422, "empty"),
    ("blank string", {"json": {"inputs": " \n\t "}}, 422, "empty"),
    ("empty string in a list", {"json": {"inputs": ["good", ""]}}, 422, r"inputs\[1\].*empty"),
    ("empty list", {"json": {"inputs": []}}, 422, "empty"),
    ("too many inputs", {"json": {"inputs": ["good"] * 65}}, 413, "65 inputs.*--max-items"),
    ("100,000 characters", {"json": {"inputs": "a" * 100_000}}, 413, "100000 characters.*--max-text-chars"),
    ("10 MB body", {"json": lambda: {"inputs": "a" * 10_000_000}}, 413, "over 1000000 bytes"),
    (
        "10 MB chunked body",
        {"content": lambda: _chunks(10_000_000), "headers": JSON},
        413,
        "over 1000000 bytes",
    ),
    ("invalid UTF-8", {"content": b'{"inputs": "caf\xe9 \xff"}', "headers": JSON}, 400, "UTF-8"),
    ("a lone surrogate", {"content": b'{"inputs": "bad \\ud800 text"}', "headers": JSON}, 422, "surrogate"),
    ("not JSON", {"content": b"inputs=good", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
]


def test_bad_input_to_a_text_classifier_gets_4xx_json_and_the_server_keeps_serving(
    text_server: Server,
) -> None:
    with httpx.Client(base_url=text_server.url, timeout=60) as client:
        for case, kwargs, status, words in TEXT_CASES:
            kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}  # big bodies made here
            _expect_4xx(client.post("/v1/predict", **kwargs), status, words, case)
        _expect_4xx(client.get("/v1/predict"), 405, "not allowed", "GET on a POST route")
        _expect_4xx(client.get("/v1/nothing"), 404, "not found", "unknown route")
        r = client.post("/v1/predict", json={"inputs": ["a good film", "dull"]})
        assert r.status_code == 200, r.text
        assert [p["input"] for p in r.json()["predictions"]] == ["a good film", "dull"]
        assert all(p["label"] in LABELS for p in r.json()["predictions"])
        assert client.get("/health").json() == {"status": "ok"}
    _no_server_errors(text_server)


def test_bad_input_to_an_image_classifier(serve: Callable[..., Server], image_bundle: Path) -> None:
    server = serve(image_bundle)
    junk = base64.b64encode(b"this is a text file, not a picture\n" * 20).decode()
    truncated = base64.b64encode(base64.b64decode(_png())[:40]).decode()
    cases: list[tuple[str, Any, str]] = [
        ("text bytes as an image", {"image": junk}, "picture"),
        ("a truncated PNG", {"image": truncated}, "picture"),
        ("a data URL of junk", {"image": "data:image/png;base64," + junk}, "picture"),
        ("not base64", {"image": "%%% not base64 %%%"}, "base64"),
        ("an empty image", {"image": ""}, "picture|base64|empty"),
        ("pixels of the wrong shape", {"pixels": [[1, 2], [3, 4]]}, "shape"),
        ("ragged pixels", {"pixels": [[1, 2], [3]]}, "rectangular"),
        ("pixels that are words", {"pixels": [["a"] * 8] * 8}, "rectangular|number"),
        ("both image and pixels", {"image": _png(), "pixels": [[0] * 8] * 8}, "exactly one"),
        ("neither", {}, "exactly one"),
        ("a file path", {"path": "/etc/passwd"}, "path.*extra"),
        ("a number", 7, "inputs"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case, inputs, words in cases:
            _expect_4xx(client.post("/v1/predict", json={"inputs": inputs}), 422, words, case)
        _expect_4xx(client.post("/v1/predict", json={"inputs": [{"pixels": [0] * 64}] * 65}), 413, "", "65")
        r = client.post("/v1/predict", json={"inputs": [{"image": _png()}, {"pixels": [[0.5] * 8] * 8}]})
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 2 and all(p["label"] in {"0", "1", "2", "3"} for p in predictions)
    _no_server_errors(server)


def test_bad_input_and_api_keys_for_a_language_model(
    serve: Callable[..., Server], lm_bundle: Path, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text("s3cret-key\n")
    server = serve(lm_bundle, "--api-key-file", str(tmp_path / "key"), "--max-new-tokens", "8")
    good = {"Authorization": "Bearer s3cret-key"}
    prompt = {"prompt": "to be", "max_new_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case, headers in [
            ("no key", {}),
            ("a wrong key", {"Authorization": "Bearer s3cret-kez"}),
            ("the key's prefix", {"Authorization": "Bearer s3cret"}),
            ("another scheme", {"Authorization": "Basic s3cret-key"}),
            ("the key alone", {"Authorization": "s3cret-key"}),
        ]:
            r = client.post("/v1/generate", json=prompt, headers=headers)
            _expect_4xx(r, 401, "API key", case)
            assert r.headers["www-authenticate"] == "Bearer"
            _expect_4xx(client.get("/v1/model", headers=headers), 401, "API key", case + " (model card)")
        assert client.get("/health").status_code == 200  # not behind the key
        cases: list[tuple[str, Any, int, str]] = [
            (
                "max_new_tokens over the cap",
                {"prompt": "to be", "max_new_tokens": 9},
                422,
                "--max-new-tokens",
            ),
            (
                "max_new_tokens far over",
                {"prompt": "x", "max_new_tokens": 10**6, "stream": True},
                422,
                "at most 8",
            ),
            ("max_new_tokens 0", {"prompt": "to be", "max_new_tokens": 0}, 422, "max_new_tokens"),
            ("max_new_tokens a string", {"prompt": "to be", "max_new_tokens": "4"}, 422, "max_new_tokens"),
            ("max_new_tokens a float", {"prompt": "to be", "max_new_tokens": 4.5}, 422, "max_new_tokens"),
            ("a negative temperature", {"prompt": "to be", "temperature": -1}, 422, "temperature"),
            ("top_p 0", {"prompt": "to be", "top_p": 0}, 422, "top_p"),
            ("top_k 0", {"prompt": "to be", "top_k": 0}, 422, "top_k"),
            ("a seed over 64 bits", {"prompt": "to be", "seed": 2**70}, 422, "seed"),
            ("a prompt that is a list", {"prompt": ["to", "be"]}, 422, "prompt"),
            ("100,000 characters", {"prompt": "to be " * 20_000}, 413, "characters"),
            ("a character outside the vocabulary", {"prompt": "to be \u2603"}, 422, "vocabulary"),
            ("a lone surrogate", b'{"prompt": "to \\ud800"}', 422, "prompt"),
            ("stream not a bool", {"prompt": "to be", "stream": "yes"}, 422, "stream"),
        ]
        for case, body, status, words in cases:
            raw = {"content": body, "headers": {**good, **JSON}} if isinstance(body, bytes) else None
            r = client.post("/v1/generate", **(raw or {"json": body, "headers": good}))
            _expect_4xx(r, status, words, case)
        r = client.post("/v1/generate", json=prompt, headers=good)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == 4
        again = client.post("/v1/generate", json=prompt, headers=good).json()
        assert again == r.json()  # greedy: the same continuation
        with client.stream("POST", "/v1/generate", json={**prompt, "stream": True}, headers=good) as s:
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == {"done": True, "completion": r.json()["completion"], "tokens": 4}
        assert "".join(e.get("token", "") for e in events[:-1]) == r.json()["completion"]
        assert client.get("/v1/model", headers=good).json()["auth"] is True
    _no_server_errors(server)


# ------------------------------------------------------------------------------------ (c) the page
class _Label(HTMLParser):
    """The text of the element with id="label"."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.text = 0, None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.depth:
            self.depth += 1
        elif ("id", "label") in attrs:
            self.depth, self.text = 1, ""

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text += data


def _browse(chromium: str, page: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless chromium on ``page`` with a fresh profile; ``--virtual-time-budget`` makes it run the page's
    timers and wait for its network fetches (pending fetches hold virtual time back) before it dumps the DOM
    or takes the screenshot, so both show the finished answer without a sleep; the subprocess timeout only
    bounds a hung browser."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *flags,
        page,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _label(dom: str) -> str:
    parser = _Label()
    parser.feed(dom)
    assert parser.text is not None, f"no element with id='label' in the page:\n{dom[-3000:]}"
    return parser.text.strip()


def test_try_it_page_predicts_in_headless_chromium(text_server: Server, tmp_path: Path) -> None:
    """Loads ``/?text=...&run=1``: the page fetches the model card, fills the form, clicks Run itself and
    shows the answer of ``POST /v1/predict``."""
    chromium = chromium_path()
    text = "a charming, moving film — not dull at all"
    api = httpx.post(text_server.url + "/v1/predict", json={"inputs": text}, timeout=30).json()
    (want,) = api["predictions"]
    page = f"{text_server.url}/?{urllib.parse.urlencode({'text': text, 'run': '1'})}"

    dom = _browse(chromium, page, tmp_path, "--dump-dom").stdout
    label = _label(dom)
    m = re.fullmatch(r"(.+) \((\d+\.\d)%\)", label)
    assert m, label
    assert m.group(1) == want["label"]
    assert abs(float(m.group(2)) - 100 * want["probability"]) <= 0.051
    assert 'class="error"' not in dom

    shot = tmp_path / "page.png"
    _browse(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=900,700")
    assert shot.is_file() and shot.stat().st_size > 5000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (900, 700)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 16  # text and widgets, not a blank page
    bar = np.abs(pixels - [0x4A, 0x7B, 0xD0]).sum(1) <= 6  # the probability bars: drawn after the answer
    assert bar.sum() > 200, "no probability bar in the screenshot"
    _no_server_errors(text_server)


def test_api_docs_render_offline_under_the_content_security_policy(
    text_server: Server, tmp_path: Path
) -> None:
    """/docs loads Swagger UI from this server's own files, within the page's policy: operations render."""
    dom = _browse(chromium_path(), text_server.url + "/docs", tmp_path, "--dump-dom").stdout
    assert "opblock-summary-path" in dom and "/v1/predict" in dom, dom[-3000:]
    _no_server_errors(text_server)


def test_try_it_page_translates_in_headless_chromium(
    serve: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A translation bundle's page: the same form, and the translation of ``POST /v1/translate`` shown."""
    chromium = chromium_path()
    folder = tmp_path_factory.mktemp("translate")
    raw = translate_recipe(write_parallel(folder / "pairs", 60), folder / "run")
    server = serve(_save_untrained(raw, folder / "bundle", noise=0.5), "--max-beam", "4")
    text = "ka lo mi nu"
    api = httpx.post(server.url + "/v1/translate", json={"inputs": text}, timeout=60).json()
    (want,) = api["translations"]
    assert want["translation"].strip()  # an untrained model, but it says something
    page = f"{server.url}/?{urllib.parse.urlencode({'text': text, 'run': '1'})}"
    dom = _browse(chromium, page, tmp_path, "--dump-dom").stdout
    assert _label(dom) == want["translation"].strip()
    assert 'class="error"' not in dom
    _no_server_errors(server)


@pytest.fixture(scope="module")
def segment_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, noised U-Net on tiny digit canvases: its masks hold several classes."""
    tmp = tmp_path_factory.mktemp("segment")
    raw = segment_recipe(write_digits_csv(tmp / "digits.csv"), tmp / "run", model="unet_test")
    return _save_untrained(raw, tmp / "bundle", noise=0.3)


def test_try_it_page_draws_a_segmentation_in_headless_chromium(
    serve: Callable[..., Server], segment_bundle: Path, tmp_path: Path
) -> None:
    """Loads ``/?image=data:...&run=1``: the page sends the picture to ``POST /v1/segment`` and draws the
    returned class mask over it, blending every non-background pixel, with a table of class areas."""
    from PIL import Image

    server = serve(segment_bundle)
    chromium = chromium_path()
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    api = httpx.post(server.url + "/v1/segment", json={"inputs": {"image": data_url}}, timeout=30).json()
    (want,) = api["predictions"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(want["mask_png"]))))
    page = f"{server.url}/?{urllib.parse.urlencode({'image': data_url, 'run': '1'})}"

    dom = _browse(chromium, page, tmp_path, "--dump-dom").stdout
    assert 'class="error"' not in dom, dom[-3000:]
    drawn = re.search(r'<canvas id="overlay" width="(\d+)" height="(\d+)"[^>]*data-drawn="(\d+)"', dom)
    assert drawn, dom[-3000:]
    assert (int(drawn.group(1)), int(drawn.group(2))) == (40, 24)
    assert int(drawn.group(3)) == int((mask > 0).sum()) > 0  # every non-background pixel blended
    table = _label(dom)
    for name, share in want["areas"].items():
        assert f"{name}{100 * share:.1f}%" in table.replace("\n", "")
    _no_server_errors(server)
