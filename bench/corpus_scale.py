"""Training on a corpus far larger than memory: peak RSS with a 2 GB text against a 20 MB one.

The ``lm`` task never holds its corpus: the text is streamed in chunks into the character tokenizer and into
a memory-mapped token file (``data/text.py``), and batches are random windows of that file. So the peak
resident memory of ``tansuo train`` should not grow with the corpus. This bench generates two corpora from
``--base`` (tiny shakespeare's lines, shuffled with a seed and repeated until the size is reached), trains
``recipes/shakespeare-char.yaml`` for ``--steps`` steps on each in a fresh process, and prints each process's
peak RSS (``wait4``'s ``ru_maxrss``), the time to prepare the data and train, and the ratio.

Target (issue 18): peak RSS with 2 GB within +10% of that with 20 MB.

Run from the repository root (needs about 3 x ``--large-mb`` of free disk: the text and its uint16 tokens)::

    .venv/bin/python bench/corpus_scale.py [--large-mb 2048] [--work /tmp/tansuo-corpus-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_json, bench_main, busy_note, fail, header  # noqa: E402

TARGET = 1.10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Peak RSS of training on a 2 GB corpus against a 20 MB one.")
    p.add_argument(
        "--base",
        type=Path,
        default=Path("../shared/data/tiny-shakespeare/input.txt"),
        help="text whose lines make up the corpora (default: %(default)s)",
    )
    p.add_argument("--small-mb", type=int, default=20, help="the small corpus (default: %(default)s MB)")
    p.add_argument("--large-mb", type=int, default=2048, help="the large corpus (default: %(default)s MB)")
    p.add_argument("--steps", type=int, default=30, help="training steps on each (default: %(default)s)")
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/tansuo-corpus-scale"), help="corpora and runs (deleted after)"
    )
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    add_json(p, "also write the figures to this file")
    return p.parse_args(argv)


def make_corpus(base: Path, out: Path, megabytes: int, seed: int = 0) -> int:
    """Writes ``megabytes`` MB of ``base``'s lines, shuffled per pass with ``seed``; returns the bytes."""
    lines = [line for line in base.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    target = megabytes * 1024 * 1024
    rng = random.Random(seed)
    written = 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(lines)
            chunk = "".join(lines)[: target - written]
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return written


def train_peak_rss(corpus: Path, run: Path, steps: int) -> dict[str, Any]:
    """``tansuo train`` on ``corpus`` in a fresh process: its peak RSS (MB), wall time and final loss."""
    tansuo = Path(sys.executable).with_name("tansuo")
    cmd = [str(tansuo), "train", "recipes/shakespeare-char.yaml", "--data", str(corpus), "--out", str(run)]
    cmd += ["--set", f"train.max_steps={steps}", "--set", f"train.eval_every={steps}"]
    cmd += ["--set", "data.eval_windows=240", "--set", "train.threads=2"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the peak split into anonymous memory and mapped file pages (the token file), sampled every 0.2 s
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    out, err = "", proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-1500:]}\n{err[-1500:]}")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e for e in events if e.get("event") == "eval"]
    tokens = sum(f.stat().st_size for f in run.rglob("*.bin"))
    return {
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kB on Linux
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
        "seconds": seconds,
        "val_loss": val[-1]["loss"] if val else None,
        "token_file_mb": tokens / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.base.is_file():
        fail(f"{args.base} not found; pass --base with a text file")
    free = shutil.disk_usage(args.work.parent if args.work.parent.exists() else Path("/")).free
    if free < 3.2 * args.large_mb * 2**20:
        fail(f"about {3.2 * args.large_mb / 1024:.1f} GB of free disk needed under {args.work.parent}")
    _, note = busy_note()
    print(header(note) + f" · recipes/shakespeare-char.yaml · {args.steps} steps each")
    args.work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    try:
        for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
            corpus = args.work / f"{name}.txt"
            start = time.perf_counter()
            size = make_corpus(args.base, corpus, mb)
            made = time.perf_counter() - start
            r = train_peak_rss(corpus, args.work / f"run-{name}", args.steps)
            r |= {"corpus_mb": size / 2**20, "generate_seconds": made}
            figures[name] = r
            print(
                f"{name}: corpus {r['corpus_mb']:,.0f} MB (tokens {r['token_file_mb']:,.0f} MB): peak RSS "
                f"{r['peak_rss_mb']:,.0f} MB (sampled peaks: anonymous {r['peak_anon_mb']:,.0f} MB, mapped "
                f"file pages {r['peak_file_mb']:,.0f} MB); tokenize + train {r['seconds']:.0f} s; val loss "
                f"{r['val_loss']:.3f}",
                flush=True,
            )
            corpus.unlink()
            shutil.rmtree(args.work / f"run-{name}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    ratio = figures["large"]["peak_rss_mb"] / figures["small"]["peak_rss_mb"]
    figures["ratio"] = ratio
    figures["pass"] = ratio <= TARGET
    growth = figures["large"]["corpus_mb"] / figures["small"]["corpus_mb"]
    print(
        f"peak RSS {growth:.0f}x the corpus: {ratio:.3f}x (target <= {TARGET}): "
        f"{'PASS' if figures['pass'] else 'FAIL'}"
    )
    anon = figures["large"]["peak_anon_mb"] / max(figures["small"]["peak_anon_mb"], 1e-9)
    figures["anon_ratio"] = anon
    print(f"anonymous memory alone: {anon:.3f}x (the rest is the token file's pages the process has mapped)")
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(argv, parse_args, run, None, figures=lambda r, a: a.json)


if __name__ == "__main__":
    main()
