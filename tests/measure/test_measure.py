"""Measurement (``tansuo.measure``): sizes, weight counts, speed arithmetic, in-process and fresh-process
measurement of tiny untrained bundles. No assertion depends on a timing beyond its being positive and
finite."""

from __future__ import annotations

import copy
import math
import statistics
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tansuo.bundle import load_bundle, save_bundle
from tansuo.compress import Int8DynamicConfig, quantize_
from tansuo.errors import CompressionError
from tansuo.measure import run as measure
from tansuo.measure.run import (
    compare_in_rounds,
    compressed_bytes,
    folder_bytes,
    input_tokens,
    measure_bundle,
    measure_in_subprocess,
    measure_speed,
    speed_figures,
    time_calls,
    weight_count,
    weights_file,
)
from tansuo.models import create_model
from tansuo.recipe import validate_recipe
from tansuo.tasks import TASKS
from tests.helpers import classify_recipe, image_recipe, write_sentiment_tsv

CPU = torch.device("cpu")
FIGURES = ("latency_ms_p50", "latency_ms_p95", "throughput_per_s")


def _built(raw: dict, work: Path) -> tuple[torch.nn.Module, object]:
    recipe, data = validate_recipe(raw)
    task = TASKS[recipe.task].from_recipe(data, recipe.seed, work)
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **{**recipe.model.overrides, **task.model_overrides()})
    return model.eval(), task


@pytest.fixture(scope="module")
def classify_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained bert_test classifier (64 positions) on 60 labelled sentences."""
    folder = tmp_path_factory.mktemp("classify")
    raw = classify_recipe(write_sentiment_tsv(folder / "train.tsv", 60), folder / "run")
    raw["data"].update(vocab_size=200, max_seq_len=16)
    model, task = _built(raw, folder / "work")
    return save_bundle(folder / "bundle", model, task)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained vit_test on 80 8x8 images of four classes."""
    folder = tmp_path_factory.mktemp("image")
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 4
    images = rng.uniform(0, 2, size=(80, 8, 8)).astype(np.float32)
    np.savez(folder / "bars.npz", x=images, y=labels)
    model, task = _built(image_recipe(folder / "bars.npz", folder / "run"), folder / "work")
    return save_bundle(folder / "bundle", model, task)


def _positive_figures(figures: dict) -> None:
    for key in FIGURES:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["latency_ms_p95"] >= figures["latency_ms_p50"]
    assert figures["latency_spread"] >= 0


# ------------------------------------------------------------------------------------------------ sizes


def test_folder_bytes_counts_every_file_below(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x.bin").write_bytes(b"1" * 100)
    (tmp_path / "a" / "y.bin").write_bytes(b"2" * 2000)
    (tmp_path / "a" / "b" / "z.bin").write_bytes(b"")
    (tmp_path / "a" / "b" / "w.bin").write_bytes(b"3" * 7)
    assert folder_bytes(tmp_path) == 2107
    assert folder_bytes(tmp_path / "a") == 2007
    assert folder_bytes(tmp_path / "a" / "b") == 7


def test_compressed_bytes_is_what_zlib_makes_of_the_file(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(6 << 20))  # more than one 4 MiB read
    noise = tmp_path / "noise.bin"
    data = np.random.default_rng(0).integers(0, 256, size=200_000, dtype=np.uint8).tobytes()
    noise.write_bytes(data)
    assert compressed_bytes(zeros) < (6 << 20) // 100  # zeros vanish
    assert compressed_bytes(noise) >= len(data)  # noise does not compress
    assert compressed_bytes(noise) == len(zlib.compress(data, 1))
    assert compressed_bytes(zeros, level=9) <= compressed_bytes(zeros, level=1)


def test_weights_file_is_the_onnx_model_when_there_is_one(tmp_path: Path) -> None:
    assert weights_file(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "model.onnx").write_bytes(b"graph")
    assert weights_file(tmp_path) == tmp_path / "model.onnx"


# ------------------------------------------------------------------------------------------------ weights


def test_weight_count_keeps_int8_weights_that_are_no_longer_parameters() -> None:
    torch.manual_seed(0)
    plain = create_model("bert_test", num_classes=2)
    params = sum(p.numel() for p in plain.parameters())
    assert weight_count(plain) == params
    quantized = copy.deepcopy(plain)
    names = quantize_(quantized, Int8DynamicConfig())
    assert names
    assert sum(p.numel() for p in quantized.parameters()) < params  # int8 weights are buffers now
    assert weight_count(quantized) == params


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_count_keeps_weight_only_weights(bits: int) -> None:
    from tansuo.compress.weight_only import WeightOnlyConfig, quantize_weights_

    torch.manual_seed(0)
    model = create_model("gpt_test", tie_embeddings=False)
    params = sum(p.numel() for p in model.parameters())
    quantize_weights_(model, WeightOnlyConfig(bits=bits))
    assert sum(p.numel() for p in model.parameters()) < params
    assert weight_count(model) == params  # each int8 or int4 weight counts once


def test_weight_count_of_an_onnx_model_is_its_own_count() -> None:
    class Onnx(torch.nn.Module):
        onnx_file = "model.onnx"

        def num_params(self) -> int:
            return 1234

    assert weight_count(Onnx()) == 1234


# ------------------------------------------------------------------------------------------------ speed


def test_speed_figures_arithmetic() -> None:
    t1 = [k / 1000 for k in (7, 1, 20, 3, 5, 9, 11, 2, 4, 6, 8, 10, 12, 13, 14, 15, 16, 17, 18, 19)]
    tn = [0.5, 0.25, 1.0]
    figures = speed_figures(t1, tn, large_batch=32, input_tokens=64)
    assert figures["latency_ms_p50"] == pytest.approx(10.5, rel=1e-12)  # mean of the 10th and 11th of 20
    assert figures["latency_ms_p95"] == pytest.approx(19.0, rel=1e-12)  # sorted[round(0.95 * 19)]
    assert figures["latency_spread"] == pytest.approx((19.0 - 10.5) / 10.5, rel=1e-12)
    assert figures["throughput_per_s"] == pytest.approx(32 / 0.5, rel=1e-12)
    assert figures["input_tokens"] == 64


def test_speed_figures_of_one_call_and_of_odd_counts() -> None:
    one = speed_figures([0.004], [0.25], large_batch=8, input_tokens=0)
    assert one["latency_ms_p50"] == one["latency_ms_p95"] == pytest.approx(4.0, rel=1e-12)
    assert one["latency_spread"] == 0
    assert one["throughput_per_s"] == pytest.approx(32.0, rel=1e-12)
    odd = speed_figures([0.003, 0.001, 0.002], [0.1, 0.3, 0.2], large_batch=4, input_tokens=0)
    assert odd["latency_ms_p50"] == pytest.approx(2.0, rel=1e-12)
    assert odd["latency_ms_p95"] == pytest.approx(3.0, rel=1e-12)  # sorted[round(0.95 * 2)] = sorted[2]
    assert odd["throughput_per_s"] == pytest.approx(4 / 0.2, rel=1e-12)


def test_time_calls_gives_the_asked_number_of_positive_times(image_bundle: Path) -> None:
    b = load_bundle(image_bundle)
    t1, tn, timed = time_calls(b.model, b.task, large_batch=4, reps=10, warmup=1)
    assert timed == "forward"
    assert len(t1) == 10 and len(tn) == 3  # reps / 5, at least 3
    assert all(math.isfinite(t) and t > 0 for t in t1 + tn)


@pytest.mark.parametrize(("seq_len", "tokens"), [(8, 8), (128, 64)])  # bert_test has 64 positions
def test_measure_speed_of_a_text_task_counts_its_tokens(
    classify_bundle: Path, seq_len: int, tokens: int
) -> None:
    b = load_bundle(classify_bundle)
    assert b.model.config.max_seq_len == 64
    assert input_tokens(b.model, b.task, seq_len) == tokens
    figures = measure_speed(b.model, b.task, seq_len=seq_len, large_batch=2, reps=5, warmup=1)
    _positive_figures(figures)
    assert figures["input_tokens"] == tokens


def test_measure_speed_of_an_image_task_counts_no_tokens(image_bundle: Path) -> None:
    b = load_bundle(image_bundle)
    figures = measure_speed(b.model, b.task, large_batch=4, reps=5, warmup=1)
    _positive_figures(figures)
    assert figures["input_tokens"] == 0


# ------------------------------------------------------------------------------------------------ bundles


@pytest.mark.parametrize("which", ["classify_bundle", "image_bundle"])
def test_measure_bundle_reports_the_task_quality_size_and_params(
    which: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(which)
    result = measure_bundle(path, seq_len=8, large_batch=2, reps=5)
    b = load_bundle(path)
    split = b.task.heldout_split
    want = b.task.evaluate(b.model, split, 64, CPU)
    assert result["split"] == split
    assert result["metric"] == b.task.default_metric
    assert result["quality"] == pytest.approx(float(want[b.task.default_metric]), abs=1e-6)
    assert set(result["metrics"]) <= set(want)
    assert all(isinstance(v, int | float) for v in result["metrics"].values())
    assert result["size_bytes"] == folder_bytes(path) == sum(f.stat().st_size for f in path.iterdir())
    assert result["size_zipped_bytes"] == compressed_bytes(path / "model.safetensors")
    assert result["params"] == sum(p.numel() for p in b.model.parameters())
    assert result["threads"] == torch.get_num_threads()
    assert result["bundle"] == str(path)
    assert result["peak_rss_mb"] > 0
    _positive_figures(result)


def test_measure_bundle_without_quality(image_bundle: Path) -> None:
    result = measure_bundle(image_bundle, large_batch=2, reps=5, quality=False)
    assert "quality" not in result and "split" not in result
    _positive_figures(result)


def test_measure_in_subprocess_gives_the_same_quality(image_bundle: Path) -> None:
    here = measure_bundle(image_bundle, large_batch=2, reps=5)
    there = measure_in_subprocess(image_bundle, threads=torch.get_num_threads(), large_batch=2, reps=5)
    assert there["quality"] == pytest.approx(here["quality"], abs=1e-6)
    assert there["metric"] == here["metric"] and there["split"] == here["split"]
    assert there["params"] == here["params"] and there["size_bytes"] == here["size_bytes"]
    assert there["threads"] == torch.get_num_threads()
    _positive_figures(there)


def test_measure_in_subprocess_of_a_folder_that_is_no_bundle_raises_with_stderr(tmp_path: Path) -> None:
    with pytest.raises(CompressionError, match="measuring .* failed") as caught:
        measure_in_subprocess(tmp_path / "nothing", reps=3)
    assert "bundle not found" in str(caught.value)  # the tail of the child's stderr


def test_compare_in_rounds_pools_rotating_rounds_per_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    times = {"a": ([0.001, 0.003], [0.1]), "b": ([0.002, 0.004], [0.2]), "c": ([0.005, 0.007], [0.4])}

    def fake(path: Path, **kwargs: object) -> dict:
        calls.append((str(path), kwargs))
        t1, tn = times[str(path)]
        return {"t1": list(t1), "tn": list(tn), "input_tokens": len(str(path)), "timed": "forward"}

    monkeypatch.setattr(measure, "measure_in_subprocess", fake)
    out = compare_in_rounds([Path("a"), Path("b"), Path("c")], rounds=3, reps=12, large_batch=8, seq_len=16)
    assert [c[0] for c in calls] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(kw == {"speed_only": True, "reps": 5, "large_batch": 8, "seq_len": 16} for _, kw in calls)
    assert len(out) == 3
    for figures, name in zip(out, "abc", strict=True):
        t1, tn = times[name]
        assert figures == speed_figures(t1 * 3, tn * 3, 8, 1)
    assert out[0]["latency_ms_p50"] == pytest.approx(1000 * statistics.median([0.001, 0.003] * 3))


def test_compare_in_rounds_keeps_the_order_of_the_paths(classify_bundle: Path, image_bundle: Path) -> None:
    out = compare_in_rounds(
        [classify_bundle, image_bundle], rounds=1, reps=5, large_batch=2, seq_len=8, threads=1
    )
    assert [f["input_tokens"] for f in out] == [8, 0]  # the text bundle first, as asked
    for figures in out:
        _positive_figures(figures)


@pytest.mark.parametrize(
    "flags",
    [
        {"quality": True, "speed_only": False},
        {"quality": False, "speed_only": False},
        {"speed_only": True, "seq_len": 8, "data_path": None},
    ],
)
def test_every_keyword_of_measure_in_subprocess_is_a_flag_its_child_takes(
    image_bundle: Path, flags: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The child's command line, run in this process (``main``), accepts what the keywords become."""
    commands = []

    def in_process(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(cmd)
        capsys.readouterr()
        try:
            measure.main(cmd[3:])
        except SystemExit as e:  # argparse refusing a flag
            return subprocess.CompletedProcess(cmd, e.code or 2, "", capsys.readouterr().err)
        return subprocess.CompletedProcess(cmd, 0, capsys.readouterr().out, "")

    monkeypatch.setattr(measure.subprocess, "run", in_process)
    out = measure_in_subprocess(image_bundle, threads=torch.get_num_threads(), reps=3, large_batch=2, **flags)
    assert commands[0][1:4] == ["-m", "tansuo.measure", str(image_bundle)]
    if flags.get("speed_only"):
        assert len(out["t1"]) == 3 and out["input_tokens"] == 0
    else:
        assert ("quality" in out) == flags["quality"]


def test_a_decoder_is_timed_per_decoded_token(text_file: Path, tmp_path: Path) -> None:
    """lm bundles time one decoding step after a prompt (what a generated token costs), not a forward pass
    over the prompt; the cache rewinds to the prompt, so any number of calls does the same work."""
    from tests.helpers import lm_recipe

    model, task = _built(lm_recipe(text_file, tmp_path / "run"), tmp_path)
    model.eval()
    limit = model.config.max_seq_len
    torch.manual_seed(0)
    with torch.inference_mode():
        timed, step = task.timed_call(model, 2, 1000, calls=10)
        assert timed == "decode step"
        torch.manual_seed(0)
        (prompt,) = task.example_input(model, 2, limit // 2)  # the prompt the call was prepared with
        first = step()
        assert first.shape == (2, 1, model.config.vocab_size)
        # the step continues the prompt: the model's logits for the prompt plus its last token again
        full = model(torch.cat([prompt, prompt[:, -1:]], dim=1))[:, -1:]
        torch.testing.assert_close(first, full, rtol=1e-4, atol=1e-4)
        for _ in range(3 * 64):  # past the cache's 64 free positions, rewinding to the prompt each time
            last = step()
    torch.testing.assert_close(last, first, rtol=1e-5, atol=1e-5)
    figures = measure_speed(model, task, seq_len=8, large_batch=3, reps=5, warmup=1)
    assert figures["timed"] == "decode step" and figures["input_tokens"] == 8
    _positive_figures(figures)
