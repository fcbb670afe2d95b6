"""PII scrubbing with Presidio's recognizers: every type found, nothing else touched, files of every format,
the recipe field of the text tasks, the command and the server's --redact-output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tansuo.data.pii import Scrubber, check_types, scrub_file
from tansuo.errors import DataError
from tests.helpers import classify_recipe, lm_recipe, run

ALL = ["email", "phone", "credit_card", "iban", "ip", "url"]


def luhn_card(prefix: str, length: int, rng: random.Random) -> str:
    digits = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit will sit to the right: double every other
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


def iban(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def grouped(s: str) -> str:
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber(ALL)


def test_every_type_is_found_in_synthetic_text(scrubber: Scrubber) -> None:
    rng = random.Random(0)
    cases = {
        "email": ["jane.roe@example.com", "x_y+tag@mail.example.co.uk"],
        "phone": [
            "+44 20 7946 0958",
            "+49 30 901820",
            "+1 212-555-0182",
            "+33 1 42 68 53 00",
            "+81 3-1234-5678",
        ],
        "credit_card": [luhn_card("4", 16, rng), grouped(luhn_card("51", 16, rng)), luhn_card("37", 15, rng)],
        "iban": [iban("GB", "WEST12345698765432"), grouped(iban("DE", "370400440532013000"))],
        "ip": ["192.168.1.20", "2001:db8::ff00:42:8329"],
        "url": ["https://example.org/a?b=1", "www.tansuo.dev/docs"],
    }
    for kind, values in cases.items():
        placeholder = {"email": "<EMAIL>", "phone": "<PHONE>", "credit_card": "<CREDIT_CARD>"}.get(
            kind, {"iban": "<IBAN>", "ip": "<IP>", "url": "<URL>"}.get(kind)
        )
        for value in values:
            before = scrubber.counts[kind]
            out = scrubber(f"Write to me at {value} today.")
            assert out == f"Write to me at {placeholder} today.", (kind, value, out)
            assert scrubber.counts[kind] == before + 1


@pytest.mark.parametrize(
    "text",
    [
        "A charming, moving film - not dull at all.",
        "I paid 20 dollars in 1999 for 3 tickets; it runs 112 minutes.",
        "torch 2.13.0, step 1500, loss 3.2, lr 1e-3, seed 1337",
        "He left at 10:30 on 12/05/2020 with order #123456789.",
        "4111 1111 1111 1112 fails the Luhn check",
        "GB00 WEST 1234 5698 7654 32 has a wrong check",
    ],
)
def test_text_without_pii_is_unchanged(scrubber: Scrubber, text: str) -> None:
    assert scrubber(text) == text


def test_unknown_and_unavailable_types_are_refused() -> None:
    with pytest.raises(DataError, match="unknown type 'ssn'"):
        check_types(["email", "ssn"])
    with pytest.raises(DataError, match="named-entity model"):
        check_types(["person"])


def test_files_of_every_format(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("mail a@example.com\nnothing here\n")
    (tmp_path / "a.csv").write_text('email,text\nx@example.com,"call +44 20 7946 0958, now"\n')
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"email": "k", "m": [{"t": "at b@example.org"}], "n": 3}) + "\n"
    )
    assert scrub_file(tmp_path / "a.txt", tmp_path / "b.txt", ["email"]) == {"email": 1}
    assert (tmp_path / "b.txt").read_text() == "mail <EMAIL>\nnothing here\n"
    assert scrub_file(tmp_path / "a.csv", tmp_path / "b.csv", ALL)["phone"] == 1
    assert (tmp_path / "b.csv").read_text() == 'email,text\n<EMAIL>,"call <PHONE>, now"\n'  # header kept
    scrub_file(tmp_path / "a.jsonl", tmp_path / "b.jsonl", ["email"])
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {
        "email": "k",
        "m": [{"t": "at <EMAIL>"}],
        "n": 3,
    }
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not JSON"):
        scrub_file(tmp_path / "bad.jsonl", tmp_path / "c.jsonl", ["email"])


def test_the_scrub_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("from 10.0.0.1 to a@example.com\n")
    code, out, _ = run(["scrub", str(src), "--output", str(tmp_path / "out.txt")], monkeypatch, capsys)
    assert code == 0 and "1 email" in out and "1 ip" in out
    assert (tmp_path / "out.txt").read_text() == "from <IP> to <EMAIL>\n"
    code, _, err = run(["scrub", str(src), "-o", str(src)], monkeypatch, capsys)
    assert code == 2 and "is the input" in err and src.read_text() == "from 10.0.0.1 to a@example.com\n"
    code, _, err = run(
        ["scrub", str(src), "-o", str(tmp_path / "x"), "--types", "person"], monkeypatch, capsys
    )
    assert code == 2 and "named-entity model" in err


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_classifier_trains_on_scrubbed_texts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from tansuo.bundle import load_bundle
    from tests.helpers import write_recipe

    rows = ["sentence\tlabel"] + [
        f"{'great' if i % 2 else 'awful'} film, mail reviewer{i}@example.com\t{i % 2}" for i in range(60)
    ]
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    raw = classify_recipe(tmp_path / "t.tsv", tmp_path / "run", max_steps=2)
    raw["data"]["scrub_pii"] = ["email"]
    code, _, err = run(["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    (data,) = [e for e in _events(tmp_path / "run") if e["event"] == "data"]
    assert data["pii_scrubbed"] == {"email": 60}  # every split's rows
    vocab = load_bundle(tmp_path / "run" / "bundle").task.tokenizer.get_vocab()
    assert "reviewer1" not in vocab and "example" not in vocab
    raw["data"]["scrub_pii"] = ["names"]
    code, _, err = run(["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--quiet"], monkeypatch, capsys)
    assert code == 2 and "scrub_pii" in err and "unknown type 'names'" in err


def test_a_language_model_trains_on_a_scrubbed_copy(tmp_path: Path) -> None:
    from tansuo.recipe import validate_recipe
    from tansuo.tasks import get_task

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not, ask me at who@example.com or 192.168.0.1\n" * 40)
    raw = lm_recipe(corpus, tmp_path / "run")
    raw["data"]["scrub_pii"] = ["email", "ip"]
    recipe, data = validate_recipe(raw)
    task = get_task("lm").from_recipe(data, recipe.seed, tmp_path / "work")
    assert task.data_report == {"pii_scrubbed": {"email": 40, "ip": 40}}
    text = task.tokenizer.decode(task._split("train")[:200].tolist())
    assert "<EMAIL>" in text and "<IP>" in text and "@" not in text
    again = get_task("lm").from_recipe(data, recipe.seed, tmp_path / "work")  # the copy is reused
    assert again.data_report == task.data_report


def test_serve_redacts_generated_text_whole_and_streamed(text_file: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tansuo.bundle import load_bundle
    from tansuo.serve.app import ServeConfig, Server, create_app
    from tansuo.serve.endpoints import Limits
    from tests.serve.test_app import CPU, untrained_bundle

    bundle = untrained_bundle(lm_recipe(text_file, tmp_path / "run"), tmp_path / "lm")
    limits = Limits(redact_output=("email",))
    server = Server(load_bundle(bundle), ServeConfig(limits=limits, batching="static"), CPU)
    for e in server.endpoints:  # an untrained model writes no addresses: make its text hold one
        if hasattr(e, "text"):
            e.text = lambda job, new: "mail me at who@example.com" if new else ""
    with TestClient(create_app(server)) as c:
        whole = c.post("/v1/generate", json={"prompt": "to", "max_new_tokens": 4}).json()
        assert whole["completion"] == "mail me at <EMAIL>"
        streamed = c.post("/v1/generate", json={"prompt": "to", "max_new_tokens": 4, "stream": True}).text
        assert "who@example.com" not in streamed and "mail me at <EMAIL>" in streamed
        assert c.get("/v1/model").json()["limits"]["redact_output"] == ["email"]


def test_openai_routes_hold_a_redacted_answer_back_until_it_is_whole(scrubber: Scrubber) -> None:
    from tansuo.models.generation import GenerationJob
    from tansuo.serve.endpoints.openai import _Detokenizer

    job = GenerationJob(ids=[0], max_new_tokens=8, temperature=0.0)
    words = ["mail ", "who", "@exam", "ple.com", " now"]
    text = _Detokenizer(lambda out: "".join(words[: len(out)]), job, stops=[], redact=scrubber)
    pieces = []
    for i in range(len(words)):
        job.output.append(i)
        pieces.append(text.push())
    assert pieces == [""] * len(words)  # nothing leaves while the address is half written
    assert text.finish() == "mail <EMAIL> now" and text.text == "mail <EMAIL> now"
    assert text.finish() == ""
