"""A made-up scaling study: results.json as ``tansuo explore`` writes it, with trials whose loss follows a
known law (times log-normal noise), on real GPT configs so N, FLOPs and shapes are the models' own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from tansuo.models import create_model
from tansuo.plan.fit import Law

#: a law of the shape and size a character-level study gives
TRUE = Law(E=1.2, A=40.0, B=60.0, alpha=0.35, beta=0.3)
#: (layers, heads, width) of GPT sizes from 12K to about 1.5M non-embedding parameters
SIZES = [(1, 1, 32), (2, 2, 32), (3, 3, 48), (4, 4, 64), (4, 4, 96), (4, 4, 128), (5, 5, 160)]
BUDGETS = [100_000, 300_000, 1_000_000, 3_000_000]
CONTEXT, BATCH = 64, 12
BLOCKS = {"positions": "rotary", "mlp": "swiglu", "norm": "rmsnorm", "dropout": 0.0}


def gpt_config(layers: int, heads: int, width: int) -> dict[str, Any]:
    model = create_model(
        "gpt_char_small", num_layers=layers, num_heads=heads, embed_dim=width, max_seq_len=CONTEXT, **BLOCKS
    )
    return dataclasses.asdict(model.config)


def synthetic_results(
    law: Law = TRUE,
    sizes: list[tuple[int, int, int]] = SIZES,
    budgets: list[int] = BUDGETS,
    noise: float = 0.003,
    seed: int = 0,
    metric: str = "loss",
    transform: Any = None,
) -> dict[str, Any]:
    """results.json of a grid study whose ``metric`` is ``law(N, D)`` with noise (``transform`` maps it to
    the recorded value: accuracy = 1 - law, say)."""
    rng = np.random.default_rng(seed)
    trials, variants, number = [], [], 0
    for layers, heads, width in sizes:
        model = create_model(
            "gpt_char_small",
            num_layers=layers,
            num_heads=heads,
            embed_dim=width,
            max_seq_len=CONTEXT,
            **BLOCKS,
        )
        n = model.num_params(exclude_embeddings=True)
        per_token = model.flops_per_token(CONTEXT)
        for d in budgets:
            value = float(law(n, d) * np.exp(rng.normal(0, noise)))
            if transform is not None:
                value = transform(value)
            seconds = per_token * d / (0.4 * 1.2e11)
            record = {
                "model": "gpt_char_small",
                "family": "gpt",
                "config": dataclasses.asdict(model.config),
                "params": n,
                "params_total": sum(p.numel() for p in model.parameters()),
                "context": CONTEXT,
                "flops_per_token": per_token,
                "tokens": d,
                "tokens_trained": d,
                "unit": "tokens",
                "flops": per_token * d,
                "flops_trained": per_token * d,
                "steps": d // (BATCH * CONTEXT),
                "best_step": d // (BATCH * CONTEXT),
                "step_seconds": seconds,
                "wall_seconds": seconds * 1.1,
                "world": 1,
                "peak_flops": 1.2e11,
                "peak_source": "measured: best of 5 rounds of square torch.mm, fp32, 2 thread(s), cpu",
                "mfu": 0.4,
                "val": {metric: value},
            }
            settings = {
                "candidate": f"gpt-{n}",
                "model": "gpt_char_small",
                "overrides": {"num_layers": layers},
                "train": {"max_steps": record["steps"], "batch_size": BATCH},
            }
            trials.append(
                {
                    "number": number,
                    "state": "complete",
                    "candidate": f"gpt-{n}",
                    "settings": settings,
                    "scaling": record,
                }
            )
            latency = 1000 * (per_token / 3) / (0.05 * 1.2e11)  # ms per decoded token at 5% of the peak
            variants.append(
                {
                    "trial": number,
                    "variant": "plain",
                    "steps": [],
                    "status": "ok",
                    "figures": {"latency_ms_p50": latency, "threads": 2},
                }
            )
            number += 1
    return {"study": "synthetic", "task": "lm", "trials": trials, "variants": variants}


def write_study(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder
