"""Measure a bundle the way it will be used: quality, size, parameters, latency, throughput, peak memory.

Every variant is measured in a fresh process (``python -m tansuo.measure BUNDLE``) that loads the
bundle from disk, so the figures include the save / load round trip, and peak memory (the process's peak
resident set, ``VmHWM``, after the speed runs) is not inflated by whatever ran before. Quality is the task's
default metric on the bundle's held-back split, which training never saw.

Speed is compared in rounds (:func:`compare_in_rounds`): each variant is timed in a fresh process, in
rotating order, a few times over, and the calls of all rounds are pooled. Drift in machine load (this
machine's latency for the same model wanders by 30% over minutes) then hits every variant alike, and no
runtime's idle threads (ONNX Runtime's and OpenMP's spin after each call) slow another's. Latency is timed
after warm-up under ``torch.inference_mode`` with a fixed number of threads (recorded), as median and p95 of
batch-1 calls; throughput is items per second at a larger batch.

What a call is given is the task's to say (``Task.example_input``): text models get ``seq_len`` random
tokens with no padding (batch 1 x 128 by default), image models random images of their input size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tansuo.errors import CompressionError
from tansuo.plugins import load_plugins
from tansuo.tasks.base import Task


def folder_bytes(path: Path) -> int:
    """Bytes of every file in a folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def compressed_bytes(path: Path, level: int = 1) -> int:
    """Bytes of ``path`` after zlib (what a zip of the file would take; zeros of sparse weights vanish)."""
    z, total = zlib.compressobj(level), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            total += len(z.compress(chunk))
    return total + len(z.flush())


def weights_file(bundle: Path) -> Path:
    """The file that holds a bundle's model: model.safetensors, or model.onnx for ONNX Runtime bundles."""
    onnx = Path(bundle) / "model.onnx"
    return onnx if onnx.is_file() else Path(bundle) / "model.safetensors"


def weight_count(model: nn.Module) -> int:
    """Parameters plus the weights and biases of quantized layers (int8 and weight-only int8/int4 layers keep
    them as buffers; one weight counts once however many bits it has)."""
    from tansuo.compress.quantize import Int8DynamicLinear
    from tansuo.compress.weight_only import WeightOnlyLinear

    if getattr(model, "onnx_file", None) is not None:
        return model.num_params()
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Int8DynamicLinear):
            total += m.weight.numel() + (0 if m.bias is None else m.bias.numel())
        elif isinstance(m, WeightOnlyLinear):
            total += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
    return total


def _time(fn: Any, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def time_calls(
    model: nn.Module,
    task: Task,
    *,
    seq_len: int = 128,
    large_batch: int = 32,
    reps: int = 50,
    warmup: int = 5,
) -> tuple[list[float], list[float], str]:
    """Seconds per call at batch 1 (``reps`` calls) and at ``large_batch`` (``reps / 5``, at least 3): the
    call the task times (:meth:`Task.timed_call`: a forward pass over its example inputs, a decoder's
    decoding step), and what the call is."""
    model.eval()
    reps_n, warmup_n = max(3, reps // 5), max(1, warmup // 2)
    with torch.inference_mode():
        timed, one = task.timed_call(model, 1, seq_len, reps + warmup)
        t1 = _time(one, reps, warmup)
        del one  # a decoder's cache for batch 1 goes before the large batch's is made
        _, many = task.timed_call(model, large_batch, seq_len, reps_n + warmup_n)
        tn = _time(many, reps_n, warmup_n)
    return t1, tn, timed


def speed_figures(
    t1: list[float], tn: list[float], large_batch: int, input_tokens: int, timed: str = "forward"
) -> dict[str, Any]:
    """Latency p50 / p95 (ms) and spread at batch 1, throughput (items/s; a decoder's tokens/s) at
    ``large_batch``; ``timed`` says what a call was (:meth:`Task.timed_call`)."""
    return {
        "latency_ms_p50": 1000 * statistics.median(t1),
        "latency_ms_p95": 1000 * _p95(t1),
        "latency_spread": (_p95(t1) - statistics.median(t1)) / statistics.median(t1),
        "throughput_per_s": large_batch / statistics.median(tn),
        "input_tokens": input_tokens,
        "timed": timed,
    }


def input_tokens(model: nn.Module, task: Task, seq_len: int) -> int:
    """Tokens per timing input (0 when the input is not a sequence of token ids)."""
    x = task.example_input(model, 1, seq_len)[0]
    return int(x.shape[1]) if x.dim() == 2 and not x.is_floating_point() else 0


def measure_speed(
    model: nn.Module,
    task: Task,
    *,
    seq_len: int = 128,
    large_batch: int = 32,
    reps: int = 50,
    warmup: int = 5,
) -> dict[str, float]:
    """Latency p50 / p95 (ms) at batch 1 and throughput (items/s) at ``large_batch``, on the CPU."""
    t1, tn, timed = time_calls(
        model, task, seq_len=seq_len, large_batch=large_batch, reps=reps, warmup=warmup
    )
    return speed_figures(t1, tn, large_batch, input_tokens(model, task, seq_len), timed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` on Linux (reset by exec, unlike
    ``ru_maxrss``, which keeps the parent's peak), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def measure_bundle(
    path: Path,
    *,
    seq_len: int = 128,
    large_batch: int = 32,
    reps: int = 50,
    data_path: str | None = None,
    quality: bool = True,
) -> dict[str, Any]:
    """Load a bundle (CPU) and measure it in this process; see the module docstring."""
    from tansuo.bundle import load_bundle

    path = Path(path)
    b = load_bundle(path, device="cpu", data_path=data_path)
    result: dict[str, Any] = {
        "bundle": str(path),
        "threads": torch.get_num_threads(),
        "params": weight_count(b.model),
        "size_bytes": folder_bytes(path),
        "size_zipped_bytes": compressed_bytes(weights_file(path)),
    }
    result.update(measure_speed(b.model, b.task, seq_len=seq_len, large_batch=large_batch, reps=reps))
    result["peak_rss_mb"] = peak_rss_mb()
    if quality:
        split = b.task.heldout_split
        with torch.inference_mode():
            metrics = b.task.evaluate(b.model, split, 64, torch.device("cpu"))
        result["split"] = split
        result["metric"] = b.task.default_metric
        # a fraction, or a loss: reports show a fraction x100 as points (BLEU is divided back by 100)
        result["quality"] = float(metrics[b.task.default_metric]) / b.task.quality_scale
        result["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return result


def compare_in_rounds(
    paths: list[Path], *, rounds: int = 3, reps: int = 50, large_batch: int = 32, **kwargs: Any
) -> list[dict[str, float]]:
    """Speed of several bundles, each timed in its own process, in ``rounds`` rounds of ``reps / rounds``
    calls in rotating order: drift in machine load is shared, and no runtime's idle threads (ONNX Runtime
    and OpenMP both spin after a call) slow another's. Returns :func:`speed_figures` per path."""
    per_round = max(5, reps // rounds)
    t1: list[list[float]] = [[] for _ in paths]
    tn: list[list[float]] = [[] for _ in paths]
    tokens = [0] * len(paths)
    timed = ["forward"] * len(paths)
    for r in range(rounds):
        for j in range(len(paths)):
            i = (r + j) % len(paths)
            out = measure_in_subprocess(
                paths[i], speed_only=True, reps=per_round, large_batch=large_batch, **kwargs
            )
            t1[i] += out["t1"]
            tn[i] += out["tn"]
            tokens[i], timed[i] = out["input_tokens"], out["timed"]
    return [
        speed_figures(a, b, large_batch, n, what) for a, b, n, what in zip(t1, tn, tokens, timed, strict=True)
    ]


def speed_in_rounds(paths: list[Path], figures: list[dict[str, Any]], *, rounds: int, **kwargs: Any) -> None:
    """Replace the speed figures of bundles already measured one by one with figures from
    :func:`compare_in_rounds` (comparable ratios between them); nothing to compare for a single bundle."""
    if len(paths) < 2:
        return
    for f, speed in zip(figures, compare_in_rounds(paths, rounds=rounds, **kwargs), strict=True):
        f.update(speed)


def measure_in_subprocess(path: Path, *, threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_bundle` in a fresh Python process (honest peak memory), or with ``speed_only=True``
    only the raw call times; raises with its stderr."""
    cmd = [sys.executable, "-m", "tansuo.measure", str(path)]
    for key, value in kwargs.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is False:
            cmd.append("--no-" + key.replace("_", "-"))
        else:
            cmd += [flag] if value is True else [flag, str(value)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise CompressionError(f"measuring {path} failed:\n  " + "\n  ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure one bundle; prints one JSON line.")
    p.add_argument("bundle", type=Path)
    # --x / --no-x for every switch: measure_in_subprocess turns keyword True into --x and False into --no-x
    p.add_argument(
        "--speed-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="only time calls; print the raw seconds",
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--data-path", default=None)
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    load_plugins()  # a bundle of a plugin's task measures like any other
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed_only:
        from tansuo.bundle import load_bundle

        b = load_bundle(args.bundle, device="cpu")
        t1, tn, timed = time_calls(
            b.model, b.task, seq_len=args.seq_len, large_batch=args.large_batch, reps=args.reps
        )
        tokens = input_tokens(b.model, b.task, args.seq_len)
        print(json.dumps({"t1": t1, "tn": tn, "input_tokens": tokens, "timed": timed}))
        return
    result = measure_bundle(
        args.bundle,
        seq_len=args.seq_len,
        large_batch=args.large_batch,
        reps=args.reps,
        data_path=args.data_path,
        quality=args.quality,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
