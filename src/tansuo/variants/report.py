"""The report of a ``tansuo compress`` run: the table of every variant's figures, and report.md.

``report`` is the mapping :func:`tansuo.variants.pipeline.compress` returns and writes to report.json: the
input bundle, the validated recipe, one entry per variant (name, path, steps, figures) and the choice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COLUMNS", "HEADERS", "report_markdown", "rows"]

#: (figure key, column title, formatter) of the table, in order
COLUMNS = (
    ("quality", "quality", lambda v: f"{100 * v:.2f}"),
    ("latency_ms_p50", "p50 ms", lambda v: f"{v:.2f}"),
    ("latency_ms_p95", "p95 ms", lambda v: f"{v:.2f}"),
    ("throughput_per_s", "items/s", lambda v: f"{v:.1f}"),
    ("size_bytes", "size MB", lambda v: f"{v / 1e6:.1f}"),
    ("size_zipped_bytes", "zipped MB", lambda v: f"{v / 1e6:.1f}"),
    ("params", "params", lambda v: f"{v / 1e6:.2f}M"),
    ("peak_rss_mb", "peak MB", lambda v: f"{v:.0f}"),
)


def rows(report: dict[str, Any]) -> list[list[str]]:
    """Table rows (variant, steps, each column, speed-up and drop against the original)."""
    ref = report["variants"][0]
    out = []
    for v in report["variants"]:
        cells = [v["name"], " + ".join(v["steps"]) or "fp32 reference"]
        cells += [fmt(v[key]) if key in v else "-" for key, _, fmt in COLUMNS]
        cells.append(f"{ref['latency_ms_p50'] / v['latency_ms_p50']:.2f}x")
        cells.append(f"{100 * (ref['quality'] - v['quality']):+.2f}")
        out.append(cells)
    return out


HEADERS = ["variant", "steps", *(title for _, title, _ in COLUMNS), "speed-up", "drop (pts)"]


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the table, the threads and input used, and the choice."""
    ref = report["variants"][0]
    reps, large = report["recipe"]["reps"], report["recipe"]["large_batch"]
    if ref.get("timed") == "decode step":
        timing = (
            f"Latency: one decoding step at batch 1 after a {ref.get('input_tokens')}-token prompt (the time "
            f"of a generated token), median and p95 of {reps} steps; throughput: tokens/s decoding "
            f"{large} rows at once"
        )
    else:
        timing = (
            f"Latency: batch 1 ({ref.get('input_tokens') or 'one image'} tokens), median and p95 of {reps} "
            f"calls; throughput at batch {large}"
        )
    lines = [
        f"# Compression of {report['bundle']}",
        "",
        f"Quality: {ref.get('metric', 'quality')} on the {ref.get('split', 'held-back')} split (x100). "
        f"{timing}; {ref['threads']} threads.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    lines.append("")
    if all("perplexity" in v.get("metrics", {}) for v in report["variants"]):
        lines += [_perplexity_text(report["variants"]), ""]
    if any(s.get("unstructured") for s in report["recipe"]["steps"]):
        lines += [
            "Unstructured pruning zeroes weights: the zipped size shrinks, but dense CPU kernels do the same "
            "work on zeros, so neither latency nor the size on disk improves.",
            "",
        ]
    for v in report["variants"]:
        if "int8_fallback" in v:
            lines += [_fallback_text(v["name"], v["int8_fallback"]), ""]
        if "prune_schedule" in v:
            lines += [_schedule_text(v["name"], v["prune_schedule"]), ""]
        if "prune_search" in v:
            lines += [_search_text(v["name"], v["prune_search"]), ""]
    max_drop = report["recipe"]["max_drop"]
    if report["chosen"] is None:
        lines.append(f"No variant stays within {max_drop} points of the original; the original stays.")
    else:
        why = (
            "the last step"
            if max_drop is None
            else f"the {report['recipe']['objective']} winner within {max_drop} points"
        )
        lines.append(f"Chosen: {report['chosen']} ({why}), written to {report.get('chosen_bundle')}.")
    return "\n".join(lines) + "\n"


def _perplexity_text(variants: list[dict[str, Any]]) -> str:
    """A language model's perplexity per variant and its change against the original (what the loss
    column means)."""
    ref = variants[0]["metrics"]["perplexity"]
    shown = ", ".join(
        f"{v['name']} {v['metrics']['perplexity']:.2f}"
        + ("" if i == 0 else f" ({100 * (v['metrics']['perplexity'] / ref - 1):+.1f}%)")
        for i, v in enumerate(variants)
    )
    return f"Perplexity on the {variants[0].get('split', 'held-back')} split: {shown}."


def _fallback_text(name: str, f: dict[str, Any]) -> str:
    """What the accuracy-aware int8 search of a variant did, in a sentence a person reads."""
    head = (
        f"{name}: accuracy-aware int8 on the {f['split']} split ({f['metric']}, limit {f['max_drop']:g}): "
        f"the whole model int8 scores {f['whole_model']:.4f} against fp32's {f['fp32']:.4f} "
        f"(drop {f['whole_model_drop']:.2f})"
    )
    if not f["steps"]:
        return head + ": within the limit, every layer int8."
    kept = "; ".join(
        f"+{s['fp32']} -> {s['quality']:.4f} (drop {s['drop']:.2f}, {s['seconds']:.1f} s)" for s in f["steps"]
    )
    verdict = "within the limit" if f["within_limit"] else "still over the limit"
    return (
        f"{head}. Kept in fp32, most sensitive first: {kept}; {verdict} with {len(f['fp32_layers'])} "
        f"layer(s) in fp32 (search {f.get('search_seconds', 0):.1f} s)."
    )


def _schedule_text(name: str, s: dict[str, Any]) -> str:
    pairs = zip(s["fractions"], s["steps"], strict=True)
    cuts = ", ".join(f"{100 * f:.0f}% then {n} steps" for f, n in pairs)
    return f"{name}: gradual pruning in {len(s['steps'])} cuts (of the final ratios): {cuts}."


def _search_text(name: str, s: dict[str, Any]) -> str:
    """What the pruning ratio search tried, in a sentence a person reads."""
    tried = "; ".join(
        f"x{c['scale']:g} -> {c['quality']:.4f} (drop {c['drop']:.2f}, "
        f"{'within' if c['within_limit'] else 'over'}, {c['seconds'] / 60:.1f} min)"
        for c in s["candidates"]
    )
    verdict = (
        f"kept x{s['chosen_scale']:g}, the largest within"
        if s["within_limit"]
        else f"none within: kept the smallest, x{s['chosen_scale']:g}, still over the limit"
    )
    return (
        f"{name}: pruning ratio search on the {s['split']} split ({s['metric']}, limit {s['max_drop']:g}, "
        f"unpruned {s['reference']:.4f}), ratios scaled from the step's: {tried}; {verdict}."
    )
