"""Weight-only quantized matmul kernels on this CPU against fp32 ``F.linear``, per shape (issue 14).

Times one call of each kernel at SmolLM2-135M's Linear shapes (in -> out: 576->576 q/o, 576->192 k/v,
576->1536 gate/up, 1536->576 down, 576->49152 the tied head) for one token (decode) and 128 tokens
(prefill), batch 1, all in one process and interleaved in rounds so drift in machine load hits every kernel
alike. Printed: the median ms per call of each kernel and its speed against fp32 in the same round.

Kernels (each is skipped with the reason when this build of torch or torchao lacks it):

- ``fp32``: ``F.linear`` (MKL / oneDNN sgemm), the reference;
- ``int8pack``: ``torch._weight_int8pack_mm`` (int8 weights, one scale per output channel);
- ``int4pack gN``: ``torch._weight_int4pack_mm_for_cpu`` (int4 weights, asymmetric groups of N along the
  input, packed by ``torch._convert_weight_to_int4pack_for_cpu``);
- ``fbgemm w8a8``: tansuo's ``Int8DynamicLinear`` (fbgemm's dynamic int8 kernel: activations quantized per
  call too, so not weight-only, but the fastest int8 GEMM torch has on x86);
- ``tansuo int8-weight`` / ``tansuo int4-weight gN``: :class:`~tansuo.compress.weight_only.WeightOnlyLinear`
  (the AVX2 kernels of :mod:`tansuo.compress.cpu_kernels` up to 4 rows, dequantize + ``F.linear`` above);
- ``deq int8`` / ``deq int4 g32``: plain PyTorch, the weight dequantized to fp32 on every call, then
  ``F.linear`` (the memory win only);
- ``torchao ...``: torchao's ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig`` / ``IntxWeightOnlyConfig``
  on an ``nn.Linear``, eager (no ``torch.compile``), when torchao is importable.

    .venv/bin/python bench/weight_only_kernels.py [--threads 2 --rounds 7 --calls 30 --tokens 1,128]

torchao is not a dependency: to include it, ``pip install --no-deps --target /tmp/ao torchao`` and run with
``PYTHONPATH=/tmp/ao``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import add_threads, bench_main, busy_note, header, pick_threads

from tansuo.compress.quantize import Int8DynamicConfig, Int8DynamicLinear
from tansuo.compress.weight_only import WeightOnlyLinear

#: SmolLM2-135M's Linear shapes, (name, in_features, out_features)
SHAPES = [
    ("q/o 576->576", 576, 576),
    ("k/v 576->192", 576, 192),
    ("gate/up 576->1536", 576, 1536),
    ("down 1536->576", 1536, 576),
    ("head 576->49152", 576, 49152),
]

Call = Callable[[torch.Tensor], torch.Tensor]


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group along the input: q in [0, 15], w ~ q * scale + low."""
    out, k = w.shape
    g = w.reshape(out, k // group, group)
    low, high = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((g - low) / scale).clamp(0, 15)
    return q.reshape(out, k).to(torch.int32), scale.squeeze(-1), low.squeeze(-1)


def build_kernels(w: torch.Tensor) -> dict[str, Call | str]:
    """Each kernel as ``x (M, in) -> (M, out)``, or the reason it cannot run here."""
    out_f, in_f = w.shape
    kernels: dict[str, Call | str] = {"fp32": lambda x: F.linear(x, w)}

    scale8 = w.abs().amax(dim=1) / 127
    w8 = torch.round(w / scale8[:, None]).clamp(-127, 127).to(torch.int8)
    kernels["int8pack"] = lambda x: torch._weight_int8pack_mm(x, w8, scale8)

    for group in (32, 64):
        q, scale, low = int4_groups(w, group)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        except RuntimeError as e:
            kernels[f"int4pack g{group}"] = f"n/a: {str(e).splitlines()[0]}"
            continue
        # tinygemm's zero: w = (q - 8) * scale + zero, so zero = low + 8 * scale; (in / group, out, 2)
        sz = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        kernels[f"int4pack g{group}"] = lambda x, p=packed, g=group, s=sz: torch._weight_int4pack_mm_for_cpu(
            x, p, g, s
        )

    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data.copy_(w)
    fbgemm = Int8DynamicLinear.from_float(linear, Int8DynamicConfig()).eval()
    kernels["fbgemm w8a8"] = lambda x: fbgemm(x[None])[0]  # (1, T, in): one activation range per sample
    kernels["tansuo int8-weight"] = WeightOnlyLinear.from_float(linear, 8)
    for group in (32, 64):
        kernels[f"tansuo int4-weight g{group}"] = WeightOnlyLinear.from_float(linear, 4, group)

    kernels["deq int8"] = lambda x: F.linear(x, w8.float() * scale8[:, None])
    q, scale, low = int4_groups(w, 32)
    nib = (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # two int4 a byte, (out, in / 2)

    def deq_int4(x: torch.Tensor) -> torch.Tensor:
        unpacked = torch.stack([nib & 15, nib >> 4], dim=-1).reshape(out_f, in_f // 32, 32)
        wd = unpacked.float() * scale[..., None] + low[..., None]
        return F.linear(x, wd.reshape(out_f, in_f))

    kernels["deq int4 g32"] = deq_int4
    kernels.update(torchao_kernels(w))
    return kernels


def torchao_kernels(w: torch.Tensor) -> dict[str, Call | str]:
    """torchao's weight-only configs on an ``nn.Linear``, eager; the reason when one cannot run here."""
    try:
        import torchao  # noqa: F401
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        return {"torchao": f"n/a: {e}"}
    configs = {
        "torchao int8-wo": lambda: Int8WeightOnlyConfig(),
        "torchao int4-wo g32": lambda: Int4WeightOnlyConfig(group_size=32),
        "torchao intx int4 g32": lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32)
        ),
    }
    out: dict[str, Call | str] = {}
    for name, make in configs.items():
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        try:
            quantize_(linear, make())
            with torch.inference_mode():
                linear(torch.randn(1, w.shape[1]))
        except Exception as e:  # noqa: BLE001 (any failure of a third-party config is a result to print)
            out[name] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            continue
        out[name] = linear
    return out


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``ref`` in dB."""
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm().clamp(min=1e-12)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_threads(p, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=30, help="calls per kernel per round")
    p.add_argument("--tokens", default="1,128", help="tokens per call, comma-separated")
    p.add_argument("--shapes", default=None, help="substring filter on the shape names")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and print; returns ``{shape: {tokens: {kernel: ms or reason}}}``."""
    pick_threads(args.threads)
    busy, note = busy_note()
    print(header(note), flush=True)
    torch.manual_seed(0)
    figures: dict[str, Any] = {"cpus_busy_at_start": busy, "shapes": {}}
    for name, in_f, out_f in SHAPES:
        if args.shapes and args.shapes not in name:
            continue
        w = torch.randn(out_f, in_f) * 0.02
        kernels = build_kernels(w)
        figures["shapes"][name] = per_tokens = {}
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, in_f)
            per_tokens[tokens] = time_kernels(kernels, x, args.rounds, args.calls)
            print(f"\n{name}, {tokens} token(s):", flush=True)
            for kernel, r in per_tokens[tokens].items():
                if isinstance(r, str):
                    print(f"  {kernel:24s} {r}")
                else:
                    print(
                        f"  {kernel:24s} {r['ms']:8.4f} ms  {r['vs_fp32']:5.2f}x fp32  "
                        f"SQNR {r['sqnr_db']:5.1f} dB",
                        flush=True,
                    )
    return figures


def time_kernels(kernels: dict[str, Call | str], x: torch.Tensor, rounds: int, calls: int) -> dict[str, Any]:
    """Median ms per call of each runnable kernel over ``rounds`` interleaved rounds, its speed against
    fp32's median of the same round, and its output's SQNR against fp32."""
    runnable = {k: f for k, f in kernels.items() if not isinstance(f, str)}
    times: dict[str, list[float]] = {k: [] for k in runnable}
    with torch.inference_mode():
        ref = runnable["fp32"](x)
        results: dict[str, Any] = {}
        for k, f in runnable.items():
            try:
                got = f(x)
            except RuntimeError as e:
                results[k] = f"n/a: {str(e).splitlines()[0][:100]}"
                continue
            results[k] = {"sqnr_db": sqnr(ref, got.float())}
            for _ in range(3):
                f(x)
        live = {k: f for k, f in runnable.items() if isinstance(results[k], dict)}
        for _ in range(rounds):
            for k, f in live.items():
                start = time.perf_counter()
                for _ in range(calls):
                    f(x)
                times[k].append((time.perf_counter() - start) / calls * 1e3)
    for k in live:
        ratios = [a / b for a, b in zip(times["fp32"], times[k], strict=True)]
        results[k].update(ms=statistics.median(times[k]), vs_fp32=statistics.median(ratios))
    results.update({k: r for k, r in kernels.items() if isinstance(r, str)})
    return results


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run)


if __name__ == "__main__":
    main()
