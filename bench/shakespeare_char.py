"""Character-level GPT on tiny shakespeare, held against nanoGPT's published CPU figure.

What is measured: ``recipes/shakespeare-char.yaml`` (nanoGPT's CPU configuration: 4 layers, 4 heads, width
128, context 64, batch 12, 2000 iterations, dropout 0; first 90% of characters train, last 10% validate)
trained through the library exactly as ``tansuo train recipes/shakespeare-char.yaml --data DIR/input.txt``
does it.

Printed (and written to ``<out>/bench.json``):

- the best validation loss (mean over the recipe's 2,400 fixed random windows, as nanoGPT's estimate_loss),
  against nanoGPT's published figure for this configuration, validation loss about 1.88 (nanoGPT README;
  ``../shared/data/tiny-shakespeare/SOURCE.md``), with PASS when it is at most target + ``--tolerance``;
- the wall time of ``Trainer.fit`` (training, evaluations, checkpoints and bundles);
- the mean training throughput in tokens per second: total training tokens over total training time, from
  the run folder's ``metrics.jsonl`` "train" events (each covers a window of steps and excludes evaluation);
- a 200-character sample from the best bundle: prompt "ROMEO:", temperature 0.8, top-k 50, seed 0.

The figure only applies to the full 2000 steps; ``--max-steps`` is for smoke tests.

Run from the repository root::

    .venv/bin/python bench/shakespeare_char.py --data-dir ../shared/data/tiny-shakespeare
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_device,
    add_max_steps,
    add_progress,
    add_sets,
    check_positive,
    fail,
    training_bench_main,
    training_start,
)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "shakespeare-char.yaml"
TARGET = 1.88  # nanoGPT README, shakespeare_char on a CPU (4 layers, 4 heads, 128 wide, 2000 iterations)
FULL_STEPS = 2000  # the iterations behind TARGET
PROMPT = "ROMEO:"
SAMPLE = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "seed": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train recipes/shakespeare-char.yaml on tiny shakespeare and compare the best validation "
        f"loss with nanoGPT's published {TARGET} (its CPU configuration).",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/tiny-shakespeare"),
        help="folder holding tiny shakespeare's input.txt (default: %(default)s)",
    )
    p.add_argument("--out", default="runs/bench-shakespeare", help="run folder (default: %(default)s)")
    add_max_steps(p, "optimizer steps (default: the recipe's, 2000)")
    add_device(p)
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="PASS when best val loss <= target + tolerance (default: %(default)s, strict)",
    )
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe YAML (default: %(default)s)")
    add_progress(p)
    add_sets(
        p,
        "; e.g. nanoGPT's own blocks: --set model.overrides.positions=learned --set model.overrides.mlp=gelu "
        "--set model.overrides.norm=layernorm",
    )
    args = p.parse_args(argv)
    check_positive(p, args, "max_steps")
    return args


def train_throughput(metrics_path: Path, tokens_per_step: int) -> tuple[int, float]:
    """Total training tokens and training seconds from the "train" events of a fresh run's metrics log.

    Each event reports ``tokens_per_s`` over the steps since the previous one (evaluation excluded), so its
    window took ``tokens / tokens_per_s`` seconds.
    """
    with open(metrics_path, encoding="utf-8") as f:
        events = [json.loads(line) for line in f if line.strip()]
    tokens, seconds, prev_step = 0, 0.0, 0  # a fresh run starts at step 0
    for e in events:
        if e.get("event") != "train":
            continue
        n = tokens_per_step * (e["step"] - prev_step)
        prev_step = e["step"]
        if e.get("tokens_per_s", 0) > 0:
            tokens += n
            seconds += n / e["tokens_per_s"]
    return tokens, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tansuo.bundle import load_bundle
    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    data_file = args.data_dir / "input.txt"
    if not data_file.is_file():
        fail(
            f"{data_file} not found; pass --data-dir to the folder holding tiny shakespeare's input.txt "
            "(github.com/karpathy/char-rnn, data/tinyshakespeare/input.txt)"
        )

    # The same sequence as `tansuo train RECIPE --data FILE --out OUT [--set train.max_steps=N] --device D`.
    sets = [
        f"data.path={json.dumps(str(data_file))}",
        f"train.out_dir={json.dumps(args.out)}",
        f"train.device={args.device}",
    ]
    if args.max_steps is not None:
        sets.append(f"train.max_steps={args.max_steps}")
    rec, data_cfg = load_recipe(args.recipe, sets + args.sets)

    out_dir = Path(rec.train.out_dir)
    began: dict[str, float] = {}
    start = training_start(rec, out_dir, began, f" x {data_cfg.block_size} tokens")
    metrics_path = out_dir / "metrics.jsonl"  # a fresh run starts a new log
    done = train_recipe(rec, data_cfg, progress=args.progress, on_start=start)
    wall = time.perf_counter() - began["fit"]  # the fit's: training, evaluations, checkpoints and bundles
    result, model, trainer, busy = done.result, done.model, done.trainer, began["busy"]

    tokens_per_step = rec.train.batch_size * rec.train.grad_accum * data_cfg.block_size
    tokens, train_seconds = train_throughput(metrics_path, tokens_per_step)

    bundle = load_bundle(result["bundle"], device=trainer.device)
    sample = bundle.task.generate(bundle.model, PROMPT, device=trainer.device, **SAMPLE)

    best = float(result["val"]["loss"])
    limit = TARGET + args.tolerance
    return {
        "benchmark": "shakespeare_char",
        "recipe": str(args.recipe),
        "data": str(data_file),
        "out_dir": str(out_dir),
        "model": rec.model.name,
        "num_params": model.num_params(),
        "steps": trainer.plan.total_steps,
        "batch_size": rec.train.batch_size,
        "block_size": data_cfg.block_size,
        "device": str(trainer.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus_busy_at_start": busy,
        "best_val_loss": best,
        "best_step": result.get("step"),
        "target_val_loss": TARGET,
        "tolerance": args.tolerance,
        "passed": best <= limit,
        "full_length": trainer.plan.total_steps >= FULL_STEPS,
        "wall_time_s": wall,
        "train_time_s": train_seconds,
        "train_tokens": tokens,
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else None,
        "sample_prompt": PROMPT,
        "sample_settings": SAMPLE,
        "sample": sample,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    verdict = "PASS" if r["passed"] else "FAIL"
    note = "" if r["full_length"] else f"  (only {r['steps']} steps: the target is for {FULL_STEPS})"
    tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
    print()
    print(f"best val loss      {r['best_val_loss']:.4f}  (step {r['best_step']})")
    limit = r["target_val_loss"] + r["tolerance"]
    print(f"nanoGPT target     {r['target_val_loss']:.2f}  (pass at <= {limit:.2f})")
    print(f"result             {verdict}{note}")
    print(f"wall time          {r['wall_time_s']:.1f} s  (Trainer.fit, with evaluation and checkpoints)")
    print(f"training time      {r['train_time_s']:.1f} s  ({r['train_tokens']:,} tokens)")
    print(f"mean tokens/s      {tps}")
    s = r["sample_settings"]
    print(
        f"sample             prompt {r['sample_prompt']!r}, {s['max_new_tokens']} characters, "
        f"temperature {s['temperature']}, top-k {s['top_k']}, seed {s['seed']}:"
    )
    print("-" * 72)
    print(r["sample"])
    print("-" * 72)


def main(argv: list[str] | None = None) -> None:
    training_bench_main(argv, parse_args, run, report)


if __name__ == "__main__":
    main()
