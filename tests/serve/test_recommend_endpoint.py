"""``POST /v1/recommend`` in process: the task's own answers, candidates, seen items, bad input as 4xx, and
concurrent requests batched."""

from __future__ import annotations

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
from tests.helpers import recommend_recipe, write_interactions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained SASRec bundle with titles (serving does not care whether it learned anything)."""
    folder = tmp_path_factory.mktemp("recommend-serve")
    titles = folder / "titles.tsv"
    titles.write_text("item_id\ttitle\n" + "".join(f"m{i}\tFilm {i}\n" for i in range(24)))
    raw = recommend_recipe(write_interactions(folder / "log.tsv"), folder / "run")
    raw["data"]["titles"] = str(titles)
    recipe, data = validate_recipe(raw)
    task = TASKS["recommend"].from_recipe(data, recipe.seed, folder / "data")
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **task.model_overrides())
    model.model_name = recipe.model.name
    return save_bundle(folder / "bundle", model, task)


def _client(bundle: Path, limits: Limits | None = None) -> TestClient:
    return TestClient(create_app(Server(load_bundle(bundle), ServeConfig(limits=limits or Limits()), CPU)))


def test_recommend_answers_as_predict_does(bundle: Path) -> None:
    b = load_bundle(bundle)
    want = b.task.predict(b.model, ["m1,m2,m3"], CPU, k=5, candidates="m4,m1")[0]
    with _client(bundle) as c:
        by_list = c.post(
            "/v1/recommend", json={"history": ["m1", "m2", "m3"], "k": 5, "candidates": ["m4", "m1"]}
        )
        by_text = c.post(
            "/v1/recommend", json={"history": "Film 1, Film 2, Film 3", "k": 5, "candidates": "m4,m1"}
        )
        kept = c.post("/v1/recommend", json={"history": "m1", "k": 24, "exclude_seen": False})
        card = c.get("/v1/model").json()
    assert by_list.status_code == 200 and by_text.status_code == 200 and kept.status_code == 200
    for r in (by_list, by_text):
        got = r.json()
        assert got["history"] == ["m1", "m2", "m3"]
        assert [i["item"] for i in got["items"]] == [i["item"] for i in want["items"]]
        assert [i["probability"] for i in got["items"]] == pytest.approx(
            [i["probability"] for i in want["items"]]
        )
        assert got["candidates"][1]["probability"] == 0.0  # m1 was seen
    assert "m1" in [i["item"] for i in kept.json()["items"]]
    assert card["endpoint"] == "/v1/recommend" and card["items"] == 24 and card["input"] == "history"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"history": ["m1", "m404", "Nope"]}, 422, "unknown items ['m404', 'Nope']"),
        ({"history": "m1", "candidates": ["m999"]}, 422, "candidates: unknown item ['m999']"),
        ({"history": " , "}, 422, "history is empty"),
        ({"history": []}, 422, "history is empty"),
        ({"history": "m1", "k": 0}, 422, "k"),
        ({"history": "m1", "k": 25}, 422, "k 25 is more than the 24 items"),
        ({"history": ["m1"] * 11}, 413, "history has 11 items; at most 10"),
        ({"history": "m1", "top": 3}, 422, "top"),
        ({"inputs": "m1"}, 422, "history"),
    ],
)
def test_bad_requests_are_4xx_naming_what_is_wrong(
    bundle: Path, body: dict, status: int, message: str
) -> None:
    with _client(bundle, Limits(max_text_chars=10)) as c:
        r = c.post("/v1/recommend", json=body)
    assert r.status_code == status, r.text
    assert message in r.text


def test_concurrent_requests_each_get_their_own_answer_and_a_batch_scores_as_one_history_alone(
    bundle: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    b = load_bundle(bundle)
    histories = [["m1"], ["m5", "m6"], ["m9", "m10", "m11", "m12"], ["m20"], ["m3", "m4"], ["m7"]]
    want = [b.task.predict(b.model, [",".join(h)], CPU, k=3)[0]["items"] for h in histories]
    calls: list[int] = []
    server = Server(load_bundle(bundle), ServeConfig(limits=Limits()), CPU)
    with TestClient(create_app(server)) as c:
        endpoint = server.endpoint
        run = endpoint.run

        def counted(items: list) -> list:
            calls.append(len(items))
            return run(items)

        endpoint.run = counted
        with ThreadPoolExecutor(len(histories)) as pool:
            answers = list(
                pool.map(lambda h: c.post("/v1/recommend", json={"history": h, "k": 3}), histories)
            )
    for r, items in zip(answers, want, strict=True):
        assert r.status_code == 200
        assert [i["item"] for i in r.json()["items"]] == [i["item"] for i in items]
    assert sum(calls) == len(histories)
    # one batch of histories of different lengths (left-padded together) answers as each alone
    items = [endpoint.items(endpoint.request_model(history=h, k=3))[0] for h in histories]
    together = endpoint.run(items)
    assert [[i["item"] for i in row["items"]] for row in together] == [[i["item"] for i in w] for w in want]
