"""``tansuo serve`` under load: requests per second and p50/p95 latency, batching on and off, two backends.

What is measured: the real server, started as a subprocess (``tansuo serve BUNDLE --port P --threads N``
on 127.0.0.1), for two bundles:

- the digits ViT classifier (``recipes/digits-vit.yaml``; ``--digits-bundle``, else ``runs/digits-vit/bundle``
  or ``runs/bench-serve-digits/bundle`` when one exists, else trained first with
  ``tansuo train recipes/digits-vit.yaml --out runs/bench-serve-digits``), sent scikit-learn's 8x8 digit
  images as ``{"inputs": {"pixels": ...}}``;
- a MiniLM-sized text classifier (``--text-bundle``, default ``runs/bench-sst2-mean/bundle``: MiniLM-L6
  fine-tuned on SST-2 by ``bench/sst2.py``; without it an untrained ``minilm_l6`` classifier is saved to
  ``runs/bench-serve-minilm``), sent real sentences (SST-2's dev.tsv from ``--sst2-dir`` when present, else
  made-up sentences of SST-2's length), one per request as ``{"inputs": "..."}``.

Each model is served with the torch and the onnxruntime backend, each with batching on
(``--max-batch 32``, the default ``--max-wait-ms``) and off (``--max-batch 1``): eight servers, one after
the other. Against each, 1, 8, 32 and 64 concurrent clients send requests back to back (closed loop, one
keep-alive connection each) for ``--warmup`` seconds (not counted), then for ``--duration`` seconds; the
counted requests are those sent and answered inside that window. The clients are a minimal HTTP/1.1
client on asyncio (uvloop when installed) in this process, so that the load generator costs as little
CPU as possible next to the server on a small machine; every answer must be 200 (others are counted as
errors and printed).

Printed per model: backend x batching x clients -> req/s, p50 and p95 latency (ms), and, from the
server's own /metrics and /proc, the mean batch size and the server's CPU time per request (all its
threads); then the ratio batching-on / batching-off throughput at 32 clients per backend. Target (issue
6): >= 3x for both models. Everything also goes to ``--json``.

Run from the repository root (the whole run takes about ``8 x (startup + 4 x (warmup + duration))``)::

    .venv/bin/python bench/serve_load.py [--duration 8] [--warmup 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import add_json, add_threads, bench_main, busy_note, fail

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (1, 8, 32, 64)
TARGET = 3.0  # batching-on / batching-off throughput at 32 clients
RATIO_CLIENTS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tansuo serve under load: req/s and latency, batching on/off.")
    p.add_argument("--digits-bundle", type=Path, default=None, help="digits ViT bundle (default: see --help)")
    p.add_argument("--text-bundle", type=Path, default=None, help="MiniLM-sized text classifier bundle")
    p.add_argument("--sst2-dir", type=Path, default=Path("/work/shared/data/sst2"), help="SST-2 (dev.tsv)")
    p.add_argument("--models", default="digits,text", help="which models (default: %(default)s)")
    p.add_argument("--backends", default="torch,onnxruntime", help="which backends (default: %(default)s)")
    p.add_argument(
        "--clients", default=",".join(map(str, CLIENTS)), help="concurrent clients (default: %(default)s)"
    )
    p.add_argument(
        "--duration", type=float, default=8.0, help="counted seconds per cell (default: %(default)s)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="uncounted seconds first (default: %(default)s)")
    add_threads(p, "the server's --threads (default: %(default)s)", default=1)
    p.add_argument("--max-batch", type=int, default=32, help="--max-batch with batching on (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="--max-wait-ms (default: the server's)")
    add_json(p, "results file", default=Path("runs/bench-serve/results.json"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ bundles
def digits_bundle(args: argparse.Namespace) -> Path:
    if args.digits_bundle is not None:
        return args.digits_bundle
    for candidate in (ROOT / "runs/bench-serve-digits/bundle", ROOT / "runs/digits-vit/bundle"):
        if (candidate / "config.json").is_file():
            return candidate
    out = ROOT / "runs/bench-serve-digits"
    print(f"training the digits ViT into {out} (recipes/digits-vit.yaml) ...", flush=True)
    tansuo = Path(sys.executable).with_name("tansuo")
    subprocess.run(
        [str(tansuo), "train", str(ROOT / "recipes/digits-vit.yaml"), "--out", str(out)], check=True, cwd=ROOT
    )
    return out / "bundle"


def text_bundle(args: argparse.Namespace, sentences: list[str]) -> Path:
    if args.text_bundle is not None:
        return args.text_bundle
    default = ROOT / "runs/bench-sst2-mean/bundle"
    if (default / "config.json").is_file():
        return default
    out = ROOT / "runs/bench-serve-minilm"
    if (out / "bundle/config.json").is_file():
        return out / "bundle"
    print(f"no fine-tuned MiniLM classifier: saving an untrained minilm_l6 classifier to {out}", flush=True)
    import torch

    from tansuo.bundle import save_bundle
    from tansuo.models import create_model
    from tansuo.recipe import validate_recipe
    from tansuo.tasks import TASKS

    out.mkdir(parents=True, exist_ok=True)
    rows = [f"{s.replace(chr(9), ' ')}\t{i % 2}" for i, s in enumerate(sentences)]
    (out / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    minilm = ROOT / "models/all-MiniLM-L6-v2"
    tokenizer = {"tokenizer": str(minilm)} if minilm.is_dir() else {"vocab_size": 30522}
    raw = {
        "task": "classify",
        "seed": 0,
        "data": {"train": str(out / "train.tsv"), "max_seq_len": 64, **tokenizer},
        "model": {"name": "minilm_l6", "overrides": {"pooling": "mean"}},
        "train": {"out_dir": str(out), "max_steps": 1},
    }
    recipe, data = validate_recipe(raw)
    task = TASKS["classify"].from_recipe(data, 0, out / "data")
    torch.manual_seed(0)
    model = create_model("minilm_l6", **{**task.model_overrides(), **recipe.model.overrides}).eval()
    return save_bundle(out / "bundle", model, task)


def sst2_sentences(args: argparse.Namespace) -> tuple[list[str], str]:
    dev = args.sst2_dir / "dev.tsv"
    if dev.is_file():
        lines = dev.read_text(encoding="utf-8").splitlines()[1:]
        sentences = [line.split("\t")[0].strip() for line in lines if line.strip()]
        return [s for s in sentences if s], f"{len(sentences)} SST-2 dev sentences ({dev})"
    rng = np.random.default_rng(0)
    words = ["the", "a", "film", "movie", "is", "was", "not", "very", "good", "bad", "funny", "dull"]
    words += ["story", "acting", "and", "but", "its", "of", "to", "in"]
    made = [" ".join(rng.choice(words, size=int(rng.integers(4, 40)))) for _ in range(872)]
    return made, "872 made-up sentences of 4-40 words (no SST-2 dev.tsv)"


def digit_images() -> tuple[list[list[list[int]]], str]:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(int)
    return [img.tolist() for img in images], f"{len(images)} scikit-learn 8x8 digits"


# ------------------------------------------------------------------------------------------- server
def _machine_busy_seconds() -> float:
    """CPU seconds all processes have used (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process (the load generator) and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``tansuo serve`` in a subprocess, ready when GET /ready answers 200."""

    def __init__(self, bundle: Path, flags: list[str], log: Path) -> None:
        self.port = _free_port()
        tansuo = Path(sys.executable).with_name("tansuo")
        self.cmd = [str(tansuo), "serve", str(bundle), "--port", str(self.port), *flags]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("wb") as f:
            self.process = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if asyncio.run(_get(self.port, "/ready"))[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        fail(f"`{' '.join(self.cmd)}` did not become ready:\n{log.read_text(errors='replace')[-4000:]}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batch_sizes(self) -> tuple[float, float]:
        """(batches, items) so far, from the tansuo_batch_size histogram."""
        text = asyncio.run(_get(self.port, "/metrics"))[1].decode()
        count = re.search(r"^tansuo_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
        total = re.search(r"^tansuo_batch_size_sum\{[^}]*\} (\S+)$", text, re.M)
        return (float(count.group(1)), float(total.group(1))) if count and total else (0.0, 0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------------------- client
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if m is None:
        raise RuntimeError(f"no Content-Length in {head!r}")
    return status, await reader.readexactly(int(m.group(1)))


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return await _read_response(reader)
    finally:
        writer.close()


def _post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _load(port: int, requests: list[bytes], clients: int, warmup: float, duration: float) -> dict:
    """Closed-loop load: ``clients`` connections sending back to back; counts the measured window only."""
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors: list[str] = []

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k * 7919
        try:
            while True:
                sent = time.perf_counter()
                if sent >= t1:
                    return
                writer.write(requests[i % len(requests)])
                i += 1
                status, body = await _read_response(reader)
                done = time.perf_counter()
                if sent >= t0 and done <= t1:
                    if status == 200:
                        latencies.append(done - sent)
                    else:
                        errors.append(f"{status} {body[:200]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    lat = sorted(latencies)
    pick = lambda q: 1000 * lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan")  # noqa: E731
    return {
        "requests": len(lat),
        "req_per_s": len(lat) / duration,
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "errors": len(errors),
        "error_examples": errors[:3],
    }


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -------------------------------------------------------------------------------------------- bench
@dataclass
class Cell:
    model: str
    backend: str
    batching: str
    max_batch: int
    clients: int
    requests: int
    req_per_s: float
    p50_ms: float
    p95_ms: float
    mean_ms: float
    errors: int
    mean_batch: float
    server_cpu_ms_per_req: float
    client_cpu: float  # CPUs the load generator (this process) kept busy
    others_cpu: float  # CPUs other processes kept busy: noise


def bench_model(
    name: str, bundle: Path, bodies: list[bytes], args: argparse.Namespace, clients: list[int]
) -> list[Cell]:
    cells = []
    requests = [_post("/v1/predict", b) for b in bodies]
    for backend in args.backends.split(","):
        for batching, max_batch in (("on", args.max_batch), ("off", 1)):
            flags = ["--backend", backend, "--threads", str(args.threads), "--max-batch", str(max_batch)]
            if args.max_wait_ms is not None:
                flags += ["--max-wait-ms", str(args.max_wait_ms)]
            log = args.json.parent / "logs" / f"{name}-{backend}-batch{max_batch}.log"
            print(f"  {name}: {backend}, batching {batching} (--max-batch {max_batch}) ...", flush=True)
            server = Server(bundle, flags, log)
            try:
                for n in clients:
                    cpu0, (b0, i0) = server.cpu_seconds(), server.batch_sizes()
                    all0, own0, wall0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
                    r = _run_async(_load(server.port, requests, n, args.warmup, args.duration))
                    cpu1, (b1, i1) = server.cpu_seconds(), server.batch_sizes()
                    all1, own1, wall = (
                        _machine_busy_seconds(),
                        _own_cpu_seconds(),
                        time.perf_counter() - wall0,
                    )
                    total = max(1, i1 - i0)  # items over warm-up and window (CPU covers both)
                    cell = Cell(
                        model=name,
                        backend=backend,
                        batching=batching,
                        max_batch=max_batch,
                        clients=n,
                        requests=r["requests"],
                        req_per_s=r["req_per_s"],
                        p50_ms=r["p50_ms"],
                        p95_ms=r["p95_ms"],
                        mean_ms=r["mean_ms"],
                        errors=r["errors"],
                        mean_batch=(i1 - i0) / max(1, b1 - b0),
                        server_cpu_ms_per_req=1000 * (cpu1 - cpu0) / total,
                        client_cpu=(own1 - own0) / wall,
                        others_cpu=max(0.0, (all1 - all0) - (cpu1 - cpu0) - (own1 - own0)) / wall,
                    )
                    cells.append(cell)
                    if r["errors"]:
                        print(f"    {r['errors']} errors, e.g. {r['error_examples']}", flush=True)
            finally:
                server.stop()
            if "Traceback" in log.read_text(errors="replace"):
                print(f"    the server logged a traceback: see {log}", flush=True)
    return cells


def ratios(cells: list[Cell], n: int = RATIO_CLIENTS) -> dict[str, float]:
    out = {}
    for backend in dict.fromkeys(c.backend for c in cells):
        on = [c.req_per_s for c in cells if (c.backend, c.batching, c.clients) == (backend, "on", n)]
        off = [c.req_per_s for c in cells if (c.backend, c.batching, c.clients) == (backend, "off", n)]
        if on and off and off[0] > 0:
            out[backend] = on[0] / off[0]
    return out


def print_table(title: str, cells: list[Cell]) -> None:
    print(f"\n{title}")
    head = (
        f"{'backend':<12} {'batching':<9} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'mean batch':>10} {'srv CPU ms/req':>14} {'errors':>6} {'client CPUs':>11} {'other CPUs':>10}"
    )
    print(head)
    print("-" * len(head))
    for c in cells:
        print(
            f"{c.backend:<12} {c.batching + f' ({c.max_batch})':<9} {c.clients:>7} {c.req_per_s:>8.1f} "
            f"{c.p50_ms:>8.1f} {c.p95_ms:>8.1f} {c.mean_batch:>10.1f} {c.server_cpu_ms_per_req:>14.2f} "
            f"{c.errors:>6} {c.client_cpu:>11.2f} {c.others_cpu:>10.2f}"
        )
    for backend, r in ratios(cells).items():
        verdict = "PASS" if r >= TARGET else "FAIL"
        print(
            f"batching on / off at {RATIO_CLIENTS} clients, {backend}: {r:.2f}x "
            f"(target >= {TARGET:g}x) {verdict}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.json = args.json if args.json.is_absolute() else ROOT / args.json
    clients = [int(c) for c in args.clients.split(",")]
    if RATIO_CLIENTS not in clients:
        print(f"note: --clients has no {RATIO_CLIENTS}: no batching ratio will be printed")
    for b in args.backends.split(","):
        if b not in ("torch", "onnxruntime"):
            fail(f"--backends: {b!r} is not torch or onnxruntime")
    _, note = busy_note()
    started = time.perf_counter()
    print(
        f"{note}; server --threads {args.threads}; clients {clients}; {args.warmup:g} s warm-up + "
        f"{args.duration:g} s counted per cell; batching on = --max-batch {args.max_batch}, "
        f"--max-wait-ms {args.max_wait_ms if args.max_wait_ms is not None else 'default (5)'}"
    )
    models: dict[str, tuple[Path, list[bytes], str]] = {}
    for name in args.models.split(","):
        if name == "digits":
            images, what = digit_images()
            bodies = [json.dumps({"inputs": {"pixels": img}}).encode() for img in images]
            models[name] = (digits_bundle(args), bodies, what)
        elif name == "text":
            sentences, what = sst2_sentences(args)
            bodies = [json.dumps({"inputs": s}).encode() for s in sentences]
            models[name] = (text_bundle(args, sentences), bodies, what)
        else:
            fail(f"--models: {name!r} is not digits or text")
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "note": note,
        "models": {},
    }
    for name, (bundle, bodies, what) in models.items():
        config = json.loads((bundle / "config.json").read_text())
        title = (
            f"{name}: {bundle} ({config['model_name']}, {config['num_params']:,} parameters), "
            f"inputs: {what}; server --threads {args.threads}"
        )
        print(f"\n{title}", flush=True)
        cells = bench_model(name, bundle, bodies, args, clients)
        print_table(title, cells)
        results["models"][name] = {
            "bundle": str(bundle),
            "inputs": what,
            "cells": [asdict(c) for c in cells],
            f"batching_ratio_at_{RATIO_CLIENTS}_clients": ratios(cells),
        }
    results["wall_s"] = time.perf_counter() - started
    return results


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{r['wall_s']:.0f} s in all; results in {args.json}")


def main(argv: list[str] | None = None) -> int:
    bench_main(argv, parse_args, run, report, figures=lambda _, args: args.json, written=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
