"""Schemathesis against every task's app: requests generated from the server's own OpenAPI schema (valid and
invalid) get no 5xx, only documented status codes and content types, and answers that fit the schema. A few
examples per route here; many more under ``-m slow``."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tansuo.bundle import load_bundle
from tansuo.serve.app import ServeConfig, Server, create_app
from tansuo.serve.endpoints import Limits
from tests.helpers import (
    classify_recipe,
    detect_recipe,
    image_recipe,
    lm_recipe,
    mlm_recipe,
    recommend_recipe,
    segment_recipe,
    translate_recipe,
    write_digits_csv,
    write_interactions,
    write_parallel,
    write_sentiment_tsv,
    write_yolo_boxes,
)
from tests.serve.test_app import CPU, untrained_bundle

# positive_data_acceptance is left out on purpose: the server refuses some schema-valid requests for what
# a schema cannot say (an empty text, a picture that does not decode, a limit set by a flag), with a 4xx
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def _recipe(task: str, tmp: Path, image_npz: Path, text_file: Path) -> dict:
    out = tmp / "run"
    if task == "image":
        return image_recipe(image_npz, out)
    if task == "classify":
        return classify_recipe(write_sentiment_tsv(tmp / "s.tsv", 60), out)
    if task == "mlm":
        return mlm_recipe(text_file, out)
    if task == "lm":
        return lm_recipe(text_file, out)
    if task == "recommend":
        return recommend_recipe(write_interactions(tmp / "log.tsv"), out)
    if task == "segment":
        return segment_recipe(write_digits_csv(tmp / "digits.csv", 40), out)
    if task == "detect":
        return detect_recipe(write_yolo_boxes(tmp / "boxes"), out)
    return translate_recipe(write_parallel(tmp / "par", 60), out)


def _fuzz(task: str, tmp_path: Path, image_npz: Path, text_file: Path, examples: int) -> None:
    bundle = untrained_bundle(_recipe(task, tmp_path, image_npz, text_file), tmp_path / "b")
    limits = Limits(max_new_tokens=8, max_items=4, max_text_chars=200, timeout_s=20.0)
    server = Server(load_bundle(bundle), ServeConfig(limits=limits, max_wait_ms=0.0), CPU)
    server.start()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(server))
        failures = {}
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def check(case) -> None:
                case.call_and_validate(checks=CHECKS)

            try:
                check()
            except Exception as e:  # collected: every route is fuzzed, then all failures are shown
                failures[operation.label] = str(e)[:2000]
        assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    finally:
        server.stop()


TASKS = ["image", "classify", "mlm", "lm", "recommend", "translate", "segment", "detect"]


@pytest.mark.parametrize("task", TASKS)
def test_a_short_fuzz_finds_nothing(task: str, tmp_path: Path, image_npz: Path, text_file: Path) -> None:
    _fuzz(task, tmp_path, image_npz, text_file, examples=8)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_a_long_fuzz_finds_nothing(task: str, tmp_path: Path, image_npz: Path, text_file: Path) -> None:
    _fuzz(task, tmp_path, image_npz, text_file, examples=150)
