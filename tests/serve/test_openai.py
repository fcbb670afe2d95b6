"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions (whole and streamed), /v1/models, with
continuous and static batching; and the official ``openai`` client against a real ``tansuo serve``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tansuo.bundle import load_bundle
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tests.helpers import lm_recipe
from tests.serve.test_app import untrained_bundle
from tests.test_chat import save_chat_bundle

CPU = torch.device("cpu")
CONVERSATION = [{"role": "user", "content": "hello there, how are you?"}]


@pytest.fixture
def lm_bundle(text_file: Path, tmp_path: Path) -> Path:
    """An untrained character model with a context of 48, its weights spread so that greedy decoding
    varies (different prompts, different continuations)."""
    raw = lm_recipe(text_file, tmp_path / "run")
    raw["data"]["block_size"] = 48
    return untrained_bundle(raw, tmp_path / "lm", scale=3.0)


@pytest.fixture
def chat_bundle(tmp_path: Path) -> Path:
    """Two layers, its weights spread so greedy decoding has no near-ties and runs for a while before it
    says its end of turn."""
    return save_chat_bundle(
        tmp_path / "tiny-chat", scale=2.0, num_layers=2, embed_dim=32, mlp_hidden=64, max_seq_len=128
    )


def client(bundle: Path, **config) -> TestClient:
    limits = config.pop("limits", Limits())
    server = Server(load_bundle(bundle), ServeConfig(limits=limits, **config), CPU)
    return TestClient(create_app(server))


def _events(stream) -> list[dict]:
    lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _expected_reply(bundle: Path, messages: list[dict], n: int) -> str:
    b = load_bundle(bundle)
    return b.task.reply(b.model, messages, max_new_tokens=n, temperature=0.0)


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_completions_whole_streamed_and_stopped(lm_bundle: Path, batching: str) -> None:
    b = load_bundle(lm_bundle)
    expected = b.task.generate(b.model, "to be", max_new_tokens=10, temperature=0.0)[len("to be") :]
    ask = {"model": "bundle", "prompt": "to be", "max_tokens": 10, "temperature": 0}
    with client(lm_bundle, batching=batching) as c:
        r = c.post("/v1/completions", json=ask)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "bundle"
        assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
        assert body["choices"] == [
            {"index": 0, "text": expected, "logprobs": None, "finish_reason": "length"}
        ]
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}

        # a stop string ends the text before it; streaming sends the same text, then [DONE]
        stop = expected[4:6]
        cut = expected[: expected.find(stop)]
        r = c.post("/v1/completions", json={**ask, "stop": [stop, "\u00a7never"]})
        assert r.json()["choices"][0]["text"] == cut and r.json()["choices"][0]["finish_reason"] == "stop"
        for stops in ([], [stop]):
            payload = {**ask, "stream": True, "stop": stops, "stream_options": {"include_usage": True}}
            with c.stream("POST", "/v1/completions", json=payload) as s:
                assert s.headers["content-type"].startswith("text/event-stream")
                events = _events(s)
            assert all(e["object"] == "text_completion" for e in events)
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
            assert text == (cut if stops else expected)
            assert finishes[-1] == ("stop" if stops else "length") and set(finishes[:-1]) == {None}
            assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] == 5

        # a list of prompts: one choice each, in order
        r = c.post("/v1/completions", json={**ask, "prompt": ["to be", "or"]})
        texts = [ch["text"] for ch in r.json()["choices"]]
        assert texts[0] == expected and [ch["index"] for ch in r.json()["choices"]] == [0, 1]

        # seeded sampling repeats
        seeded = {**ask, "temperature": 1.0, "seed": 3}
        assert (
            c.post("/v1/completions", json=seeded).json()["choices"]
            == (c.post("/v1/completions", json=seeded).json()["choices"])
        )


def test_concurrent_requests_each_get_their_own_answer(lm_bundle: Path) -> None:
    b = load_bundle(lm_bundle)
    prompts = ["to be", "or not", "that is", "q", "ROMEO:", "JULIET"]
    lengths = [10, 3, 5, 14, 4, 1]
    expected = [
        b.task.generate(b.model, p, max_new_tokens=n, temperature=0.0)[len(p) :]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    with client(lm_bundle, max_batch=4) as c:

        def ask(i: int) -> str:
            payload = {"model": "bundle", "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
            return c.post("/v1/completions", json=payload).json()["choices"][0]["text"]

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, range(6))) == expected
        metrics = c.get("/metrics").text
    assert 'tansuo_batch_size_count{endpoint="decode"}' in metrics


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_chat_completions_whole_and_streamed(chat_bundle: Path, batching: str) -> None:
    expected = _expected_reply(chat_bundle, CONVERSATION, 40)
    ask = {"model": "tiny-chat", "messages": CONVERSATION, "max_tokens": 40, "temperature": 0}
    with client(chat_bundle, batching=batching) as c:
        body = c.post("/v1/chat/completions", json=ask).json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": expected}
        tokens = body["usage"]["completion_tokens"]
        assert choice["finish_reason"] == ("length" if tokens == 40 else "stop")
        with c.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as s:
            events = _events(s)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" for e in events)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
        assert events[-1]["choices"][0] == {
            "index": 0,
            "delta": {},
            "logprobs": None,
            "finish_reason": choice["finish_reason"],
        }
        # content as a list of text parts, max_completion_tokens, a developer message as the system's
        parts = {
            **ask,
            "messages": [{"role": "user", "content": [{"type": "text", "text": CONVERSATION[0]["content"]}]}],
            "max_tokens": None,
            "max_completion_tokens": 40,
        }
        assert (
            c.post("/v1/chat/completions", json=parts).json()["choices"][0]["message"]["content"] == expected
        )
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-chat"]
        assert models["data"][0]["max_model_len"] == 128


def test_bad_requests_get_openai_errors(chat_bundle: Path, lm_bundle: Path) -> None:
    with client(chat_bundle, limits=Limits(max_new_tokens=50)) as c:
        ok = {"model": "tiny-chat", "messages": CONVERSATION}

        def error(payload: dict, route: str = "/v1/chat/completions") -> tuple[int, dict]:
            r = c.post(route, json=payload)
            return r.status_code, r.json()["error"]

        status, err = error({**ok, "model": "gpt-4"})
        assert (
            status == 404 and "`gpt-4` does not exist" in err["message"] and "`tiny-chat`" in err["message"]
        )
        assert err["type"] == "not_found_error"
        status, err = error({**ok, "logprobs": True})
        assert status == 400 and "`logprobs` is not supported" in err["message"]
        status, err = error({**ok, "n": 2})
        assert status == 400 and "n:" in err["message"] and err["type"] == "invalid_request_error"
        status, err = error({**ok, "max_tokens": 51})
        assert status == 400 and "at most 50 (--max-new-tokens)" in err["message"]
        long = [{"role": "user", "content": "hello there " * 60}]
        status, err = error({**ok, "messages": long, "max_tokens": 10})
        assert status == 400 and "maximum context length is 128 tokens" in err["message"]
        status, err = error({**ok, "messages": [{"role": "robot", "content": "x"}]})
        assert status == 400 and "messages" in err["message"]
        status, err = error({"model": "tiny-chat", "prompt": "", "max_tokens": 3}, "/v1/completions")
        assert status == 400 and "empty" in err["message"]
        r = c.post("/v1/chat/completions", json={**ok, "max_tokens": 2, "temperature": 0, "user": "u1"})
        assert r.status_code == 200  # fields that change nothing are accepted
    with client(lm_bundle) as c:  # a character model has no chat template
        r = c.post("/v1/chat/completions", json={"model": "bundle", "messages": CONVERSATION})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        r = c.post("/v1/generate", json={"prompt": "to", "temperature": "hot"})
        assert r.status_code == 422 and isinstance(r.json()["error"], str)  # other routes keep their shape


def test_the_openai_client_against_a_real_server(chat_bundle: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    from tests.serve.test_server_integration import _start

    expected = _expected_reply(chat_bundle, CONVERSATION, 30)
    server = _start(chat_bundle, tmp_path / "server.log", ["--threads", "1", "--model-name", "smol"])
    try:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in api.models.list()] == ["smol"]
        reply = api.chat.completions.create(model="smol", messages=CONVERSATION, max_tokens=30, temperature=0)
        assert reply.choices[0].message.content == expected
        assert reply.usage.completion_tokens >= 1
        stream = api.chat.completions.create(
            model="smol", messages=CONVERSATION, max_tokens=30, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert "".join(pieces) == expected
        completion = api.completions.create(model="smol", prompt="hello", max_tokens=5, temperature=0)
        assert completion.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            api.chat.completions.create(model="other", messages=CONVERSATION)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            api.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "hello " * 200}], max_tokens=5
            )
    finally:
        server.stop()
    assert "Traceback" not in server.log()
