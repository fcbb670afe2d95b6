"""GPT training throughput (tokens per second) and model FLOP utilisation (MFU), against a matmul peak.

What is measured: full training steps done the way ``tansuo.train.trainer.Trainer`` does them (batch moved
to the device, forward under the trainer's autocast, cross-entropy loss as the ``lm`` task computes it,
``loss.item()``, backward, global gradient-norm clipping at 1.0, AdamW from
``tansuo.train.optim.build_optimizer`` with the learning rate set per step, ``zero_grad(set_to_none=True)``)
on random token batches, for two GPT sizes built with ``tansuo.models.create_model``:

- ``small``: ``gpt_char_small``, 4 layers, 4 heads, width 128, context 64, batch 12, vocabulary 65 (nanoGPT's
  shakespeare_char CPU configuration);
- ``medium``: ``gpt_mini``, 6 layers, 6 heads, width 384, context 256, batch 12, vocabulary 65 (nanoGPT's
  shakespeare_char GPU configuration); on a CPU the default batch is 4 so that a run stays short.

Dropout is 0 for both. Three peers train each size in the same run (``--peers``): tansuo's GPT in eager
mode, the same model under ``torch.compile`` (the ``train.compile`` switch), and transformers'
``GPT2LMHeadModel`` at the same sizes (GPT-2 blocks, as tansuo's presets here: learned positions, GELU MLP,
LayerNorm, tied head; transformers' GPT-2 also has biases), all stepped by the same AdamW. Each peer first
runs ``--warmup`` untimed steps; the first of them is timed on its own ("first step s": for the compiled
peer, the compilation). The ``--steps`` timed steps are split into ``--rounds`` rounds that visit the peers
in turn, so load from other processes falls on all of them alike; ms/step is the mean (median, min and max
go to ``--json``), and the targets compare medians.

Targets (issue 18), printed with PASS or FAIL: ``small`` compiled at least 1.3x tansuo eager and 1.5x
transformers; ``medium`` compiled at least 1.05x eager. Where a target cannot be met on this machine the
report says so with the tighter of two bounds that show it:

- FLOPs: the slower peer's step time over the time the step's FLOPs take at the measured matmul peak (no
  compiler makes the matmuls faster than the peak);
- kernels (Amdahl): the slower peer's step time over the time the compiled step itself spends in ATen's
  matrix-multiply and attention kernels (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``, the
  scaled-dot-product attention kernels; self time) and in the gradient clipping and optimizer step (all of
  it: they run outside the compiled model). Both come from ``--profile-steps`` extra steps per peer under
  ``torch.profiler`` after the timed ones, interleaved like them (medians), so that the profiler's own
  cost and the machine's load fall on both sides alike. Inductor does not generate these kernels: its
  code calls the same ATen kernels eager mode calls (on this CPU its max-autotune has no GEMM template for
  these training graphs either: ``max_autotune_gemm_backends="CPP"`` alone fails with NoValidChoicesError),
  so fusing everything else into nothing still leaves that time, and no ``torch.compile`` of the model can
  do better than this ratio.

FLOPs per token for forward + backward: ``6 * N + 12 * L * T * C`` (Chowdhery et al. 2022, "PaLM", appendix
B; nanoGPT's ``estimate_mfu``), with N the non-embedding parameters (``model.num_params(
exclude_embeddings=True)``: token and position embeddings left out, and with them the tied LM head's
``6 * V * C``, under 1% here), L layers, T the context length and C the width. Achieved FLOP/s = FLOPs per
token x tokens per second.

Against what: MFU divides the achieved FLOP/s by a matmul peak measured in the same process on the same device
at the current thread count: the best of several repetitions of square ``torch.mm`` (2 n^3 FLOPs each), in
fp32 on a CPU (where training runs in fp32) and in bf16 on CUDA (where training runs under bf16 autocast).
MFU is therefore relative to what this machine's matmul achieves, not to a vendor's datasheet figure.

Run from the repository root::

    .venv/bin/python bench/train_throughput.py [--steps 20] [--warmup 3] [--configs small,medium]
        [--peers tansuo,compiled,transformers] [--rounds 4] [--threads 2] [--profile-steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    add_device,
    add_json,
    add_threads,
    bench_main,
    busy_note,
    check_positive,
    header,
    pick_threads,
)
from torch import nn

from tansuo.measure.flops import matmul_peak


@dataclass(frozen=True)
class BenchConfig:
    """One model size to measure."""

    preset: str  # a registered model name
    num_layers: int
    num_heads: int
    embed_dim: int
    context: int
    batch_size: int  # on CUDA
    cpu_batch_size: int  # default on a CPU, where a step of the full batch takes seconds
    vocab_size: int = 65


CONFIGS = {
    "small": BenchConfig("gpt_char_small", 4, 4, 128, 64, batch_size=12, cpu_batch_size=12),
    "medium": BenchConfig("gpt_mini", 6, 6, 384, 256, batch_size=12, cpu_batch_size=4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Measure GPT training throughput (tokens/s) and MFU against a matmul peak measured "
        "in the same run. FLOPs per token = 6*N + 12*L*T*C (PaLM appendix B; nanoGPT estimate_mfu).",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per config (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=8,
        help="profiled steps per peer after the timed ones, for the kernel bound; 0 skips it (default: 8)",
    )
    add_device(p)
    p.add_argument(
        "--configs", default="small,medium", help=f"comma-separated, from {', '.join(CONFIGS)} (default: all)"
    )
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated, from tansuo (eager), compiled (torch.compile), transformers (GPT2LMHeadModel) "
        "(default: all)",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds the timed steps are split into (default: 4)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch for every config (default: 12; on a CPU 12 for small and 4 for medium)",
    )
    add_threads(p, "torch.set_num_threads first (default: as is)")
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="n of the n x n matmul peak (default: 1024 on a CPU, 8192 on CUDA)",
    )
    add_json(p, "also write the figures to this JSON file")
    args = p.parse_args(argv)
    check_positive(p, args, "steps", "batch_size", "threads", "matmul_size", "rounds")
    if args.warmup < 0 or args.profile_steps < 0:
        p.error("--warmup and --profile-steps must be zero or more")
    args.peer_names = [c.strip() for c in args.peers.split(",") if c.strip()]
    if not args.peer_names or any(c not in PEERS for c in args.peer_names):
        p.error(f"--peers: choose from {', '.join(PEERS)}")
    if args.rounds > args.steps:
        p.error("--rounds must not exceed --steps")
    args.config_names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.config_names if c not in CONFIGS]
    if unknown or not args.config_names:
        p.error(
            f"--configs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}"
        )
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: nn.Module, cfg: BenchConfig) -> int:
    """Forward + backward FLOPs per token: 6 N + 12 L T C, N the non-embedding parameters."""
    n = model.num_params(exclude_embeddings=True)
    return 6 * n + 12 * cfg.num_layers * cfg.context * cfg.embed_dim


#: ATen ops whose self time is the matrix-multiply and attention work a compiled step still calls out for
GEMMS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
#: the profiler range around gradient clipping and the optimizer step, which run outside the compiled model
OPTIMIZER_RANGE = "bench.clip_and_optimizer_step"


def kernel_ms(events: Any, device: torch.device, steps: int) -> float:
    """Milliseconds per step that ``torch.compile`` of the model leaves as they are, from
    ``profile.key_averages()``: the GEMM and attention kernels' self time and the whole clipping and
    optimizer range (no GEMM runs inside it); CPU time on a CPU, device time on CUDA (microseconds there)."""
    cuda = device.type == "cuda"
    total = 0.0
    for e in events:
        if e.key == OPTIMIZER_RANGE:
            total += e.device_time_total if cuda else e.cpu_time_total
        elif e.key in GEMMS or any(a in e.key for a in ATTENTION):
            total += e.self_device_time_total if cuda else e.self_cpu_time_total
    return total / 1000 / steps


#: the peers measured side by side, in this order within each round
PEERS = ("tansuo", "compiled", "transformers")
PEER_LABELS = {
    "tansuo": "tansuo eager",
    "compiled": "tansuo torch.compile",
    "transformers": "transformers GPT2LMHeadModel",
}
#: speed-up targets (issue 18): (config, faster peer, slower peer, at least)
TARGETS = (
    ("small", "compiled", "tansuo", 1.3),
    ("small", "compiled", "transformers", 1.5),
    ("medium", "compiled", "tansuo", 1.05),
)


def build_model(peer: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """The model one peer trains: tansuo's GPT (``compiled``: the same under ``torch.compile``), or
    transformers' GPT2LMHeadModel at the same sizes (GPT-2 blocks: learned positions, GELU MLP, LayerNorm,
    tied head), dropout 0 everywhere."""
    torch.manual_seed(0)
    if peer == "transformers":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context,
            n_embd=cfg.embed_dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,  # GPT-2's 50256 lies outside this vocabulary
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config).to(device)
    from tansuo.models import create_model

    return create_model(
        cfg.preset,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.context,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        embed_dim=cfg.embed_dim,
        dropout=0.0,
    ).to(device)


class Peer:
    """One model with its AdamW, stepping exactly as the trainer does; ``times`` collects timed steps."""

    def __init__(self, peer: str, cfg: BenchConfig, batch_size: int, device: torch.device) -> None:
        from tansuo.train.optim import build_optimizer

        self.name, self.cfg, self.device = peer, cfg, device
        self.model = build_model(peer, cfg, device)
        self.model.train()
        self.forward = torch.compile(self.model) if peer == "compiled" else self.model
        self.hf = peer == "transformers"
        self.optimizer = build_optimizer(self.model, 1e-3, 0.1, (0.9, 0.99), device)
        g = torch.Generator().manual_seed(0)
        self.batches = [
            torch.randint(0, cfg.vocab_size, (batch_size, cfg.context + 1), generator=g) for _ in range(8)
        ]  # on the CPU, as the task yields them; cycled
        self.steps_done = 0
        self.times: list[float] = []
        self.first_step_s = 0.0

    def step(self) -> float:
        from tansuo.device import autocast

        for group in self.optimizer.param_groups:
            group["lr"] = 1e-3
        tokens = self.batches[self.steps_done % len(self.batches)]
        self.steps_done += 1
        x = tokens[:, :-1].to(self.device, non_blocking=True)  # (B, T)
        y = tokens[:, 1:].to(self.device, non_blocking=True)  # (B, T)
        with autocast(self.device):
            logits = self.forward(x).logits if self.hf else self.forward(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        value = loss.item()
        loss.backward()
        with torch.profiler.record_function(OPTIMIZER_RANGE):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return value

    def profiled(self) -> tuple[float, float]:
        """One step under ``torch.profiler``: its ms, and the ms of it compile leaves (:func:`kernel_ms`)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            sync(self.device)
            start = time.perf_counter()
            self.step()
            sync(self.device)
            seconds = time.perf_counter() - start
        return 1000 * seconds, kernel_ms(prof.key_averages(), self.device, 1)

    def timed(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start


def measure(
    name: str,
    cfg: BenchConfig,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    peers: list[str],
    rounds: int,
    profile_steps: int = 0,
) -> list[dict[str, Any]]:
    """Time ``steps`` training steps of each peer, interleaved: ``rounds`` rounds, each giving every peer
    its share of steps in turn, so that a change in the machine's load hits all peers alike. Every peer
    first runs ``warmup`` untimed steps (the compiled peer's first one compiles: timed apart)."""
    runners = [Peer(p, cfg, batch_size, device) for p in peers]
    for r in runners:
        r.first_step_s = r.timed()
        for _ in range(max(0, warmup - 1)):
            r.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_round = [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]
    for k in per_round:
        for r in runners:
            r.times.extend(r.timed() for _ in range(k))
    profiled: dict[str, list[tuple[float, float]]] = {r.name: [] for r in runners}
    for _ in range(profile_steps):  # interleaved too: the bound compares peers' profiled steps
        for r in runners:
            profiled[r.name].append(r.profiled())
    rows = []
    tokens_per_step = batch_size * cfg.context
    for r in runners:
        mean_s = sum(r.times) / len(r.times)
        tokens_per_s = tokens_per_step / mean_s
        fpt = flops_per_token(runners[0].model, cfg)  # the same architecture and FLOPs for every peer
        rows.append(
            {
                "config": name,
                "peer": r.name,
                "model": "GPT2LMHeadModel" if r.hf else cfg.preset,
                "num_layers": cfg.num_layers,
                "num_heads": cfg.num_heads,
                "embed_dim": cfg.embed_dim,
                "vocab_size": cfg.vocab_size,
                "params": sum(p.numel() for p in r.model.parameters()),
                "batch_size": batch_size,
                "context": cfg.context,
                "tokens_per_step": tokens_per_step,
                "steps": steps,
                "warmup": warmup,
                "rounds": rounds,
                "first_step_s": r.first_step_s,
                "ms_per_step": 1000 * mean_s,
                "ms_per_step_median": 1000 * statistics.median(r.times),
                "ms_per_step_min": 1000 * min(r.times),
                "ms_per_step_max": 1000 * max(r.times),
                "tokens_per_s": tokens_per_s,
                "flops_per_token": fpt,
                "achieved_flops": fpt * tokens_per_s,
                # median over the profiled steps (None without them): the step, and what compile leaves
                "profiled_ms": statistics.median(t for t, _ in profiled[r.name]) if profile_steps else None,
                "kept_ms": statistics.median(k for _, k in profiled[r.name]) if profile_steps else None,
            }
        )
    return rows


def check_targets(rows: list[dict[str, Any]], peak: float) -> list[dict[str, Any]]:
    """Each target against the measured ratio of median step times, and the bounds that show whether it
    can be met here: no peer can beat the FLOPs at the matmul peak, so ``slower ms / (FLOPs / peak)`` is
    the largest speed-up any compiler could give over the slower peer; and a compiled step still spends
    its GEMM, attention and optimizer time, so ``slower ms / that time`` is the most torch.compile can give
    (when profiled). ``bound`` is the tighter of the two."""
    by = {(r["config"], r["peer"]): r for r in rows}
    out = []
    for config, fast, slow, target in TARGETS:
        if (config, fast) not in by or (config, slow) not in by:
            continue
        a, b = by[(config, fast)], by[(config, slow)]
        ratio = b["ms_per_step_median"] / a["ms_per_step_median"]
        floor_ms = 1000 * a["flops_per_token"] * a["tokens_per_step"] / peak
        flops_bound = b["ms_per_step_median"] / floor_ms
        kernels = a.get("kept_ms")  # both from the same interleaved profiled steps
        kernel_bound = b["profiled_ms"] / kernels if kernels else None
        bound = min(flops_bound, kernel_bound or flops_bound)
        out.append(
            {
                "config": config,
                "faster": fast,
                "slower": slow,
                "target": target,
                "ratio": ratio,
                # the fastest step of each: less sensitive to other processes than the median
                "ratio_of_min": b["ms_per_step_min"] / a["ms_per_step_min"],
                "passed": ratio >= target,
                "matmul_floor_ms": floor_ms,
                "flops_bound": flops_bound,
                "kernel_floor_ms": kernels,
                "kernel_bound": kernel_bound,
                "bound": bound,
                "reachable": bound >= target,
            }
        )
    return out


def print_table(rows: list[dict[str, Any]], peak: float) -> None:
    head = [
        "config",
        "peer",
        "params",
        "batch",
        "context",
        "first step s",
        "ms/step",
        "median",
        "tokens/s",
        "GFLOP/s",
        "peak GFLOP/s",
        "MFU %",
        "profiled / kept ms",
    ]
    body = [
        [
            r["config"],
            PEER_LABELS[r["peer"]],
            f"{r['params'] / 1e6:.2f}M",
            str(r["batch_size"]),
            str(r["context"]),
            f"{r['first_step_s']:.1f}",
            f"{r['ms_per_step']:.1f}",
            f"{r['ms_per_step_median']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['achieved_flops'] / 1e9:,.1f}",
            f"{peak / 1e9:,.1f}",
            f"{100 * r['mfu']:.1f}",
            "-" if r["kept_ms"] is None else f"{r['profiled_ms']:.1f} / {r['kept_ms']:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(head))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(line(b))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tansuo.device import resolve_device

    device = resolve_device(args.device)
    pick_threads(args.threads)
    cuda = device.type == "cuda"
    n = args.matmul_size or (8192 if cuda else 1024)
    dtype = "bf16" if cuda else "fp32"
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    busy, note = busy_note()
    print(header(f"device {device} ({where})", note))
    print(
        f"training in {'bf16 autocast' if cuda else 'fp32'}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per config"
    )

    peak = matmul_peak(device, n)
    print(f"matmul peak ({dtype}, {n}x{n}, best of 5): {peak / 1e9:,.1f} GFLOP/s\n", flush=True)

    rows = []
    for name in args.config_names:
        cfg = CONFIGS[name]
        batch = args.batch_size or (cfg.batch_size if cuda else cfg.cpu_batch_size)
        print(f"{name}: {', '.join(PEER_LABELS[p] for p in args.peer_names)} ...", flush=True)
        peers, profile = args.peer_names, args.profile_steps
        for r in measure(name, cfg, batch, args.steps, args.warmup, device, peers, args.rounds, profile):
            r["mfu"] = r["achieved_flops"] / peak
            rows.append(r)
    return {
        "benchmark": "train_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus_busy_at_start": busy,
        "device": str(device),
        "device_name": where,
        "train_precision": "bf16 autocast" if cuda else "fp32",
        "flops_per_token_formula": "6*N + 12*L*T*C, N = non-embedding parameters",
        "matmul_peak": {"dtype": dtype, "n": n, "flops_per_s": peak},
        "configs": rows,
        "targets": check_targets(rows, peak),
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print_table(r["configs"], r["matmul_peak"]["flops_per_s"])
    if not r["targets"]:
        return
    print("\ntargets (ratio of median ms/step; bounds: the slower peer's time over a floor)")
    for t in r["targets"]:
        verdict = "PASS" if t["passed"] else "FAIL"
        line = (
            f"  {t['config']}: {PEER_LABELS[t['faster']]} vs {PEER_LABELS[t['slower']]} "
            f"{t['ratio']:.2f}x (target >= {t['target']:.2f}x) {verdict} "
            f"(fastest steps: {t['ratio_of_min']:.2f}x)"
        )
        if not t["reachable"] and t["bound"] == t["flops_bound"]:
            line += (
                f"; unreachable here: the FLOPs at the matmul peak take {t['matmul_floor_ms']:.1f} ms, so no "
                f"compiler can beat {t['bound']:.2f}x"
            )
        elif not t["reachable"]:
            line += (
                f"; unreachable here: the compiled step spends {t['kernel_floor_ms']:.1f} ms in ATen's GEMM "
                f"and attention kernels and the optimizer, so no torch.compile can beat {t['bound']:.2f}x"
            )
        print(line)
        bounds = f"    bounds: FLOPs at the matmul peak {t['flops_bound']:.2f}x"
        if t["kernel_bound"] is not None:
            bounds += (
                f", GEMM + attention kernels + optimizer ({t['kernel_floor_ms']:.1f} ms/step) "
                f"{t['kernel_bound']:.2f}x"
            )
        print(bounds)


def main(argv: list[str] | None = None) -> None:
    bench_main(
        argv, parse_args, run, report, figures=lambda _, args: args.json, written="\nfigures written to {}"
    )


if __name__ == "__main__":
    main()
