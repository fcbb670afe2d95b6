"""The quickstart study, timed: ``tansuo explore recipes/quickstart.yaml`` as ``make demo`` runs it.

Runs the command in a subprocess (exactly what a user types), then reads the study's results.json and prints
the wall time (target: under 5 minutes on 2 CPU cores), the number of trials and of measured variants, and the
recommended model's quality, latency and size. The figures also go to ``<study>/bench.json``.

Run from the repository root::

    .venv/bin/python bench/explore_quickstart.py [--out runs/bench-explore-quickstart] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import bench_main, busy_note, fail, write_figures

TARGET_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the quickstart explore study and print its outcome.")
    p.add_argument("--recipe", type=Path, default=Path("recipes/quickstart.yaml"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-explore-quickstart"), help="study folder")
    p.add_argument(
        "--keep", action="store_true", help="keep an existing study folder (default: start afresh)"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study, write its figures and print them (the verdict needs the unrounded wall time)."""
    if not args.recipe.is_file():
        fail(f"{args.recipe} not found; run from the repository root")
    if args.out.exists() and not args.keep:
        shutil.rmtree(args.out)
    _, note = busy_note()
    cmd = [sys.executable, "-c", "from tansuo.cli import main; main()", "explore", str(args.recipe)]
    cmd += ["--out", str(args.out), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(cmd)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        fail(f"tansuo explore exited with {done.returncode}")
    results = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    measured = [r for r in results["variants"] if r["status"] == "ok"]
    rec = next((r for r in measured if r["id"] == results["recommended"]), None)
    figures = {
        "wall_s": round(wall, 1),
        "target_s": TARGET_S,
        "trials": len(results["trials"]),
        "trials_complete": results["counts"]["complete"],
        "variants_measured": len(measured),
        "variants_failed": sum(r["status"] != "ok" for r in results["variants"]),
        "pareto": len(results["pareto"]),
        "recommended": None,
        "cpus": note,
    }
    if rec is not None:
        v = rec["values"]
        figures["recommended"] = {
            "id": rec["id"],
            "model": rec["candidate"],
            "overrides": rec["overrides"],
            "variant": rec["variant"],
            "quality": round(v["quality"], 4),
            "metric": results["metric"],
            "latency_ms_p50": round(v["latency"], 3),
            "latency_ms_p95": round(v["latency_p95"], 3),
            "size_mb": round(v["size"], 3),
            "threads": rec["figures"]["threads"],
        }
    write_figures(args.out / "bench.json", figures)
    verdict = "PASS" if wall <= TARGET_S else "FAIL"
    print(f"wall time      {wall:.1f} s ({verdict}: target {TARGET_S:.0f} s on 2 CPU cores; {note})")
    print(f"trials         {figures['trials']} ({figures['trials_complete']} complete)")
    print(f"variants       {figures['variants_measured']} measured, {figures['variants_failed']} failed")
    print(f"Pareto front   {figures['pareto']} variants")
    if rec is None:
        print(f"recommended    none: {results['why']}")
    else:
        r = figures["recommended"]
        print(
            f"recommended    {r['id']} {r['model']} {r['overrides'] or ''} [{r['variant']}]: {r['metric']} "
            f"{100 * r['quality']:.2f}%, p50 {r['latency_ms_p50']:.3f} ms (p95 {r['latency_ms_p95']:.3f}) at "
            f"batch 1 on {r['threads']} thread(s), {r['size_mb']:.2f} MB"
        )
    print(f"report         {args.out / 'report.html'}")
    return figures


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run)


if __name__ == "__main__":
    main()
