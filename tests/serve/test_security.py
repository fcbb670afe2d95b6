"""API keys kept as hashes with names, per-key rate limits, the access log, security headers, offline docs."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tansuo.bundle import load_bundle
from tansuo.errors import TansuoError
from tansuo.serve.app import ServeConfig, Server, create_app, read_api_keys
from tansuo.serve.security import Rate, RateLimiter, add_key, hash_key, read_key_file
from tests.helpers import classify_recipe, run
from tests.serve.test_app import CPU, untrained_bundle


@pytest.fixture
def bundle(sentiment_tsv: Path, tmp_path: Path) -> Path:
    return untrained_bundle(classify_recipe(sentiment_tsv, tmp_path / "run"), tmp_path / "text")


def client(bundle: Path, **config) -> TestClient:
    return TestClient(create_app(Server(load_bundle(bundle), ServeConfig(**config), CPU)))


def test_apikey_keeps_names_and_hashes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    file = tmp_path / "keys.txt"
    code, out, _ = run(["apikey", str(file), "alice", "--rate-limit", "5/s"], monkeypatch, capsys)
    key = out.strip()
    assert code == 0 and key.startswith("tsk-") and len(key) > 40
    bob = add_key(file, "bob")
    text = file.read_text()
    assert key not in text and bob not in text and hash_key(key) in text
    keys = {k.name: k for k in read_key_file(file)}
    assert keys["alice"].rate == Rate(5.0, 5, "5/s") and keys["bob"].rate is None
    code, _, err = run(["apikey", str(file), "bob"], monkeypatch, capsys)
    assert code == 2 and "already has a key named 'bob'" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("alice 1234\n", "line 1: expected 'NAME sha256:HEX [RATE]'"),
        ("# c\nalice sha256:abc\n", "line 2: the sha256 of a key is 64 hexadecimal digits"),
        (f"a sha256:{'0' * 64}\na sha256:{'1' * 64}\n", "line 2: the name 'a' is used twice"),
        (f"a sha256:{'0' * 64} fast\n", "line 1: rate 'fast' is not understood"),
        (f"a/b sha256:{'0' * 64}\n", "may hold letters, digits"),
    ],
)
def test_a_bad_key_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "k").write_text(text)
    with pytest.raises(TansuoError, match=re.escape(message)):
        read_key_file(tmp_path / "k")


def test_a_plain_key_file_and_the_environment_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: Path
) -> None:
    (tmp_path / "k").write_text("s3cret\n")
    assert read_api_keys(tmp_path / "k")[0].sha256 == hash_key("s3cret")
    monkeypatch.setenv("TANSUO_API_KEY", "from-env")
    (key,) = read_api_keys(None)
    with client(bundle, api_keys=(key,)) as c:
        ok = c.post("/v1/predict", json={"inputs": "good"}, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
        assert (
            c.post("/v1/predict", json={"inputs": "good"}, headers={"Authorization": "Bearer s3"}).status_code
            == 401
        )


def test_each_key_has_its_own_bucket_and_the_log_names_it(
    tmp_path: Path, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "keys"
    alice, bob = add_key(file, "alice", "2/min"), add_key(file, "bob")
    keys = tuple(read_key_file(file))
    with client(bundle, api_keys=keys, rate_limit=Rate.parse("1000/s")) as c, caplog.at_level(logging.INFO):

        def ask(key: str, text: str = "a secret review"):
            return c.post("/v1/predict", json={"inputs": text}, headers={"Authorization": f"Bearer {key}"})

        assert [ask(alice).status_code for _ in range(2)] == [200, 200]
        limited = ask(alice)
        assert limited.status_code == 429 and "rate limit 2/min reached for alice" in limited.json()["error"]
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert all(
            ask(bob).status_code == 200 for _ in range(5)
        )  # bob's limit is the server's, his own bucket
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {bob}"}).json()["rate_limit"] == "1000/s"
    lines = [r.getMessage() for r in caplog.records if r.name == "tansuo.serve.access"]
    assert any(" key=alice POST /v1/predict 429 " in line for line in lines), lines
    assert any(" key=bob POST /v1/predict 200 " in line for line in lines)
    assert not any("secret review" in line or alice in line for line in lines)  # never the payload or key


def test_without_keys_the_limit_is_per_client(bundle: Path) -> None:
    with client(bundle, rate_limit=Rate.parse("1/min")) as c:
        assert c.post("/v1/predict", json={"inputs": "good"}).status_code == 200
        assert c.post("/v1/predict", json={"inputs": "good"}).status_code == 429
        assert c.get("/health").status_code == 200  # health and readiness are never limited


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter, rate = RateLimiter(clock=lambda: now[0]), Rate.parse("2/s:3")
    assert [limiter.allow("a", rate) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.allow("a", rate) == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.allow("a", rate) == 0.0 and limiter.allow("a", rate) == pytest.approx(0.5)
    now[0] = 100.0  # refills to the burst, no further
    assert [limiter.allow("a", rate) for _ in range(4)][-1] > 0


def _script_hash(html: str) -> str:
    body = re.search(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, flags=re.S).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def test_pages_have_a_policy_and_docs_need_no_internet(bundle: Path) -> None:
    with client(bundle) as c:
        health = c.get("/health")
        assert health.headers["x-content-type-options"] == "nosniff"
        assert health.headers["x-frame-options"] == "DENY"
        for path in ("/", "/docs"):
            page = c.get(path)
            csp = page.headers["content-security-policy"]
            assert _script_hash(page.text) in csp and "frame-ancestors 'none'" in csp
            assert (
                "unsafe-eval" not in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
            )
        docs = c.get("/docs").text
        assert "cdn" not in docs.lower() and "/docs/assets/swagger-ui-bundle.js" in docs
        js = c.get("/docs/assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
