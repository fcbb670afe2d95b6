"""Concurrent streaming chat against ``tansuo serve``: continuous batching against static batching.

What is measured: the real server (``tansuo serve BUNDLE --threads N``, a subprocess on 127.0.0.1) serving a
chat model (``--bundle``, default SmolLM2-135M-Instruct from ``make smollm``), twice: with
``--batching continuous`` (a request joins the running batch at the next decoding step) and with
``--batching static`` (requests that arrive while a batch decodes wait for it to end, then start together).

``--clients`` clients (16) each send ``--requests`` (3) streaming ``POST /v1/chat/completions`` one after the
other (closed loop), greedy, each asking for its own number of tokens (seeded between ``--min-tokens`` and
``--max-tokens``, so requests end at different times, as real replies do) about its own review sentence.
Per request: time to first token (the first chunk with content), completion tokens (``usage``). Per server:
aggregate completion tokens per second over the wall time of the whole load, and p50 / p95 TTFT; the
server's mean decoding batch from its /metrics. Then the ratio continuous / static.

Run from the repository root::

    .venv/bin/python bench/serve_chat.py [--clients 16] [--requests 3] [--json runs/bench-serve-chat.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

from _common import add_json, bench_main, busy_note, fail, header
from serve_load import Server

SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The plot is paper-thin and the jokes fall flat.",
    "An utterly charming and hilarious film that reminded me why I love cinema.",
    "It drags on for far too long and never finds its footing.",
    "The performances are superb, especially the lead.",
    "I wanted to like it, but the script is a mess.",
    "A moving portrait of a family in crisis.",
    "Tedious, predictable and loud.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Concurrent streaming chat: continuous vs static batching.")
    p.add_argument("--bundle", type=Path, default=Path("models/smollm2-135m-instruct"), help="a chat bundle")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--requests", type=int, default=3, help="requests per client (default: %(default)s)")
    p.add_argument("--min-tokens", type=int, default=16, help="shortest reply asked (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=96, help="longest reply asked (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="server threads (default: %(default)s)")
    p.add_argument("--modes", default="continuous,static", help="batching modes (default: %(default)s)")
    add_json(p, "also write the figures to this file")
    return p.parse_args(argv)


async def _client(port: int, plan: list[tuple[str, int]], results: list[dict[str, Any]]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        for sentence, tokens in plan:
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": f"What do you think of this review? {sentence}"}],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first, usage = None, None
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:500]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                        first = time.perf_counter() - start
            results.append(
                {
                    "ttft_s": first if first is not None else time.perf_counter() - start,
                    "tokens": usage["completion_tokens"] if usage else 0,
                    "seconds": time.perf_counter() - start,
                }
            )


def _mean_batch(server: Server, endpoint: str) -> float:
    """Rows per decoding step (continuous: endpoint "decode") or requests per batch (static: the route)."""
    text = asyncio.run(_metrics(server.port))
    label = re.escape(f'{{endpoint="{endpoint}"}}')
    count = re.search(rf"^tansuo_batch_size_count{label} (\S+)$", text, re.M)
    total = re.search(rf"^tansuo_batch_size_sum{label} (\S+)$", text, re.M)
    return float(total.group(1)) / float(count.group(1)) if count and total and float(count.group(1)) else 0.0


async def _metrics(port: int) -> str:
    import httpx

    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/metrics")).text


def load(server: Server, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    rng = random.Random(0)
    plans = [
        [(rng.choice(SENTENCES), rng.randint(args.min_tokens, args.max_tokens)) for _ in range(args.requests)]
        for _ in range(args.clients)
    ]
    results: list[dict[str, Any]] = []

    async def everyone() -> None:
        await asyncio.gather(*(_client(server.port, plan, results) for plan in plans))

    start = time.perf_counter()
    asyncio.run(everyone())
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "mean_batch": _mean_batch(server, "decode" if mode == "continuous" else "/v1/chat/completions"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.bundle / "config.json").is_file():
        fail(f"{args.bundle} is not a bundle; run `make smollm` first (or pass --bundle)")
    modes = [m.strip() for m in args.modes.split(",")]
    _, note = busy_note()
    print(header(note) + f" · {args.clients} clients x {args.requests} streaming chat requests")
    figures: dict[str, Any] = {}
    for mode in modes:
        flags = ["--threads", str(args.threads), "--batching", mode, "--model-name", "bench"]
        flags += ["--max-batch", str(args.clients), "--timeout", "600"]
        server = Server(args.bundle, flags, Path("runs/bench-serve-chat") / f"{mode}.log")
        try:
            r = load(server, args, mode)
        finally:
            server.stop()
        figures[mode] = r
        batch = "rows per decoding step" if mode == "continuous" else "requests per batch"
        print(
            f"{mode:>10}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens in {r['wall_s']:.1f} s), "
            f"TTFT p50 {r['ttft_p50_ms']:.0f} ms p95 {r['ttft_p95_ms']:.0f} ms, "
            f"{r['mean_batch']:.1f} {batch}",
            flush=True,
        )
    if {"continuous", "static"} <= figures.keys():
        c, s = figures["continuous"], figures["static"]
        figures["ratio_tokens_per_s"] = c["tokens_per_s"] / s["tokens_per_s"]
        figures["ratio_ttft_p50"] = c["ttft_p50_ms"] / s["ttft_p50_ms"]
        print(
            f"continuous / static: {figures['ratio_tokens_per_s']:.2f}x tokens/s, "
            f"{figures['ratio_ttft_p50']:.2f}x p50 TTFT"
        )
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(argv, parse_args, run, None, figures=lambda r, a: a.json)


if __name__ == "__main__":
    main()
