"""Training compute of a run: parameters N, tokens D, FLOPs, and model FLOP utilisation against a matmul peak.

What scaling laws are fitted to (``tansuo plan``) and what ``tansuo explore`` records for every trial whose
model declares ``flops_per_token(context)`` (GPT, BERT, the encoder-decoder)::

    N      non-embedding parameters (``num_params(exclude_embeddings=True)``), Kaplan et al. 2020's
           convention: embeddings are lookups, not multiply-adds, and leaving them out gives cleaner laws
           at small sizes (Hoffmann et al. 2022 count all parameters; at the sizes they fit the difference is
           a few percent). ``params_total`` is recorded beside it.
    D      units trained on (``Task.count`` summed over every step, all processes): tokens for lm and mlm,
           target tokens for translate
    FLOPs  ``D * model.flops_per_token(T)``: 6 N D plus attention (Kaplan's ``6 L T d_attn`` per token for a
           causal decoder) and a tied head's ``6 V C``; each family's docstring derives its own
    MFU    FLOPs / (seconds in training steps x peak x processes): the share of the peak the run achieved

The peak is a measured one, as bench/train_throughput.py measures it: the best FLOP/s of square
``torch.mm`` in the dtype training runs in (fp32 on a CPU, bf16 on CUDA) at the current thread count, once
per process and device. MFU is therefore relative to what this machine's matmul achieves, not to a
datasheet figure (``tansuo plan`` takes datasheet peaks from its hardware file for other machines).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_PEAKS: dict[tuple[str, int], float] = {}


def matmul_peak(device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of ``n x n`` matmuls (fp32 on a CPU, bf16 on CUDA) over ``repeats`` rounds of about a
    quarter of a second each; ``n`` defaults to 1024 on a CPU, 8192 on CUDA."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda *_: None)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    flops = 2 * n**3
    torch.mm(a, b, out=out)  # warm-up: kernel selection, thread pool start
    sync(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    sync(device)
    inner = max(1, min(200, int(0.25 / max(time.perf_counter() - start, 1e-9))))
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, inner * flops / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device | str) -> dict[str, Any]:
    """The matmul peak of ``device`` at the current thread count, measured once per process:
    ``{"flops": FLOP/s, "dtype", "threads", "source"}``."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    key = (str(device), threads)
    if key not in _PEAKS:
        _PEAKS[key] = matmul_peak(device)
        log.info("matmul peak on %s at %d threads: %.1f GFLOP/s", device, threads, _PEAKS[key] / 1e9)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    return {
        "flops": _PEAKS[key],
        "dtype": dtype,
        "threads": threads,
        "source": f"measured: best of 5 rounds of square torch.mm, {dtype}, {threads} thread(s), {device}",
    }


def end_event(run_dir: Path) -> dict[str, Any]:
    """The last ``end`` event of a run folder's metrics.jsonl (units trained, seconds in steps), or {}."""
    path = Path(run_dir) / "metrics.jsonl"
    found: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            if event.get("event") == "end":
                found = event
    return found


def model_shape(model: nn.Module, context: int | None) -> dict[str, Any]:
    """N, all parameters, the context the FLOPs are counted at and FLOPs per trained token (None when the
    family does not declare ``flops_per_token``)."""
    cfg = getattr(model, "config", None)
    total = sum(p.numel() for p in model.parameters())
    try:
        n = int(model.num_params(exclude_embeddings=True))
    except (AttributeError, TypeError):  # a family without the switch: every parameter counts
        n = total
    context = context or getattr(cfg, "max_seq_len", None)
    per_token = getattr(model, "flops_per_token", None)
    return {
        "params": n,
        "params_total": total,
        "context": context,
        "flops_per_token": int(per_token(context)) if per_token and context else None,
    }


def training_record(
    bundle: Path, run_dir: Path, *, wall_seconds: float, peak: dict[str, Any], world: int = 1
) -> dict[str, Any] | None:
    """What a scaling law needs of one training run: N, D, FLOPs, MFU, seconds and the held-back figures.

    Args:
        bundle: the run's best bundle (its config.json, task.json and metrics.json are read; the model is
            built on the meta device, no weights loaded).
        run_dir: the run folder whose metrics.jsonl has the trainer's ``end`` event.
        wall_seconds: the run's wall time (data preparation, evaluation and checkpoints included).
        peak: :func:`peak_flops` of the device it trained on.
        world: processes that trained it (MFU is per process).

    Returns:
        The record, or None when the run has no ``end`` event (it did not finish).
    """
    from tansuo.models import create_model
    from tansuo.tasks import get_task

    end = end_event(run_dir)
    if not end:
        return None
    bundle = Path(bundle)
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    info = json.loads((bundle / "task.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        model = create_model(config["model_name"], **config["config"])
    task = get_task(info["task"]).from_bundle(bundle)
    context_of = getattr(task, "context_length", None)
    shape = model_shape(model, context_of() if context_of else None)
    metrics = json.loads((bundle / "metrics.json").read_text(encoding="utf-8"))
    units = int(end.get("units_trained") or 0)
    steps = int(end.get("steps_trained") or 0)
    best = metrics.get("step")
    # the bundle is the best evaluation's weights: the tokens it had seen (all of them when the run evaluates
    # only at its end, as a scaling study should: each budget's own schedule, ending at its last step)
    tokens = units if not steps or not best or best >= steps else round(units * best / steps)
    seconds = float(end.get("step_seconds") or 0.0)
    flops = None if shape["flops_per_token"] is None else shape["flops_per_token"] * units
    mfu = None
    if flops is not None and seconds > 0 and peak.get("flops"):
        mfu = flops / (seconds * peak["flops"] * world)
    val = {k: v for k, v in (metrics.get("val") or {}).items() if isinstance(v, int | float)}
    return {
        "model": config["model_name"],
        "family": getattr(model, "family", None),
        "config": config["config"],
        **shape,
        "tokens": tokens,
        "tokens_trained": units,
        "unit": task.unit,
        "flops": None if flops is None else flops * tokens // max(units, 1),
        "flops_trained": flops,
        "steps": steps,
        "best_step": best,
        "step_seconds": seconds,
        "wall_seconds": wall_seconds,
        "world": world,
        "peak_flops": peak.get("flops"),
        "peak_source": peak.get("source"),
        "mfu": mfu,
        "val": val,
    }
