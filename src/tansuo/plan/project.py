"""A plan from a study: the fitted law, its backtest, and what a named size, budget or target would take.

:func:`make_plan` is what ``tansuo plan`` runs: read the study's trials (:mod:`points`), fit the law with
bootstrap intervals (:mod:`fit`), optionally refit without the largest size and compare (``holdout``), then
for each scenario asked for (a size and token count, a compute budget, a target loss; the study's own
largest trial when none is) project the model's shape (:mod:`shape`), its training FLOPs, time and money on
each accelerator (:mod:`hardware`) at the study's measured MFU or a given one, memory per device under DDP
and FSDP (:mod:`memory`), and the cost of inference. Everything goes into one JSON-able mapping.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tansuo.plan.fit import CHINCHILLA, Fit, fit_study
from tansuo.plan.hardware import Accelerator, load_hardware, pick
from tansuo.plan.memory import activation_parts, training_memory
from tansuo.plan.points import PlanError, Point, check_enough, read_results, study_points
from tansuo.plan.shape import Shape, project

log = logging.getLogger(__name__)


@dataclass
class PlanOptions:
    """What ``tansuo plan`` is asked (None: not asked)."""

    metric: str = "loss"
    size: float | None = None  # N, non-embedding parameters
    tokens: float | None = None  # D
    budget: float | None = None  # training FLOPs
    target: float | None = None  # the metric to reach
    hardware: Path | None = None  # a hardware YAML; None: the shipped one
    accelerators: list[str] = field(default_factory=list)  # names; empty: all in the file
    mfu: float | None = None  # None: the study's measured MFU
    precision: str = "bf16"
    world_size: int = 8
    micro_batch: int | None = None  # None: the study's batch size
    context: int | None = None  # None: the study's context
    layers: int | None = None
    width: int | None = None
    request_tokens: int = 256  # tokens generated per inference request
    holdout: str | None = None  # "largest": fit without the largest size and compare
    bootstrap: int = 200
    seed: int = 0


def _points_table(fit: Fit, points: list[Point]) -> list[dict[str, Any]]:
    fitted = fit.fitted
    return [
        {
            "trial": p.trial,
            "candidate": p.candidate,
            "params": p.params,
            "tokens": p.tokens,
            "flops": p.record.get("flops"),
            "mfu": p.record.get("mfu"),
            "seconds": p.record.get("wall_seconds"),
            "measured": p.value,
            "fitted": float(f),
            "residual": float(p.value / f - 1),
        }
        for p, f in zip(points, fitted, strict=True)
    ]


def _fit_summary(fit: Fit) -> dict[str, Any]:
    good, verdict = fit.quality()
    intervals = {k: fit.spread(lambda law, k=k: getattr(law, k)) for k in ("E", "A", "B", "alpha", "beta")}
    return {
        "law": fit.law.as_dict(),
        "intervals": intervals,
        "form": fit.form,
        "ceiling": fit.ceiling,
        "r2": fit.r2,
        "good": good,
        "verdict": verdict,
        "objective": fit.objective,
        "bootstrap": len(fit.replicates),
        "chinchilla": CHINCHILLA,
    }


def _fit(points: list[Point], options: PlanOptions, direction: str) -> Fit:
    n = [p.params for p in points]
    d = [p.tokens for p in points]
    y = [p.value for p in points]
    try:
        return fit_study(
            n,
            d,
            y,
            metric=options.metric,
            direction=direction,
            bootstrap=options.bootstrap,
            seed=options.seed,
        )
    except ValueError as e:
        raise PlanError(f"cannot fit {options.metric}: {e}") from None


def holdout_largest(points: list[Point], options: PlanOptions, direction: str) -> dict[str, Any]:
    """Fit without the largest size; its trials' predictions against what they measured."""
    largest = max(p.params for p in points)
    rest = [p for p in points if p.params < largest]
    check_enough(rest, "the study without its largest size")
    fit = _fit(rest, options, direction)
    rows = []
    for p in sorted((p for p in points if p.params == largest), key=lambda p: p.tokens):
        pred = fit.predict_interval(p.params, p.tokens)
        rows.append(
            {
                "trial": p.trial,
                "candidate": p.candidate,
                "params": p.params,
                "tokens": p.tokens,
                "measured": p.value,
                **pred,
                "error": pred["value"] / p.value - 1,
                "covered": pred["pi_low"] <= p.value <= pred["pi_high"],
            }
        )
    headline = max(rows, key=lambda r: r["tokens"])  # the largest trial: most parameters and tokens
    return {
        "held_out": largest,
        "fit": _fit_summary(fit),
        "trials": rows,
        "headline": headline,
        "mean_abs_error": float(np.mean([abs(r["error"]) for r in rows])),
    }


def _study_mfu(points: list[Point]) -> tuple[float | None, str]:
    largest = max(p.params for p in points)
    values = [p.record["mfu"] for p in points if p.params == largest and p.record.get("mfu")]
    if not values:
        return None, "not recorded"
    rec = next(p.record for p in points if p.params == largest)
    source = (
        f"measured: median over the {len(values)} trials of the largest size ({largest:,} parameters), "
        f"against {rec.get('peak_source') or 'a matmul peak'}"
    )
    if "cpu" in str(rec.get("peak_source", "")).lower():
        source += (
            "; small models on a CPU: larger models on GPUs usually reach 30-50% in bf16, so for them give "
            "--mfu"
        )
    return statistics.median(values), source


def _scenarios(fit: Fit, points: list[Point], options: PlanOptions) -> list[dict[str, Any]]:
    """(name, N, D) pairs to plan: as asked, or the study's largest trial."""
    law, out = fit.law, []
    one_axis = bool(options.size) != bool(options.tokens)
    if (one_axis or options.budget or options.target is not None) and min(law.alpha, law.beta) <= 0:
        raise PlanError(
            f"the fitted law has a flat exponent (alpha {law.alpha:.3g}, beta {law.beta:.3g}): it has no "
            "compute-optimal allocation; give both --size and --tokens, or a study that varies both"
        )
    if options.size or options.tokens:
        n, d = options.size, options.tokens
        if n and not d:  # the token count for which n is compute-optimal
            c = 6 * (n / law.G) ** ((law.alpha + law.beta) / law.beta)
            d, why = c / 6 / n, "tokens: compute-optimal for this size"
        elif d and not n:
            c = 6 * (d * law.G) ** ((law.alpha + law.beta) / law.alpha)
            n, why = c / 6 / d, "size: compute-optimal for these tokens"
        else:
            why = "as asked"
        out.append({"name": "asked", "params": n, "tokens": d, "why": why})
    if options.budget:
        n, d = law.optimal(options.budget)
        out.append(
            {"name": "budget", "params": n, "tokens": d, "why": f"compute-optimal at {options.budget:.3g}"}
        )
    if options.target is not None:
        metric_target = options.target
        law_target = metric_target if fit.form == "loss" else fit.ceiling - metric_target
        flops = law.flops_for(law_target)
        if flops is not None:
            n, d = law.optimal(flops)
            out.append(
                {"name": "target", "params": n, "tokens": d, "why": f"cheapest to reach {metric_target:g}"}
            )
    if not out:
        top = max(points, key=lambda p: (p.params, p.tokens))
        out.append(
            {"name": "study", "params": top.params, "tokens": top.tokens, "why": "the study's largest trial"}
        )
    return out


def _inference(shape: Shape, ref: Point, acc: Accelerator, options: PlanOptions) -> dict[str, Any] | None:
    """Batch-1 decoding: the study's measured latency per token scaled by forward FLOPs, on the study's
    machine and, at the share of peak the study's machine achieved, on ``acc``."""
    rec = ref.record
    if ref.latency_ms is None or not rec.get("flops_per_token") or not shape.flops_per_token:
        return None
    forward_ref, forward = rec["flops_per_token"] / 3, shape.flops_per_token / 3  # training = 3 forwards
    efficiency = forward_ref / (ref.latency_ms / 1e3) / rec["peak_flops"]
    here_s = ref.latency_ms / 1e3 * forward / forward_ref
    peak, _ = acc.peak(options.precision)
    per_token = forward / (peak * efficiency)
    request = per_token * options.request_tokens
    return {
        "study_ms_per_token": here_s * 1e3,
        "efficiency": efficiency,
        "ms_per_token": per_token * 1e3,
        "seconds_per_request": request,
        "cost_per_1000": 1000 * request / 3600 * acc.price_per_hour,
    }


def _plan_scenario(
    s: dict[str, Any],
    fit: Fit,
    ref: Point,
    accs: list[Accelerator],
    options: PlanOptions,
    mfu: float | None,
    batch: int,
) -> dict[str, Any]:
    """The shape, FLOPs, time, money, memory and inference of one (N, D); ``ref`` is the trial whose
    architecture is scaled and whose latency is carried over (the study's largest)."""
    rec = ref.record
    context = options.context or int(rec.get("context") or 0)
    shape = project(
        rec["model"], rec["config"], s["params"], context, layers=options.layers, width=options.width
    )
    n, d = shape.params if (options.layers or options.width) else s["params"], s["tokens"]
    flops = d * shape.flops_per_token if shape.flops_per_token else 6 * n * d
    out = {
        **s,
        "params": n,
        "predicted": fit.predict_interval(n, d),
        "shape": {
            "model": shape.model,
            "describe": shape.describe(),
            "params": shape.params,
            "params_total": shape.params_total,
            "layers": shape.layers,
            "width": shape.width,
            "context": shape.context,
            "config": shape.config,
        },
        "flops": flops,
        "flops_6nd": 6 * n * d,
        "micro_batch": batch,
        "world_size": options.world_size,
        "hardware": [],
    }
    parts = activation_parts(shape, batch, options.precision)
    for acc in accs:
        peak, precision = acc.peak(options.precision)
        row: dict[str, Any] = {"name": acc.name, "precision": precision, "peak_flops": peak, "mfu": mfu}
        if mfu:
            seconds = flops / (peak * mfu * options.world_size)
            row.update(hours=seconds / 3600, cost=seconds / 3600 * options.world_size * acc.price_per_hour)
        used = parts if precision == options.precision else activation_parts(shape, batch, precision)
        row["memory"] = training_memory(
            shape,
            batch=batch,
            world=options.world_size,
            precision=precision,
            device_gb=acc.memory_gb,
            parts=used,
        )
        row["inference"] = _inference(shape, ref, acc, options)
        row["price_per_hour"], row["memory_gb"] = acc.price_per_hour, acc.memory_gb
        out["hardware"].append(row)
    return out


def make_plan(study: str | Path, options: PlanOptions) -> dict[str, Any]:
    """Everything ``tansuo plan`` reports, as one JSON-able mapping (see the module docstring).

    Raises:
        PlanError: No results, too few trials, an unknown metric or accelerator, a bad hardware file.
    """
    from tansuo.train.trainer import metric_mode

    results = read_results(Path(study))
    accs = pick(load_hardware(options.hardware), options.accelerators)
    points = study_points(results, options.metric)
    check_enough(points)
    direction = "minimize" if metric_mode(options.metric) == "min" else "maximize"
    fit = _fit(points, options, direction)
    measured_mfu, mfu_source = _study_mfu(points)
    mfu = options.mfu if options.mfu is not None else measured_mfu
    if options.mfu is not None:
        mfu_source = "given (--mfu)"
    ref = max(points, key=lambda p: (p.params, p.tokens))
    batch = options.micro_batch or _batch_size(results, ref.trial) or 8  # the study's, by default
    plan: dict[str, Any] = {
        "study": str(study),
        "task": results.get("task"),
        "metric": options.metric,
        "direction": direction,
        "unit": points[0].record.get("unit", "tokens"),
        "points": _points_table(fit, points),
        "fit": _fit_summary(fit),
        "holdout": holdout_largest(points, options, direction) if options.holdout == "largest" else None,
        "mfu": {"value": mfu, "source": mfu_source, "measured": measured_mfu},
        "precision": options.precision,
        "hardware_file": str(options.hardware) if options.hardware else "shipped (tansuo/plan/hardware.yaml)",
        "accelerators": [a.model_dump() for a in accs],
        "request_tokens": options.request_tokens,
    }
    scenarios = _scenarios(fit, points, options)  # first: it refuses a law without an optimum
    if options.budget:
        plan["optimal"] = _optimal(fit, options.budget)
    if options.target is not None:
        plan["target"] = _target(fit, options.target)
    plan["scenarios"] = [_plan_scenario(s, fit, ref, accs, options, mfu, batch) for s in scenarios]
    return plan


def _batch_size(results: dict[str, Any], trial: int) -> int | None:
    for t in results.get("trials", []):
        if t["number"] == trial:
            return ((t.get("settings") or {}).get("train") or {}).get("batch_size")
    return None


def _optimal(fit: Fit, budget: float) -> dict[str, Any]:
    n, d = fit.law.optimal(budget)
    return {
        "budget": budget,
        "params": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "predicted": fit.predict_interval(n, d),
        "params_interval": fit.spread(lambda law: law.optimal(budget)[0]),
        "tokens_interval": fit.spread(lambda law: law.optimal(budget)[1]),
        "exponents": {
            "a": fit.law.beta / (fit.law.alpha + fit.law.beta),
            "b": fit.law.alpha / (fit.law.alpha + fit.law.beta),
        },
    }


def _target(fit: Fit, target: float) -> dict[str, Any]:
    law_target = target if fit.form == "loss" else fit.ceiling - target
    flops = fit.law.flops_for(law_target)
    out: dict[str, Any] = {"target": target, "flops": flops}
    if flops is None:
        limit = fit.law.E if fit.form == "loss" else fit.ceiling - fit.law.E
        name = "E" if fit.form == "loss" else "ceiling - E"
        out["why"] = (
            f"unreachable: the law levels off at {limit:.4g} ({name}); "
            "no amount of compute gets there on this data and architecture"
        )
        return out
    n, d = fit.law.optimal(flops)
    out.update(
        params=n,
        tokens=d,
        flops_interval=fit.spread(lambda law: law.flops_for(law_target)),
    )
    if math.isfinite(flops):
        out["tokens_per_param"] = d / n
    return out


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | float | None, option: str) -> float | None:
    """``"10M"``, ``"1.5B"``, ``"350k"``, ``"2T"`` or ``"1e18"`` as a number; None stays None.

    Raises:
        PlanError: Not a positive number with an optional K / M / B (G) / T suffix, naming ``option``.
    """
    if text is None:
        return None
    raw = str(text).strip().replace("_", "").replace(",", "")
    scale = _SUFFIXES.get(raw[-1:].lower(), 1.0)
    number = raw[:-1] if scale != 1.0 else raw
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"{option} {text!r}: expected a positive number such as 10M, 1.5B, 350K, 2T or 1e18")
    return value


def plan_study(study: str | Path, options: PlanOptions, out: str | Path | None = None) -> tuple[dict, dict]:
    """:func:`make_plan`, written to ``out`` (default ``STUDY/plan``): plan.json, plan.md, report.html.
    Returns the plan and the paths written."""
    from tansuo.plan.report import write_plan

    plan = make_plan(study, options)
    folder = Path(out) if out is not None else Path(study) / "plan"
    return plan, write_plan(plan, folder)
