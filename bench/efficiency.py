"""Each efficiency switch of ``train:`` (and the image augmentations) on against off: speed, memory, quality.

Three workloads, each the shipped recipe trained through the library as ``tansuo train`` would:

- ``vit``: ``recipes/digits-vit.yaml`` (scikit-learn's 8x8 digits, bundled: needs no data folder); quality is
  test accuracy;
- ``char-gpt``: ``recipes/shakespeare-char.yaml`` on ``DATA/tiny-shakespeare/input.txt``; quality is the
  best validation loss;
- ``sst2``: ``recipes/sst2-scratch.yaml`` on ``DATA/sst2`` (a BERT-Mini-sized encoder from scratch);
  quality is accuracy on GLUE's dev set (the recipe's test split).

Every run is the recipe with one change (``--set`` overrides, listed in SWITCHES) against the recipe as it
is (``baseline``), cut to ``--steps`` optimizer steps (default 200: minutes for the lot on 2 cores; ``--long``
keeps each recipe's own length) with one evaluation at the end. Each run is its own process, so that its
peak memory is its own. What is measured:

- speed: training units (images or tokens) per second from the run's ``metrics.jsonl``, evaluation
  excluded; the compiled run's first step (the compilation) is logged apart and shown as "compile s";
- memory: the bytes autograd keeps for the backward pass of one training batch (saved tensors that are not
  parameters, counted with ``torch.autograd.graph.saved_tensors_hooks``: what activation checkpointing
  trades away), and the process's peak resident memory (``ru_maxrss``; on CUDA the peak allocated);
- quality: the workload's metric above, after the same number of steps.

Runs go in the order of ``--switches``, baseline first; ``--repeats 2`` runs the list a second time in
reverse order and reports the median speed (the machine's load then falls on both ends alike).

On a CPU, fp16 autocast runs its matmuls at about 0.5 GFLOP/s here (against 7-120 for fp32), so the fp16
and bf16 runs of ``sst2`` (whose evaluation alone would take many minutes) are skipped unless
``--low-precision-everywhere``; the ViT and char GPT runs of them are cut to ``--low-precision-steps``.

Run from the repository root::

    .venv/bin/python bench/efficiency.py --data-dir ../shared/data [--workloads vit,char-gpt,sst2]
        [--switches baseline,compile,...] [--steps 200 | --long] [--repeats 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import add_device, add_json, bench_main, busy_note, check_positive, fail, header

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    recipe: str
    data: str | None  # the --set that points at the data, relative to --data-dir; None: built in
    metric: tuple[str, str]  # (split, metric) of the quality figure
    higher_is_better: bool
    switches: tuple[str, ...]  # the switches that apply to it


COMMON = ("compile", "activation_checkpointing", "bf16", "fp16", "foreach", "for-loop", "ema")
WORKLOADS = {
    "vit": Workload(
        "recipes/digits-vit.yaml",
        None,
        ("test", "accuracy"),
        True,
        COMMON + ("randaugment", "trivialaugment", "mixup_cutmix", "label_smoothing"),
    ),
    "char-gpt": Workload(
        "recipes/shakespeare-char.yaml",
        'data.path="{root}/tiny-shakespeare/input.txt"',
        ("val", "loss"),
        False,
        COMMON,
    ),
    "sst2": Workload(
        "recipes/sst2-scratch.yaml",
        'data.train="{root}/sst2/train.tsv"|data.test="{root}/sst2/dev.tsv"',
        ("test", "accuracy"),
        True,
        COMMON + ("label_smoothing",),
    ),
}
SWITCHES: dict[str, list[str]] = {
    "baseline": [],
    "compile": ["train.compile=true"],
    "activation_checkpointing": ["train.activation_checkpointing=true"],
    "bf16": ["train.precision=bf16"],
    "fp16": ["train.precision=fp16"],
    "foreach": ["train.optimizer_impl=foreach"],  # against the default fused AdamW
    "for-loop": ["train.optimizer_impl=for-loop"],
    "ema": ["train.ema=0.99"],
    "randaugment": ["data.augment=randaugment"],
    "trivialaugment": ["data.augment=trivialaugment"],
    "mixup_cutmix": ["data.mixup=0.3", "data.cutmix=0.3"],
    "label_smoothing": ["data.label_smoothing=0.1"],
}
LOW_PRECISION = ("bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train each workload's recipe with each efficiency switch on and off; print speed, "
        "memory and quality side by side."
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data"),
        help="folder holding tiny-shakespeare/input.txt and sst2/{train,dev}.tsv (default: %(default)s)",
    )
    p.add_argument("--workloads", default="vit,char-gpt,sst2", help=f"from {', '.join(WORKLOADS)}")
    p.add_argument(
        "--switches",
        default=",".join(SWITCHES),
        help=f"from {', '.join(SWITCHES)}; each workload runs those that apply to it (default: all)",
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--long", action="store_true", help="each recipe's own length instead of --steps")
    p.add_argument("--repeats", type=int, default=1, help="passes over the runs (default: %(default)s)")
    p.add_argument(
        "--low-precision-steps",
        type=int,
        default=20,
        help="steps of the bf16 / fp16 runs on a CPU, where they are slow (default: %(default)s)",
    )
    p.add_argument(
        "--low-precision-everywhere",
        action="store_true",
        help="also run bf16 / fp16 for sst2 on a CPU (its evaluation in fp16 takes many minutes)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-efficiency"), help="run folders under here")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads in every run (default: each recipe's own)"
    )
    add_device(p)
    add_json(p, "also write the figures to this JSON file")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "SWITCH"), help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_positive(p, args, "steps", "repeats", "low_precision_steps", "threads")
    args.workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.switch_names = [s.strip() for s in args.switches.split(",") if s.strip()]
    if not args.workload_names or any(w not in WORKLOADS for w in args.workload_names):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if any(s not in SWITCHES for s in args.switch_names):
        p.error(f"--switches: choose from {', '.join(SWITCHES)}")
    if "baseline" not in args.switch_names:
        args.switch_names.insert(0, "baseline")
    return args


# ------------------------------------------------------------------------------------------------ child
def saved_activation_bytes(trainer: Any) -> int:
    """Bytes autograd saves for backward in one training step of ``trainer`` (parameters left out), on the
    first training batch, with the RNG state and gradients left as they were."""
    import torch

    from tansuo.device import autocast_to

    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if storage.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    cfg = trainer.cfg
    batch = next(trainer.task.train_batches(cfg.batch_size, start=0))
    batch = {k: v.to(trainer.device) for k, v in batch.items()}
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_to(trainer.device, trainer.amp_dtype):
            loss = trainer.task.loss(trainer.model, batch)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return total


def child(args: argparse.Namespace) -> None:
    """One run: train the workload's recipe with one switch; print its figures as one JSON line."""
    import resource

    import torch

    from tansuo.recipe import load_recipe
    from tansuo.train.setup import train_recipe

    name, switch = args.child
    w = WORKLOADS[name]
    sets = [f"train.out_dir={json.dumps(str(args.child_out))}", f"train.device={args.device}"]
    if args.threads:
        sets.append(f"train.threads={args.threads}")
    if w.data:
        sets += w.data.format(root=args.data_dir.resolve()).split("|")
    if args.child_steps:
        steps = args.child_steps
        sets += [f"train.max_steps={steps}", f"train.eval_every={steps}", "train.early_stop_patience=0"]
        sets.append(f"train.warmup_steps={min(steps // 10, 100)}")
        if name == "char-gpt":
            sets.append("data.eval_windows=480")  # 40 batches of 12
    rec, data_cfg = load_recipe(REPO / w.recipe, sets + SWITCHES[switch])
    measured: dict[str, Any] = {}

    def start(trainer: Any) -> None:
        if not rec.train.compile:  # the compiled forward would compile here, outside its own timing
            measured["saved_bytes"] = saved_activation_bytes(trainer)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

    began = time.perf_counter()
    done = train_recipe(rec, data_cfg, on_start=start)
    wall = time.perf_counter() - began
    events = [json.loads(x) for x in (Path(rec.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    unit = done.task.unit
    # each "train" event's rate covers the steps since the previous event (the compiled first step is
    # left out of it); a step holds the same number of units throughout, so the run's rate is
    # sum(steps) / sum(steps / rate)
    steps = weighted = 0.0
    prev = 0
    for e in events:
        if e["event"] == "compile":
            prev = e["step"]
        elif e["event"] == "train":
            rate = e[f"{unit}_per_s"]
            if rate > 0:
                steps += e["step"] - prev
                weighted += (e["step"] - prev) / rate
            prev = e["step"]
    compile_s = next((e["seconds"] for e in events if e["event"] == "compile"), None)
    split, metric = w.metric
    result = done.result
    quality = result.get(split, {}).get(metric) if split != "val" else result["val"][metric]
    peak = (
        torch.cuda.max_memory_allocated(done.trainer.device)
        if done.trainer.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print(
        json.dumps(
            {
                "workload": name,
                "switch": switch,
                "steps": done.trainer.step,
                "unit": unit,
                "units_per_s": steps / weighted if weighted else None,
                "compile_s": compile_s,
                "saved_mb": measured["saved_bytes"] / 2**20 if "saved_bytes" in measured else None,
                "peak_mb": peak / 2**20,
                "quality": quality,
                "wall_s": wall,
            }
        )
    )


# ------------------------------------------------------------------------------------------------ parent
def plan(args: argparse.Namespace, cpu: bool) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """The runs (workload, switch, steps) in order, and notes on those left out."""
    runs, notes = [], []
    for name in args.workload_names:
        w = WORKLOADS[name]
        for switch in args.switch_names:
            if switch != "baseline" and switch not in w.switches:
                continue
            steps = None if args.long else args.steps
            if cpu and switch in LOW_PRECISION:
                if name == "sst2" and not args.low_precision_everywhere:
                    notes.append(
                        f"{name} {switch}: skipped on the CPU (fp16/bf16 matmuls are slow here; evaluation "
                        "alone would take many minutes); --low-precision-everywhere runs it"
                    )
                    continue
                steps = min(steps or args.low_precision_steps, args.low_precision_steps)
            runs.append((name, switch, steps))
    return runs, notes


def launch(args: argparse.Namespace, name: str, switch: str, steps: int | None, index: int) -> dict:
    out = args.out / f"{name}-{switch}-{index}"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        switch,
        "--child-out",
        str(out),
        "--data-dir",
        str(args.data_dir),
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if steps is not None:
        cmd += ["--child-steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "bench")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        fail(f"{name} with {switch} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.child:
        child(args)
        sys.exit(0)
    import torch

    from tansuo.device import resolve_device

    device = resolve_device(args.device)
    for name in args.workload_names:
        w = WORKLOADS[name]
        if w.data:
            for part in w.data.split("|"):
                path = Path(part.split("=", 1)[1].strip('"').format(root=args.data_dir))
                if not path.is_file():
                    fail(f"{path} not found: pass --data-dir to the folder holding it, or leave {name} out")
    busy, note = busy_note()
    threads = f"threads per run: {args.threads}" if args.threads else "each recipe's threads"
    print(header(f"device {device}", note, threads))
    runs, notes = plan(args, device.type == "cpu")
    for n in notes:
        print(f"note: {n}")
    print(f"{len(runs)} runs x {args.repeats} pass(es), each in its own process\n", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        order = runs if rep % 2 == 0 else list(reversed(runs))
        for name, switch, steps in order:
            r = launch(args, name, switch, steps, rep)
            results.setdefault((name, switch), []).append(r)
            speed = r["units_per_s"]
            print(
                f"  {name:9s} {switch:25s} {r['steps']:5d} steps  "
                f"{(f'{speed:,.0f}' if speed else '-'):>9s} {r['unit']}/s  quality {r['quality']:.4f}  "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )
    rows = []
    for rs in results.values():
        row = dict(rs[0])
        speeds = [r["units_per_s"] for r in rs if r["units_per_s"]]
        row["units_per_s"] = statistics.median(speeds) if speeds else None
        row["peak_mb"] = max(r["peak_mb"] for r in rs)
        rows.append(row)
    return {
        "benchmark": "efficiency",
        "torch": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "cpus_busy_at_start": busy,
        "steps": None if args.long else args.steps,
        "repeats": args.repeats,
        "notes": notes,
        "runs": rows,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    head = [
        "workload",
        "switch",
        "steps",
        "speed x",
        "compile s",
        "saved MB",
        "x",
        "peak MB",
        "quality",
        "delta",
    ]
    by = {(x["workload"], x["switch"]): x for x in r["runs"]}
    body = []
    for x in r["runs"]:
        base = by[(x["workload"], "baseline")]
        w = WORKLOADS[x["workload"]]
        same_steps = base["steps"] == x["steps"]
        speed = (
            f"{x['units_per_s'] / base['units_per_s']:.2f}"
            if x["units_per_s"] and base["units_per_s"]
            else "-"
        )
        saved = f"{x['saved_mb']:.1f}" if x["saved_mb"] is not None else "-"
        saved_ratio = (
            f"{x['saved_mb'] / base['saved_mb']:.2f}"
            if x["saved_mb"] is not None and base["saved_mb"]
            else "-"
        )
        delta = x["quality"] - base["quality"]
        body.append(
            [
                x["workload"],
                x["switch"],
                str(x["steps"]),
                speed,
                f"{x['compile_s']:.1f}" if x["compile_s"] is not None else "",
                saved,
                saved_ratio,
                f"{x['peak_mb']:.0f}",
                f"{w.metric[1]} {x['quality']:.4f}",
                f"{delta:+.4f}" if same_steps else "(fewer steps)",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths, strict=True))
        )

    print()
    print(line(head))
    print("  ".join("-" * wd for wd in widths))
    for b in body:
        print(line(b))
    print(
        "\nspeed x: training images or tokens per second against the workload's baseline (evaluation and "
        "the compiled first step excluded); saved MB: what autograd keeps for backward on one batch, "
        "x against baseline; "
        "peak MB: the run's peak resident memory; delta: quality minus the baseline's (accuracy: higher is "
        "better, loss: lower)"
    )


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, report, figures=lambda _, args: args.json)


if __name__ == "__main__":
    main()
