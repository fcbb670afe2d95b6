"""Explore test helpers: explore recipes on the tiny synthetic images, and studies with made-up records
(for the results, report and browser tests, which need no training)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tansuo.explore.pareto import feasible, violations
from tansuo.explore.schema import ExploreSpec, load_explore


def explore_raw(npz: Path, study: Path, **explore: Any) -> dict[str, Any]:
    """An explore recipe on the synthetic bars: vit_test (two widths) against resnet_test."""
    return {
        "task": "image",
        "seed": 3,
        "data": {"source": "npz", "path": str(npz), "max_shift": 1},
        "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "log_every": 5, "threads": 1},
        "explore": {
            "study": str(study),
            "candidates": [{"model": "vit_test", "space": {"embed_dim": [8, 16]}}, {"model": "resnet_test"}],
            "variants": [
                {"name": "plain"},
                {"name": "int8", "steps": [{"step": "quantize", "backend": "torch"}]},
            ],
            "objectives": ["quality", "latency"],
            "sampler": "grid",
            "measure": {"threads": 1, "reps": 10},
            **explore,
        },
    }


def spec_for(tmp_path: Path, **explore: Any) -> ExploreSpec:
    raw = explore_raw(tmp_path / "bars.npz", tmp_path / "study", **explore)
    return load_explore(raw, "test.yaml")


def figures(quality: float, latency: float, size_mb: float) -> dict[str, Any]:
    return {
        "quality": quality,
        "metric": "accuracy",
        "split": "test",
        "latency_ms_p50": latency,
        "latency_ms_p95": latency * 1.2,
        "latency_spread": 0.2,
        "size_bytes": int(size_mb * 1e6),
        "params": int(size_mb * 2.5e5),
        "peak_rss_mb": 200.0,
        "threads": 1,
        "train_seconds": 10.0,
    }


def record(
    spec: ExploreSpec, candidate: str, overrides: dict, variants: dict[str, tuple], bundle: Path
) -> dict:
    """A trial record as run_trial writes it, with made-up measurements (quality, latency ms, size MB)."""
    out = []
    for name, triple in variants.items():
        f = figures(*triple)
        out.append(
            {
                "name": name,
                "steps": [] if name == "plain" else [name],
                "status": "ok",
                "path": str(bundle),
                "figures": f,
                "violations": violations(f, spec.constraints),
                "feasible": feasible(f, spec.constraints),
                "compress_seconds": 0.0,
            }
        )
    settings = {"candidate": candidate, "model": candidate, "overrides": overrides, "train": {}}
    curves = {"train_loss": [[5, 1.0], [10, 0.5]], "val_accuracy": [[10, 0.8], [20, 0.9]]}
    family = spec.families[candidate]
    return {
        "settings": settings,
        "family": family,
        "train_seconds": 5.0,
        "bundle": str(bundle),
        "variants": out,
        "curves": curves,
    }


def fake_study(spec: ExploreSpec, bundle: Path) -> Any:
    """An in-memory study with two complete trials of made-up figures and one failed trial."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(directions=["maximize", "minimize"], study_name="fake")
    dist = {"candidate": CategoricalDistribution(["vit_test", "resnet_test"])}
    records = [
        record(
            spec, "vit_test", {"embed_dim": 8}, {"plain": (0.90, 2.0, 0.5), "int8": (0.89, 1.0, 0.2)}, bundle
        ),
        record(spec, "resnet_test", {}, {"plain": (0.95, 3.0, 1.0), "int8": (0.80, 2.5, 0.4)}, bundle),
    ]
    for r in records:
        study.add_trial(
            create_trial(
                params={"candidate": r["settings"]["candidate"]},
                distributions=dist,
                values=[0.9, 1.0],
                user_attrs={"record": copy.deepcopy(r), "host": "here"},
            )
        )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"candidate": "vit_test"},
            distributions=dist,
            user_attrs={"fail_reason": "NaN loss: loss became nan at step 3"},
        )
    )
    return study
