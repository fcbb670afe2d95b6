"""Measure a bundle the way it will be used: quality, size, parameters, latency, throughput, peak memory.

Every variant is measured in a fresh process (``python -m tansuo.compress.measure BUNDLE``) that loads the
bundle from disk, so the figures include the save / load round trip, and peak memory (the process's peak
resident set after the speed runs) is not inflated by whatever measured before. Latency is timed after
warm-up under ``torch.inference_mode`` with a fixed number of threads (recorded), as median and p95 of
batch-1 calls; throughput is items per second at a larger batch. Quality is the task's default metric on
the bundle's held-back split, which training never saw.

Text models are timed on ``seq_len`` random tokens with no padding (batch 1 x 128 by default); image
models on random images of their input size.
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

SEQ_MODELS = ("bert", "gpt")


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


def weight_count(model: nn.Module) -> int:
    """Parameters plus int8 weights and their biases (quantized layers keep them as buffers)."""
    from tansuo.compress.quantize import Int8DynamicLinear

    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Int8DynamicLinear):
            total += m.weight.numel() + (0 if m.bias is None else m.bias.numel())
    return total


def example_input(model: nn.Module, batch_size: int, seq_len: int) -> torch.Tensor:
    """A timing input for ``model``: ``seq_len`` random tokens for text models, random images otherwise."""
    if getattr(model, "family", None) in SEQ_MODELS:
        return model.example_input(batch_size, seq_len=seq_len)
    return model.example_input(batch_size)


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


def measure_speed(
    model: nn.Module, *, seq_len: int = 128, large_batch: int = 32, reps: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Latency p50 / p95 (ms) at batch 1 and throughput (items/s) at ``large_batch``, on the CPU."""
    model.eval()
    one, many = example_input(model, 1, seq_len), example_input(model, large_batch, seq_len)
    with torch.inference_mode():
        t1 = _time(lambda: model(one), reps, warmup)
        tn = _time(lambda: model(many), max(5, reps // 5), max(1, warmup // 2))
    return {
        "latency_ms_p50": 1000 * statistics.median(t1),
        "latency_ms_p95": 1000 * _p95(t1),
        "latency_spread": (_p95(t1) - statistics.median(t1)) / statistics.median(t1),
        "throughput_per_s": large_batch / statistics.median(tn),
        "input_tokens": int(one.shape[1]) if one.dim() == 2 else 0,
    }


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
    from tansuo.serve.bundle import load_bundle

    path = Path(path)
    b = load_bundle(path, device="cpu", data_path=data_path)
    result: dict[str, Any] = {
        "bundle": str(path),
        "threads": torch.get_num_threads(),
        "params": weight_count(b.model),
        "size_bytes": folder_bytes(path),
        "size_zipped_bytes": compressed_bytes(path / "model.safetensors"),
    }
    result.update(measure_speed(b.model, seq_len=seq_len, large_batch=large_batch, reps=reps))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if quality:
        split = b.task.heldout_split
        with torch.inference_mode():
            metrics = b.task.evaluate(b.model, split, 64, torch.device("cpu"))
        result["split"] = split
        result["metric"] = b.task.default_metric
        result["quality"] = float(metrics[b.task.default_metric])
        result["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return result


def measure_in_subprocess(path: Path, *, threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_bundle` in a fresh Python process (honest peak memory); raises with its stderr."""
    cmd = [sys.executable, "-m", "tansuo.compress.measure", str(path)]
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
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--large-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--data-path", default=None)
    p.add_argument("--no-quality", dest="quality", action="store_false")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
