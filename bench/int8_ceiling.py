"""The most int8 dynamic quantization can speed up a BERT-family encoder on this CPU (Amdahl's bound).

Int8 dynamic quantization replaces the Linear layers; attention's own matmuls, softmax, GELU and LayerNorm
stay in fp32 and take the same time in both models. So the end-to-end speed-up at batch 1 can never exceed
the speed-up of the Linear layers alone, whatever else is done. This script measures that: one encoder
layer's Linear layers (query, key+value, output, FFN in, FFN out) at the given width, FFN width and sequence
length, in fp32 (``F.linear``, MKL) against tansuo's int8 layer (fbgemm's dynamic int8 kernel, per-channel
weights, per-sample activations, the `torch` backend of ``tansuo compress --quantize int8``), interleaved
in rounds in one process so drift in machine load hits both alike. It also prints which int8 instructions
the CPU has: fbgemm reaches 3-4x over fp32 only with VNNI (AVX-512 VNNI / AVX-VNNI); with AVX2 alone it
multiplies through 16-bit intermediates.

    .venv/bin/python bench/int8_ceiling.py [--width 384 --ffn 1536 --tokens 128 --threads 2 --rounds 15]

Defaults are MiniLM-L6's shapes at the issue's batch 1 x 128 tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import add_threads, bench_main, busy_note, pick_threads

from tansuo.compress.quantize import Int8DynamicConfig, Int8DynamicLinear


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=128)
    add_threads(p, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=50, help="layer passes per round")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and print; returns the figures."""
    pick_threads(args.threads)
    torch.manual_seed(0)
    C, F = args.width, args.ffn
    shapes = [(C, C), (C, 2 * C), (C, C), (C, F), (F, C)]  # query, key+value, output, FFN in, FFN out
    inputs = {n: torch.randn(1, args.tokens, n) for n in (C, F)}
    fp32 = [torch.nn.Linear(i, o).eval() for i, o in shapes]
    int8 = [Int8DynamicLinear.from_float(m, Int8DynamicConfig()).eval() for m in fp32]

    def layer(mods: list[torch.nn.Module]) -> None:
        for m, (i, _) in zip(mods, shapes, strict=True):
            m(inputs[i])

    def timed(mods: list[torch.nn.Module]) -> float:
        start = time.perf_counter()
        for _ in range(args.calls):
            layer(mods)
        return (time.perf_counter() - start) / args.calls * 1e3

    busy, note = busy_note()
    with torch.inference_mode():
        for _ in range(20):
            layer(fp32)
            layer(int8)
        a, b = [], []
        for _ in range(args.rounds):
            a.append(timed(fp32))
            b.append(timed(int8))
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    flops = 2 * args.tokens * sum(i * o for i, o in shapes)
    fa, fb = statistics.median(a), statistics.median(b)
    print(f"CPU: {cpu_flags()}; {args.threads} thread(s); {note}")
    print(
        f"one layer's Linear layers at batch 1 x {args.tokens} tokens, width {C}, FFN {F} "
        f"({flops / 1e6:.0f} MFLOP):"
    )
    print(
        f"  fp32 {fa:.3f} ms ({flops / fa / 1e6:.0f} GFLOP/s), "
        f"int8 {fb:.3f} ms ({flops / fb / 1e6:.0f} GOP/s)"
    )
    print(
        f"  int8 / fp32 speed-up of the Linear layers: {fa / fb:.2f}x (median of {args.rounds} rounds; "
        f"rounds range {ratios[0]:.2f}-{ratios[-1]:.2f}x)"
    )
    print(
        f"=> end-to-end int8 speed-up ceiling: {fa / fb:.2f}x (reached only if nothing but the Linear layers "
        "took time); a higher target needs a faster int8 kernel (VNNI) at this shape"
    )
    return {
        "cpus_busy_at_start": busy,
        "fp32_ms": fa,
        "int8_ms": fb,
        "speedup": fa / fb,
        "speedups_by_round": ratios,
    }


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run)


if __name__ == "__main__":
    main()
