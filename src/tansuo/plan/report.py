"""A plan written down: ``plan.json`` (the mapping :func:`tansuo.plan.project.make_plan` returns),
``plan.md`` (tables) and ``report.html`` (one self-contained page: the tables and inline SVG charts of
:mod:`tansuo.plan.plots`, no network)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from tansuo.atomic import atomic_write_json, atomic_write_text
from tansuo.plan.fit import Law
from tansuo.plan.plots import PALETTE, chart, legend


def write_plan(plan: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write plan.json, plan.md and report.html into ``out``; returns their paths."""
    out = Path(out)
    paths = {"json": out / "plan.json", "md": out / "plan.md", "html": out / "report.html"}
    atomic_write_json(paths["json"], plan)
    atomic_write_text(paths["md"], markdown(plan))
    atomic_write_text(paths["html"], render_html(plan))
    return paths


# ------------------------------------------------------------------------------------------ numbers
def si(v: float | None, unit: str = "") -> str:
    """1.5e9 -> "1.50B" (K, M, B, T, then powers of ten)."""
    if v is None:
        return "-"
    for scale, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{name}{unit}" if abs(v) < 1e3 * scale else f"{v:.3g}{unit}"
    return f"{v:.3g}{unit}"


def duration(hours: float | None) -> str:
    if hours is None:
        return "-"
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def gb(v: float) -> str:
    return f"{v / 1e9:.3g} GB"


def interval(p: dict[str, float]) -> str:
    return (
        f"{p['value']:.4f} (95% CI {p['low']:.4f}-{p['high']:.4f}; PI {p['pi_low']:.4f}-{p['pi_high']:.4f})"
    )


def law_text(law: dict[str, float], form: str, ceiling: float) -> str:
    core = f"{law['E']:.4g} + {law['A']:.4g} / N^{law['alpha']:.3f} + {law['B']:.4g} / D^{law['beta']:.3f}"
    return core if form == "loss" else f"{ceiling:g} - ({core})"


def exponents_note(plan: dict[str, Any]) -> str:
    law, ch = plan["fit"]["law"], plan["fit"]["chinchilla"]
    iv = plan["fit"]["intervals"]

    def ci(k: str) -> str:
        return f" (95% CI {iv[k][0]:.3f}-{iv[k][1]:.3f})" if iv.get(k) else ""

    return (
        f"alpha = {law['alpha']:.3f}{ci('alpha')}, beta = {law['beta']:.3f}{ci('beta')}; Chinchilla "
        f"(Hoffmann et al. 2022): alpha = {ch['alpha']}, beta = {ch['beta']}. Theirs is fitted on "
        "70M-16B-parameter models of web text with a 32K-token vocabulary, this one on the study's own "
        "data, tokenizer and sizes: the exponents describe this study, not language models in general."
    )


# ------------------------------------------------------------------------------------------ markdown
def markdown(plan: dict[str, Any]) -> str:
    fit, metric = plan["fit"], plan["metric"]
    lines = [
        f"# Scaling plan: {plan['study']}",
        "",
        f"Task {plan['task']}, metric {metric} ({plan['direction']}d) on the validation split; N = "
        f"non-embedding parameters, D = {plan['unit']} trained on.",
        "",
        "## The law",
        "",
        f"{metric} = {law_text(fit['law'], fit['form'], fit['ceiling'])}",
        "",
        f"Fitted to {len(plan['points'])} trials (Hoffmann et al. 2022 approach 3: Huber loss on log "
        f"residuals, L-BFGS from a grid of starts; {fit['bootstrap']} bootstrap resamples of the trials): "
        f"{fit['verdict']}.",
        "",
        exponents_note(plan),
        "",
        "| trial | model | N | D | FLOPs | MFU | measured | fitted | residual |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plan["points"]:
        mfu = f"{100 * p['mfu']:.1f}%" if p.get("mfu") else "-"
        lines.append(
            f"| {p['trial']} | {p['candidate']} | {si(p['params'])} | {si(p['tokens'])} | {si(p['flops'])} | "
            f"{mfu} | {p['measured']:.4f} | {p['fitted']:.4f} | {100 * p['residual']:+.2f}% |"
        )
    if plan.get("holdout"):
        lines += ["", *_holdout_md(plan)]
    if plan.get("optimal"):
        o = plan["optimal"]
        lines += [
            "",
            f"## Compute-optimal at {o['budget']:.3g} FLOPs",
            "",
            f"N = {si(o['params'])}{_range(o['params_interval'])}, D = {si(o['tokens'])}"
            f"{_range(o['tokens_interval'])} ({o['tokens_per_param']:.1f} {plan['unit']} per parameter; "
            f"N grows as C^{o['exponents']['a']:.3f}, D as C^{o['exponents']['b']:.3f}), predicted {metric} "
            f"{interval(o['predicted'])}.",
        ]
    if plan.get("target"):
        t = plan["target"]
        lines += ["", f"## Reaching {metric} {t['target']:g}", ""]
        if t.get("flops") is None:
            lines.append(t["why"])
        else:
            lines.append(
                f"{t['flops']:.3g} FLOPs{_range(t.get('flops_interval'), '{:.3g}')}, at N = "
                f"{si(t['params'])} and D = {si(t['tokens'])}."
            )
    m = plan["mfu"]
    mfu_text = "none (give --mfu)" if m["value"] is None else f"{100 * m['value']:.1f}%"
    lines += ["", f"MFU used for time and money: {mfu_text}, {m['source']}."]
    for s in plan["scenarios"]:
        lines += ["", *_scenario_md(plan, s)]
    lines += ["", "## Hardware", "", "| accelerator | bf16 TFLOP/s | fp32 TFLOP/s | GB | per hour | source |"]
    lines.append("|---|---:|---:|---:|---:|---|")
    for a in plan["accelerators"]:
        lines.append(
            f"| {a['name']} | {a['peak_bf16_tflops'] or '-'} | {a['peak_fp32_tflops']} | "
            f"{a['memory_gb']:g} | {a['price_per_hour']:g} | {a['source']}; price: {a['price_source']} |"
        )
    return "\n".join(lines) + "\n"


def _range(iv: Any, form: str = "") -> str:
    if not iv:
        return ""
    lo, hi = iv
    text = form.format(lo) + "-" + form.format(hi) if form else f"{si(lo)}-{si(hi)}"
    return f" (95% CI {text})"


def _holdout_md(plan: dict[str, Any]) -> list[str]:
    h = plan["holdout"]
    top = h["headline"]
    lines = [
        "## Backtest: the largest size held out",
        "",
        f"Fitted without the trials of N = {si(h['held_out'])} (law: "
        f"{law_text(h['fit']['law'], h['fit']['form'], h['fit']['ceiling'])}, R^2 {h['fit']['r2']:.4f}), "
        f"then asked for them. Largest trial: predicted {top['value']:.4f}, measured {top['measured']:.4f}, "
        f"{100 * top['error']:+.2f}% ({'inside' if top['covered'] else 'outside'} the 95% prediction "
        f"interval {top['pi_low']:.4f}-{top['pi_high']:.4f}). Mean absolute error over the held-out trials "
        f"{100 * h['mean_abs_error']:.2f}%.",
        "",
        "| trial | D | measured | predicted | 95% PI | error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in h["trials"]:
        lines.append(
            f"| {r['trial']} | {si(r['tokens'])} | {r['measured']:.4f} | {r['value']:.4f} | "
            f"{r['pi_low']:.4f}-{r['pi_high']:.4f} | {100 * r['error']:+.2f}% |"
        )
    return lines


def _scenario_md(plan: dict[str, Any], s: dict[str, Any]) -> list[str]:
    sh = s["shape"]
    lines = [
        f"## {_title(s)}",
        "",
        f"N = {si(s['params'])}, D = {si(s['tokens'])} ({s['why']}); predicted {plan['metric']} "
        f"{interval(s['predicted'])}.",
        f"Shape: {sh['describe']}, context {sh['context']} ({si(sh['params'])} non-embedding, "
        f"{si(sh['params_total'])} in all). Training FLOPs {s['flops']:.3g} (6ND: {s['flops_6nd']:.3g}). "
        f"{s['world_size']} devices, micro-batch {s['micro_batch']} per device.",
        "",
        "| accelerator | precision | time | cost | DDP | DDP + ckpt | FSDP | FSDP + ckpt | infer ms/token | "
        f"per 1,000 requests ({plan['request_tokens']} tokens) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h in s["hardware"]:
        mem = [f"{gb(m['total'])} {'fits' if m.get('fits') else 'no'}" for m in h["memory"]]
        inf = h.get("inference") or {}
        cost = f"{h['cost']:.4g}" if h.get("cost") is not None else "-"
        lines.append(
            f"| {h['name']} | {h['precision']} | {duration(h.get('hours'))} | {cost} | {' | '.join(mem)} | "
            f"{inf.get('ms_per_token', float('nan')):.4g} | {inf.get('cost_per_1000', float('nan')):.3g} |"
        )
    return lines


def _title(s: dict[str, Any]) -> str:
    return {
        "asked": "The size asked for",
        "budget": "Compute-optimal at the budget",
        "target": "Cheapest to reach the target",
        "study": "The study's largest trial, planned",
    }[s["name"]]


# ------------------------------------------------------------------------------------------ html
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.legend{margin:4px 0 12px}
.key{margin-right:14px;white-space:nowrap}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.poor{background:#fde8e8;padding:6px 10px;border-left:4px solid #d62728}.good{color:#2a7a2a}"""


def _md_table_html(md_lines: list[str]) -> str:
    """A Markdown table (lines starting with |) as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md_lines]
    head, body = rows[0], rows[2:]
    out = ["<table><thead><tr>", *(f"<th>{html.escape(c)}</th>" for c in head), "</tr></thead><tbody>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _md_html(md: str) -> str:
    """plan.md's headings, paragraphs and tables as HTML (the one Markdown this module writes)."""
    out, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(_md_table_html(table))
            table = []
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            cls = ' class="poor"' if "describes this study poorly" in line else ""
            out.append(f"<p{cls}>{html.escape(line)}</p>")
    return "".join(out)


def _law(d: dict[str, float]) -> Law:
    return Law(**{k: d[k] for k in ("E", "A", "B", "alpha", "beta")})


def render_html(plan: dict[str, Any]) -> str:
    md = markdown(plan)
    charts = _charts(plan)
    after = md.find("\n## ", md.index("## The law") + 1)  # the charts go after the law's table
    cut = len(md) if after < 0 else after + 1
    head = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>tansuo plan {html.escape(plan['study'])}</title><style>{CSS}</style></head><body>"
    )
    return head + _md_html(md[:cut]) + charts + _md_html(md[cut:]) + "</body></html>\n"


def _metric_of(plan: dict[str, Any], law_values: np.ndarray) -> np.ndarray:
    fit = plan["fit"]
    return law_values if fit["form"] == "loss" else fit["ceiling"] - law_values


def _charts(plan: dict[str, Any]) -> str:
    metric, pts = plan["metric"], plan["points"]
    law = _law(plan["fit"]["law"])
    sizes = sorted({p["params"] for p in pts})
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sizes)}
    d_lo, d_hi = min(p["tokens"] for p in pts), max(p["tokens"] for p in pts)
    grid = np.geomspace(d_lo / 1.5, d_hi * 1.5, 40)
    series: list[dict[str, Any]] = []
    for n in sizes:
        curve = _metric_of(plan, law(n, grid))
        series.append(
            {
                "kind": "line",
                "points": list(zip(grid, curve, strict=True)),
                "color": colors[n],
                "title": f"fit, N = {si(n)}",
            }
        )
        mine = [(p["tokens"], p["measured"]) for p in pts if p["params"] == n]
        series.append(
            {"kind": "points", "points": mine, "color": colors[n], "title": f"measured, N = {si(n)}"}
        )
    out = ["<h2>Charts</h2>", legend([(colors[n], f"N = {si(n)}") for n in sizes])]
    out.append(chart("plot-tokens", series, f"D ({plan['unit']})", metric))
    parity = [
        {
            "kind": "points",
            "points": [(p["fitted"], p["measured"])],
            "color": colors[p["params"]],
            "title": f"trial {p['trial']}: {100 * p['residual']:+.2f}%",
        }
        for p in pts
    ]
    lo = min(min(p["fitted"], p["measured"]) for p in pts)
    hi = max(max(p["fitted"], p["measured"]) for p in pts)
    parity.append(
        {
            "kind": "line",
            "points": [(lo, lo), (hi, hi)],
            "color": "#999",
            "dashed": True,
            "title": "measured = fitted",
        }
    )
    out.append(chart("plot-parity", parity, f"fitted {metric}", f"measured {metric}", logx=False))
    out.append(_frontier(plan, law, colors))
    if plan.get("holdout"):
        out.append(_holdout_chart(plan))
    return "".join(out)


def _frontier(plan: dict[str, Any], law: Law, colors: dict[int, str]) -> str:
    """Trials by training FLOPs, the law's compute-optimal frontier, and the planned scenarios."""
    pts = plan["points"]
    flops = [6 * p["params"] * p["tokens"] for p in pts]
    ends = [min(flops) / 2, max(flops) * 2] + [6 * s["params"] * s["tokens"] for s in plan["scenarios"]]
    grid = np.geomspace(min(ends), max(ends) * 1.5, 60)
    try:
        frontier = [(c, float(_metric_of(plan, np.array(law.optimal_loss(c))))) for c in grid]
    except ValueError:
        frontier = []
    series: list[dict[str, Any]] = [
        {
            "kind": "points",
            "points": [(f, p["measured"])],
            "color": colors[p["params"]],
            "title": f"trial {p['trial']}: N {si(p['params'])}, D {si(p['tokens'])}",
        }
        for f, p in zip(flops, pts, strict=True)
    ]
    if frontier:
        series.append(
            {"kind": "line", "points": frontier, "color": "#333", "title": "compute-optimal frontier"}
        )
    for s in plan["scenarios"]:
        pr = s["predicted"]
        c = 6 * s["params"] * s["tokens"]
        series.append(
            {
                "kind": "band",
                "points": [(c / 1.15, pr["pi_low"], pr["pi_high"]), (c * 1.15, pr["pi_low"], pr["pi_high"])],
                "color": "#e6a700",
                "title": f"{_title(s)}: 95% PI",
            }
        )
        series.append(
            {
                "kind": "points",
                "points": [(c, pr["value"])],
                "color": "#e6a700",
                "r": 6,
                "title": f"{_title(s)}: N {si(s['params'])}, D {si(s['tokens'])}",
            }
        )
    return chart("plot-frontier", series, "training compute 6ND (FLOPs)", plan["metric"])


def _holdout_chart(plan: dict[str, Any]) -> str:
    h = plan["holdout"]
    rows = h["trials"]
    series = [
        {
            "kind": "band",
            "points": [(r["tokens"], r["pi_low"], r["pi_high"]) for r in rows],
            "color": "#1f77b4",
            "title": "95% prediction interval",
        },
        {
            "kind": "line",
            "points": [(r["tokens"], r["value"]) for r in rows],
            "color": "#1f77b4",
            "title": "predicted without this size",
        },
        {
            "kind": "points",
            "points": [(r["tokens"], r["measured"]) for r in rows],
            "color": "#d62728",
            "title": "measured",
        },
    ]
    note = legend([("#1f77b4", "predicted (fit without this size), 95% PI"), ("#d62728", "measured")])
    return (
        f"<h3>Backtest: N = {si(h['held_out'])}</h3>"
        + note
        + chart("plot-holdout", series, f"D ({plan['unit']})", plan["metric"])
    )
