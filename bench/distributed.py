"""Distributed training on this machine: two processes x one thread against one process x two threads.

What is measured, each run launched through torchrun's launcher (``torch.distributed.run``, gloo on CPUs, NCCL
on CUDA) with this script as the worker, which trains with ``tansuo.train.setup.train_recipe`` as
``tansuo train`` does:

1. **Same global batch.** An ``lm`` recipe (a synthetic corpus of 20 words, char tokenizer,
   ``gpt_char_small``: 4 layers, width 128, context 64, dropout 0) for ``--steps`` steps of a global batch
   of 2 x 12 sequences: one process with 2 threads and ``grad_accum 2``; two processes with 1 thread each,
   DDP; the same with FSDP. The ranks take interleaved micro-batches of the task's stream, so the three runs
   see the same micro-batches: their logged training losses should agree to float rounding. Tokens/s is the
   mean of the logged windows after the first (warm-up), as the trainer counts it (all ranks' tokens over
   rank 0's time).
2. **Memory.** A model whose optimizer state dominates (``gpt_char_small`` widened to 512, context 32,
   batch 2: about 12.6M parameters, so 50 MB of weights, 50 MB of gradients and 100 MB of AdamW moments in
   fp32 against a few MB of activations) for ``--memory-steps`` steps on two processes, DDP against FSDP. Per
   rank: the peak resident memory of the process (``ru_maxrss``) less its resident memory before the run was
   built (the interpreter, torch and its DDP and FSDP modules imported), the CUDA peak when on a GPU, and the
   bytes of the parameters and optimizer state the rank holds at the end (FSDP: its shards). FSDP's rank 0
   also keeps a full copy of the model to evaluate and bundle, and gathers the whole state to checkpoint it
   (see ``tansuo/train/distributed.py``). glibc's mmap threshold is fixed for these runs (``MALLOC``) so that
   resident memory follows live memory rather than what the allocator freed and kept.

Run from the repository root::

    .venv/bin/python bench/distributed.py [--steps 40] [--memory-steps 4] [--out runs/bench-distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _common import add_device, add_json, bench_main, busy_note, check_positive, header

WORDS = [
    *("the", "of", "and", "to", "in", "is", "was", "he", "for", "it"),
    *("with", "as", "his", "on", "be", "at", "by", "had", "not", "are"),
]


# glibc returns a freed block of 128 KB or more to the system only while its mmap threshold stays there; the
# threshold otherwise grows with the first such block freed, and resident memory then keeps what was freed
# (FSDP's all-gathered layers, gathered checkpoints). Fixed, the peak resident memory follows live memory.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Two processes x one thread against one process x two threads on the same global batch "
        "(DDP and FSDP), and peak memory per rank with FSDP against DDP.",
    )
    p.add_argument(
        "--steps", type=int, default=40, help="optimizer steps of the speed runs (default: %(default)s)"
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=4,
        help="optimizer steps of the memory runs (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-distributed"), help="run folders go here")
    add_device(p)
    add_json(p, "also write the figures to this JSON file")
    p.add_argument("--worker", nargs=2, metavar=("RECIPE_JSON", "FIGURES_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_positive(p, args, "steps", "memory_steps")
    return args


# ------------------------------------------------------------------------------------------------ worker
def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(recipe_json: Path, figures_json: Path) -> None:
    """One rank: train the recipe as ``tansuo train`` does, then write this rank's memory figures."""
    import torch
    import torch.distributed.fsdp
    import torch.nn.parallel
    from torch.distributed.tensor import DTensor

    from tansuo.recipe import validate_recipe
    from tansuo.train.setup import train_recipe

    before = _rss_mb()  # after the imports of both DDP and FSDP: what remains is the run's own
    rec, data = validate_recipe(json.loads(recipe_json.read_text()))
    done = train_recipe(rec, data, data_root=Path(rec.train.out_dir).parent / "data")
    trainer = done.trainer

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in trainer.trained.parameters())
    moments = sum(
        local_bytes(v)
        for s in trainer.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = {
        "rank": int(os.environ.get("RANK", "0")),
        "rss_before_mb": before,
        "peak_rss_mb": peak_kb / 1024,
        "params_mb": params / 2**20,
        "optimizer_mb": moments / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda" else None,
    }
    figures_json.with_name(f"{figures_json.stem}.rank{figures['rank']}.json").write_text(json.dumps(figures))


# ------------------------------------------------------------------------------------------------ driver
def _corpus(path: Path) -> None:
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(20_000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _recipe(corpus: Path, out: Path, *, steps: int, device: str, memory: bool, **train: Any) -> dict:
    overrides: dict[str, Any] = {"dropout": 0.0}
    if memory:
        overrides.update(embed_dim=512, num_heads=8)
    return {
        "task": "lm",
        "seed": 1,
        "data": {
            "path": str(corpus),
            "tokenizer": "char",
            "block_size": 32 if memory else 64,
            "eval_windows": 48,
        },
        "model": {"name": "gpt_char_small", "overrides": overrides},
        "train": {
            "out_dir": str(out),
            "max_steps": steps,
            "batch_size": 2 if memory else 12,
            "lr": 1e-3,
            "warmup_steps": 2,
            "log_every": 1 if memory else 5,
            "device": device,
            **train,
        },
    }


def _launch(
    raw: dict, nproc: int, threads: int, env: dict[str, str] | None = None
) -> tuple[float, list[dict]]:
    """Train ``raw`` on ``nproc`` processes of ``threads`` threads (``env`` added to their environment); wall
    seconds and each rank's figures."""
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    out = Path(raw["train"]["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw["train"]["threads"] = threads
    recipe = out.with_suffix(".recipe.json")
    recipe.write_text(json.dumps(raw))
    figures = out.with_suffix(".figures.json")
    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS=str(threads), **(env or {}))
    argv = [f"--nproc-per-node={nproc}", "--standalone", __file__, "--worker", str(recipe), str(figures)]
    started = time.perf_counter()
    try:
        run(torchrun_args(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    seconds = time.perf_counter() - started
    ranks = [json.loads(figures.with_name(f"{figures.stem}.rank{r}.json").read_text()) for r in range(nproc)]
    return seconds, ranks


def _train_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "train"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tansuo.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("error: two processes on CUDA need two GPUs; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.txt"
    _corpus(corpus)
    _, note = busy_note()
    print(header(f"device {device.type}", note), flush=True)

    speed: dict[str, Any] = {}
    runs = {  # name: (processes, threads each, train settings)
        "1 process x 2 threads, grad_accum 2": (1, 2, {"grad_accum": 2}),
        "2 processes x 1 thread, DDP": (2, 1, {"parallel": "ddp"}),
        "2 processes x 1 thread, FSDP": (2, 1, {"parallel": "fsdp"}),
    }
    for i, (name, (nproc, threads, train)) in enumerate(runs.items()):
        raw = _recipe(
            corpus, args.out / f"speed{i}", steps=args.steps, device=args.device, memory=False, **train
        )
        seconds, _ = _launch(raw, nproc, threads)
        events = _train_events(Path(raw["train"]["out_dir"]))
        speed[name] = {
            "wall_s": seconds,
            "tokens_per_s": statistics.mean(e["tokens_per_s"] for e in events[1:]),
            "losses": [[e["step"], e["loss"]] for e in events],
        }
        print(f"  {name}: {speed[name]['tokens_per_s']:,.0f} tokens/s, {seconds:.1f} s in all", flush=True)
    reference = [loss for _, loss in next(iter(speed.values()))["losses"]]
    for entry in speed.values():
        entry["max_loss_difference"] = max(
            abs(a - b) for a, b in zip(reference, (x[1] for x in entry["losses"]), strict=True)
        )

    memory: dict[str, Any] = {}
    for mode in ("ddp", "fsdp"):
        raw = _recipe(
            corpus, args.out / f"memory-{mode}", steps=args.memory_steps, device=args.device, memory=True
        )
        raw["train"]["parallel"] = mode
        _, ranks = _launch(raw, 2, 1, env=MALLOC)
        memory[mode] = ranks
    return {"device": device.type, "global_batch": 24, "speed": speed, "memory": memory}


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    batch = f"{r['global_batch']} sequences of 64 tokens"
    print(f"\nsame global batch ({batch}), gpt_char_small, {args.steps} steps:")
    print(f"  {'run':38} {'tokens/s':>10} {'max |loss - 1 process|':>24}")
    for name, e in r["speed"].items():
        print(f"  {name:38} {e['tokens_per_s']:>10,.0f} {e['max_loss_difference']:>24.2e}")
    losses = {name: [f"{x[1]:.4f}" for x in e["losses"]] for name, e in r["speed"].items()}
    for name, values in losses.items():
        print(f"  loss curve, {name}: {' '.join(values)}")
    print("\nmemory per rank, 12.6M parameters (optimizer state dominates), 2 processes:")
    print(f"  {'':6} {'rank':>4} {'peak RSS - before (MB)':>23} {'params (MB)':>12} {'AdamW state (MB)':>17}")
    for mode, ranks in r["memory"].items():
        for f in ranks:
            grown = f["peak_rss_mb"] - f["rss_before_mb"]
            line = (
                f"  {mode:6} {f['rank']:>4} {grown:>23.0f} {f['params_mb']:>12.1f} {f['optimizer_mb']:>17.1f}"
            )
            if f["cuda_peak_mb"] is not None:
                line += f"  CUDA peak {f['cuda_peak_mb']:.0f} MB"
            print(line)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return None
    return bench_main(argv, parse_args, run, report, figures=lambda _, a: a.json)


if __name__ == "__main__":
    main()
