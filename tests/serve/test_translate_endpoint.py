"""``POST /v1/translate`` in process: one text or a list, the same translations as the task's own, beam
size and length within the server's limits, n-best alternatives, micro-batching, the card."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tansuo.bundle import load_bundle, save_bundle
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tansuo.tasks import TASKS
from tests.helpers import translate_recipe, write_parallel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained translation bundle (serving does not care whether it learned anything)."""
    folder = tmp_path_factory.mktemp("translate-serve")
    recipe, data = validate_recipe(translate_recipe(write_parallel(folder / "pairs", 60), folder / "run"))
    task = TASKS["translate"].from_recipe(data, recipe.seed, folder / "data")
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **{**task.model_overrides(), **recipe.model.overrides})
    model.model_name = recipe.model.name
    return save_bundle(folder / "bundle", model, task)


def _client(bundle: Path, limits: Limits) -> TestClient:
    return TestClient(create_app(Server(load_bundle(bundle), ServeConfig(limits=limits), CPU)))


def test_translate_answers_one_text_or_a_list_as_the_task_does(bundle: Path) -> None:
    b = load_bundle(bundle)
    texts = ["ka lo mi", "nu pe ri so tu"]
    beam = b.task.translate(b.model, texts, CPU, beam_size=4, max_len=20)  # the bundle's 5, capped
    greedy = b.task.translate(b.model, texts, CPU, beam_size=1, max_len=3)
    with _client(bundle, Limits(max_beam=4, max_new_tokens=20)) as c:
        one = c.post("/v1/translate", json={"inputs": texts[0]})
        many = c.post("/v1/translate", json={"inputs": texts})
        short = c.post("/v1/translate", json={"inputs": texts, "beam_size": 1, "max_length": 3})
        card = c.get("/v1/model").json()
    assert one.status_code == 200 and many.status_code == 200 and short.status_code == 200
    assert one.json()["translations"] == [{"input": texts[0], "translation": beam[0]}]
    assert [t["translation"] for t in many.json()["translations"]] == beam
    assert [t["translation"] for t in short.json()["translations"]] == greedy
    assert all(len(b.task.tokenizer.encode(t).ids) <= 3 for t in greedy)
    assert card["endpoint"] == "/v1/translate" and card["source_language"] == "src"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": "ka lo", "beam_size": 9}, 422, "beam_size 9 is above this server's limit of 4"),
        ({"inputs": "ka lo", "max_length": 21}, 422, "max_length 21 is above this server's limit of 20"),
        ({"inputs": ["ka lo", " "]}, 422, "inputs[1] is an empty text"),
        ({"inputs": "ka lo", "beam_size": 0}, 422, "beam_size"),
        (
            {"inputs": "ka lo", "n_best": 5},
            422,
            "n_best 5 is above the beam size 4",
        ),  # the bundle's 5, capped
        ({"inputs": "ka lo", "beam_size": 2, "n_best": 3}, 422, "a beam_size of at least 3"),
        ({"inputs": "ka lo", "n_best": 0}, 422, "n_best"),
    ],
)
def test_requests_beyond_the_limits_are_refused(bundle: Path, body: dict, status: int, message: str) -> None:
    with _client(bundle, Limits(max_beam=4, max_new_tokens=20)) as c:
        r = c.post("/v1/translate", json=body)
    assert r.status_code == status
    assert message in r.text


def test_n_best_answers_alternatives_with_scores_best_first(bundle: Path) -> None:
    b = load_bundle(bundle)
    texts = ["ka lo mi", "nu pe ri so tu"]
    expected = b.task.translate_nbest(b.model, texts, CPU, 3, beam_size=4, max_len=20)
    with _client(bundle, Limits(max_beam=4, max_new_tokens=20)) as c:
        three = c.post("/v1/translate", json={"inputs": texts, "n_best": 3})
        one = c.post("/v1/translate", json={"inputs": texts, "n_best": 1})
        plain = c.post("/v1/translate", json={"inputs": texts})
    assert three.status_code == one.status_code == plain.status_code == 200
    for answer, hyps, alone in zip(
        three.json()["translations"], expected, plain.json()["translations"], strict=True
    ):
        assert set(answer) == {"input", "translation", "alternatives"}
        alternatives = answer["alternatives"]
        assert [(a["translation"], a["score"]) for a in alternatives] == [
            (t, pytest.approx(s)) for t, s in hyps
        ]
        scores = [a["score"] for a in alternatives]
        assert len(alternatives) == 3 and scores == sorted(scores, reverse=True)
        assert len({a["translation"] for a in alternatives}) == 3
        assert answer["translation"] == alternatives[0]["translation"] == alone["translation"]
        assert "alternatives" not in alone
    assert [t["translation"] for t in one.json()["translations"]] == [
        t["translation"] for t in plain.json()["translations"]
    ]
    assert all(len(t["alternatives"]) == 1 for t in one.json()["translations"])


def test_concurrent_requests_are_gathered_into_fewer_model_calls_each_answered_as_alone(bundle: Path) -> None:
    """While the worker is busy with one request, five more arrive; they are translated in one model call
    (each asking its own number of alternatives), and every answer is what the same request gets alone."""
    asks = [
        {"inputs": ["ka lo mi"]},
        {"inputs": ["nu pe", "ri so tu ka"], "n_best": 1},
        {"inputs": ["mi mi nu"], "n_best": 2},
        {"inputs": ["lo ka"], "n_best": 3},
        {"inputs": ["pe ri so", "tu"], "n_best": 3},
        {"inputs": "so so so so", "n_best": 2},
    ]
    settings = {"beam_size": 3, "max_length": 12}
    calls: list[int] = []
    gate, entered = threading.Event(), threading.Event()
    server = Server(load_bundle(bundle), ServeConfig(limits=Limits(max_beam=4, max_new_tokens=20)), CPU)
    with TestClient(create_app(server)) as c:

        def ask(body: dict) -> list[dict]:
            r = c.post("/v1/translate", json={**body, **settings})
            assert r.status_code == 200, r.text
            return r.json()["translations"]

        alone = [ask(body) for body in asks]  # one at a time: each in a call of its own
        endpoint = server.endpoint
        run_batch = endpoint.run

        def gated(items: list) -> list:
            calls.append(len(items))
            entered.set()
            assert gate.wait(60), "the test never opened the gate"
            return run_batch(items)

        endpoint.run = gated
        with ThreadPoolExecutor(len(asks)) as pool:
            first = pool.submit(ask, asks[0])
            assert entered.wait(60)  # the worker is inside the first request's call
            rest = [pool.submit(ask, body) for body in asks[1:]]
            waited = 0.0  # a wait for a state, not a timing assumption: all five queued behind the first
            while server.batcher._queue.qsize() < len(rest) and waited < 60:
                time.sleep(0.01)
                waited += 0.01
            gate.set()
            together = [first.result(), *(f.result() for f in rest)]
    assert calls == [1, 7]  # six requests, two model calls: the five waiting ones (7 texts) as one batch
    for got, want, body in zip(together, alone, asks, strict=True):
        assert [t["translation"] for t in got] == [t["translation"] for t in want]
        for t, w in zip(got, want, strict=True):
            assert ("alternatives" in t) == ("n_best" in body)
            if "alternatives" in t:
                assert len(t["alternatives"]) == body["n_best"]
                assert [a["translation"] for a in t["alternatives"]] == [
                    a["translation"] for a in w["alternatives"]
                ]
                assert [a["score"] for a in t["alternatives"]] == pytest.approx(
                    [a["score"] for a in w["alternatives"]], abs=1e-5
                )


def test_concurrent_requests_with_different_settings_each_get_their_own_translations(bundle: Path) -> None:
    """Micro-batching: requests that arrive together are translated as one batch when their beam and
    length agree, in batches of their own when not; every answer is what the task gives for it alone."""
    from concurrent.futures import ThreadPoolExecutor

    b = load_bundle(bundle)
    asks = [
        (["ka lo mi"], 1, 12),
        (["nu pe", "ri so tu ka"], 3, 12),
        (["mi mi nu"], 1, 12),
        (["lo ka"], 1, 4),
        (["pe ri so", "tu"], 3, 12),
        (["so so so so"], 2, 8),
    ]
    expected = [b.task.translate(b.model, texts, CPU, beam, length) for texts, beam, length in asks]
    seen: list[list] = []
    server = Server(load_bundle(bundle), ServeConfig(limits=Limits(max_beam=4, max_new_tokens=20)), CPU)
    with TestClient(create_app(server)) as c:
        endpoint = server.endpoint
        run_batch = endpoint.run

        def recording(items: list) -> list:
            seen.append(items)
            return run_batch(items)

        endpoint.run = recording

        def ask(i: int) -> list[str]:
            texts, beam, length = asks[i]
            body = {"inputs": texts, "beam_size": beam, "max_length": length}
            return [t["translation"] for t in c.post("/v1/translate", json=body).json()["translations"]]

        with ThreadPoolExecutor(len(asks)) as pool:
            assert list(pool.map(ask, range(len(asks)))) == expected
    assert sum(len(items) for items in seen) == sum(len(texts) for texts, _, _ in asks)
    for items in seen:  # a batch holds one setting
        assert len({(item.beam_size, item.max_length) for item in items}) == 1
