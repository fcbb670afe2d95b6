"""llama.cpp's side of ``bench/generate.py``: run by the Python of llama-cpp-python's own virtual environment
(``make llamacpp``), never imports tansuo or torch. Reads the variant's spec (JSON) from ``--worker`` and
prints one JSON line: time to first token, decode tokens/s (greedy, the same prompt token ids as every other
variant), perplexity on the same windows, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import numpy as np
from llama_cpp import Llama


def timed(llm: Llama, prompt: list[int], new: int) -> tuple[float, float]:
    llm.reset()
    stamps = []
    start = time.perf_counter()
    for _token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new:
            break
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def perplexity(llm: Llama, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # (T - 1, V)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    spec = json.loads(p.parse_args().worker)
    n_ctx = max(len(spec["prompt"]) + spec["new_tokens"], max(len(w) for w in spec["windows"])) + 8
    llm = Llama(
        spec["gguf"],
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        logits_all=True,
        verbose=False,
    )
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed(llm, spec["prompt"], 8)
    samples = [timed(llm, spec["prompt"], spec["new_tokens"]) for _ in range(spec["reps"])]
    ppl = perplexity(llm, spec["windows"])
    print(
        json.dumps(
            {
                "ttft_ms": 1000 * statistics.median(s[0] for s in samples),
                "decode_tps": statistics.median(s[1] for s in samples),
                "perplexity": ppl,
                "rss_loaded_mb": loaded,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
