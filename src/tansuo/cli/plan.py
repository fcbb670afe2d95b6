"""``tansuo plan``: fit scaling laws to a study and project quality, compute, time, memory and money."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tansuo.cli._app import console, setup_logging


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def plan(
    study: Annotated[Path, typer.Argument(help="a study folder of tansuo explore (its results.json)")],
    size: Annotated[
        str | None, typer.Option("--size", help="non-embedding parameters N of the model to plan: 10M, 1.5B")
    ] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="training tokens D: 1B, 300B")] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="training compute in FLOPs: the compute-optimal N and D")
    ] = None,
    target_loss: Annotated[
        float | None,
        typer.Option("--target-loss", help="the value of --metric to reach: the least compute that does"),
    ] = None,
    metric: Annotated[
        str, typer.Option("--metric", help="validation metric to fit: a loss, or accuracy-like (saturating)")
    ] = "loss",
    holdout: Annotated[
        str | None,
        typer.Option("--holdout", help="largest: also fit without the largest size and compare with it"),
    ] = None,
    hardware: Annotated[
        Path | None,
        typer.Option(
            "--hardware", help="a YAML of accelerators (default: the one shipped, tansuo/plan/hardware.yaml)"
        ),
    ] = None,
    accelerator: Annotated[
        list[str] | None, typer.Option("--accelerator", help="plan on this one (repeat); default: every one")
    ] = None,
    mfu: Annotated[
        float | None,
        typer.Option(
            "--mfu", min=0.0, max=1.0, help="model FLOP utilisation to assume (default: the study's)"
        ),
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="bf16 (autocast) or fp32")] = "bf16",
    world_size: Annotated[int, typer.Option("--world-size", min=1, help="devices training together")] = 8,
    micro_batch: Annotated[
        int | None, typer.Option("--micro-batch", min=1, help="sequences per device (default: the study's)")
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", min=1, help="tokens per sequence (default: the study's)")
    ] = None,
    layers: Annotated[int | None, typer.Option("--layers", min=1, help="fix the depth of the shape")] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="fix the width of the shape")] = None,
    request_tokens: Annotated[
        int, typer.Option("--request-tokens", min=1, help="tokens generated per inference request")
    ] = 256,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="bootstrap resamples")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="of the bootstrap")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for the plan (default: STUDY/plan)")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to a study's trials (Hoffmann et al. 2022, approach 3, with
    bootstrap intervals) and plan a larger run: the loss at --size and --tokens, the compute-optimal N and D
    of a --budget, the compute that reaches --target-loss; its time and money on each accelerator at the
    study's MFU, memory per device under DDP and FSDP, and the cost of 1,000 inference requests. Writes
    plan.md, plan.json and report.html."""
    setup_logging(verbose)
    from tansuo.plan import PlanError, PlanOptions, parse_count, plan_study

    if holdout not in (None, "largest"):
        raise PlanError(f"--holdout {holdout!r}: the one backtest is 'largest'")
    if precision not in ("bf16", "fp32"):
        raise PlanError(f"--precision {precision!r}: choose bf16 or fp32")
    options = PlanOptions(
        metric=metric,
        size=parse_count(size, "--size"),
        tokens=parse_count(tokens, "--tokens"),
        budget=parse_count(budget, "--budget"),
        target=target_loss,
        hardware=hardware,
        accelerators=list(accelerator or []),
        mfu=mfu,
        precision=precision,
        world_size=world_size,
        micro_batch=micro_batch,
        context=context,
        layers=layers,
        width=width,
        request_tokens=request_tokens,
        holdout=holdout,
        bootstrap=bootstrap,
        seed=seed,
    )
    result, paths = plan_study(study, options, out)
    _print(result)
    _say(f"wrote {paths['md']}, {paths['json'].name} and {paths['html'].name}")


def _print(plan: dict[str, Any]) -> None:
    from tansuo.plan.report import duration, exponents_note, gb, interval, law_text, si

    fit = plan["fit"]
    _say(f"{plan['metric']} = {law_text(fit['law'], fit['form'], fit['ceiling'])}")
    _say(f"{len(plan['points'])} trials, {fit['bootstrap']} bootstrap resamples: {fit['verdict']}")
    _say(exponents_note(plan))
    if plan.get("holdout"):
        h = plan["holdout"]
        t = h["headline"]
        inside = "inside" if t["covered"] else "OUTSIDE"
        _say(
            f"backtest without N = {si(h['held_out'])}: trial {t['trial']} (D = {si(t['tokens'])}) predicted "
            f"{t['value']:.4f} [{t['pi_low']:.4f}, {t['pi_high']:.4f}], measured {t['measured']:.4f}: "
            f"{100 * t['error']:+.2f}%, {inside} the 95% prediction interval; mean |error| over the size "
            f"{100 * h['mean_abs_error']:.2f}%"
        )
    if plan.get("optimal"):
        o = plan["optimal"]
        _say(
            f"compute-optimal at {o['budget']:.3g} FLOPs: N = {si(o['params'])}, D = {si(o['tokens'])} "
            f"({o['tokens_per_param']:.1f} per parameter), {plan['metric']} {interval(o['predicted'])}"
        )
    if plan.get("target"):
        t = plan["target"]
        if t.get("flops") is None:
            _say(f"{plan['metric']} {t['target']:g}: {t['why']}")
        else:
            _say(
                f"{plan['metric']} {t['target']:g} takes {t['flops']:.3g} FLOPs: N = {si(t['params'])}, "
                f"D = {si(t['tokens'])}"
            )
    m = plan["mfu"]
    used = "none given or measured" if m["value"] is None else f"{100 * m['value']:.1f}%"
    _say(f"MFU: {used} ({m['source']})")
    for s in plan["scenarios"]:
        sh = s["shape"]
        _say("")
        head = f"N {si(s['params'])}, D {si(s['tokens'])} ({s['why']})"
        _say(f"{head}: {plan['metric']} {interval(s['predicted'])}")
        _say(
            f"  {sh['describe']}, context {sh['context']}; {s['flops']:.3g} training FLOPs; "
            f"{s['world_size']} devices, micro-batch {s['micro_batch']}"
        )
        for h in s["hardware"]:
            mem = ", ".join(
                f"{r['strategy'].upper()}{' + ckpt' if r['checkpointing'] else ''} {gb(r['total'])}"
                f"{'' if r.get('fits') else ' (does not fit)'}"
                for r in h["memory"]
            )
            inf = h.get("inference")
            cost = "" if h.get("cost") is None else f", cost {h['cost']:.4g}"
            per_k = "" if not inf else f"; 1,000 requests {inf['cost_per_1000']:.3g}"
            _say(
                f"  {h['name']} ({h['precision']}): {duration(h.get('hours'))}{cost}; per device {mem}{per_k}"
            )
