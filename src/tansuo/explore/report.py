"""The study's report: ``report.html`` (one self-contained file: inline SVG plots drawn by
:mod:`tansuo.explore.plots`, a sortable table, no network), ``report.md`` and ``results.json``, all written
from :func:`tansuo.explore.results.collect`'s mapping.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from tansuo.atomic import atomic_write_json, atomic_write_text
from tansuo.explore.pareto import quality_text
from tansuo.explore.plots import SHAPES, lines_plot, marker, scatter

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]


def write_report(results: dict[str, Any], study_dir: Path) -> dict[str, Path]:
    """Write results.json, report.md and report.html into the study folder; returns their paths."""
    study_dir = Path(study_dir)
    paths = {
        "json": study_dir / "results.json",
        "md": study_dir / "report.md",
        "html": study_dir / "report.html",
    }
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["md"], markdown(results))
    atomic_write_text(paths["html"], render_html(results))
    return paths


# ------------------------------------------------------------------------------------------ formatting
def fmt(name: str, v: float | None, quality: str = "maximize") -> str:
    """A metric's value for tables: quality x100 (a loss as is), latency in ms, size in MB, ..."""
    if v is None:
        return "-"
    if name == "quality":
        return quality_text(v, quality)
    if name in ("latency", "latency_p95"):
        return f"{v:.3f}"
    if name in ("size", "memory", "train_time"):
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    if name == "params":
        return f"{v:.3f}M"
    return f"{v:.3g}"


def describe(row: dict[str, Any]) -> str:
    """Candidate settings in one line: ``vit_digits embed_dim=32 · lr=0.003``."""
    parts = [row["candidate"]]
    parts += [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("overrides", {}).items()
    ]
    train = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("train", {}).items()]
    return " ".join(parts) + (" · " + " ".join(train) if train else "")


TABLE = ("quality", "latency", "latency_p95", "size", "params", "memory", "train_time", "privacy", "epsilon")
TITLES = {
    "quality": "quality",
    "latency": "p50 ms",
    "latency_p95": "p95 ms",
    "size": "size MB",
    "params": "params",
    "memory": "peak MB",
    "train_time": "train s",
    "privacy": "MIA AUC",  # the membership-inference audit (objective or constraint `privacy`)
    "epsilon": "epsilon",  # DP-SGD's budget spent (train.privacy); - without privacy
}


def _shown(row: dict[str, Any]) -> list[str]:
    """The table's figures a row has (privacy and epsilon only in studies that measure them)."""
    return [n for n in TABLE if n not in ("privacy", "epsilon") or row["values"].get(n) is not None]


def pareto_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pareto-front variants, best quality first."""
    by_id = {r["id"]: r for r in results["variants"]}
    front = [by_id[i] for i in results["pareto"]]
    return sorted(front, key=lambda r: -r["values"].get("quality", 0.0))


def _recommended(results: dict[str, Any]) -> dict[str, Any] | None:
    rid = results.get("recommended")
    return next((r for r in results["variants"] if r["id"] == rid), None)


def _q(results: dict[str, Any]) -> str:
    return results.get("quality_direction", "maximize")


def _settings_line(results: dict[str, Any]) -> str:
    m = results["measure"]
    threads = ", ".join(map(str, m["threads_recorded"])) or str(m["threads"])
    scale = " (x100)" if _q(results) == "maximize" else ""
    return (
        f"Quality: {results['metric']} on the held-back `{results.get('split') or 'test'}` split{scale}, "
        f"which training never saw. Latency: batch 1, median (p50) and p95 of {m['reps']} calls after "
        f"warm-up, {threads} thread(s), each model in a fresh process. Size: the bundle folder on disk."
    )


# ------------------------------------------------------------------------------------------ markdown
def markdown(results: dict[str, Any]) -> str:
    """report.md: summary, recommendation, Pareto table, every variant, failures."""
    c = results["counts"]
    lines = [
        f"# Study {results['study']}",
        "",
        f"Task `{results['task']}`; objectives: {', '.join(results['objectives'])}; constraints: "
        f"{', '.join(results['constraints']) or 'none'}; sampler {results['sampler']}. Trials: "
        f"{c['complete']} complete, {c['fail']} failed, {c['running']} running.",
        "",
        _settings_line(results),
        "",
        "## Recommendation",
        "",
    ]
    rec = _recommended(results)
    if rec is None:
        lines.append(f"None: {results['why']}.")
    else:
        lines += [
            f"**{rec['id']}**: {describe(rec)}, variant `{rec['variant']}` "
            f"({' + '.join(rec['steps']) or 'as trained'}). "
            + ", ".join(f"{TITLES[n]} {fmt(n, rec['values'].get(n), _q(results))}" for n in _shown(rec)),
            "",
            f"Why: {results['why']}.",
        ]
    lines += [
        "",
        "## Pareto front",
        "",
        *_md_table(pareto_rows(results), _q(results)),
        "",
        "## Every variant",
        "",
    ]
    lines += _md_table([r for r in results["variants"] if r["status"] == "ok"], _q(results))
    failed = [t for t in results["trials"] if t["state"] == "fail"]
    bad = [r for r in results["variants"] if r["status"] != "ok"]
    if failed or bad:
        lines += ["", "## Failures", ""]
        lines += [f"- trial {t['number']} ({t.get('candidate') or '?'}): {t['reason']}" for t in failed]
        lines += [f"- {r['id']}: {r['reason']}" for r in bad]
    return "\n".join(lines) + "\n"


def _md_table(rows: list[dict[str, Any]], quality: str) -> list[str]:
    head = ["id", "model", "variant", *(TITLES[n] for n in TABLE), "feasible", "front"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["id"], describe(r), r["variant"], *(fmt(n, r["values"].get(n), quality) for n in TABLE)]
        cells += ["yes" if r["feasible"] else "no", "yes" if r.get("pareto") else ""]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return out


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
.rec{background:#fff8e1;border:1px solid #e6a700;padding:10px 14px;border-radius:6px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none}td.l,th.l{text-align:left}
tr.pareto td{font-weight:600}tr.infeasible td{color:#999}tr.failed td{color:#b00}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
.muted{color:#666;font-size:13px}
"""

# click a header to sort by it (numbers by their data-v value), again to reverse
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.getAttribute('data-dir') !== 'asc';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y), r;
      if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; }
      else if (isNaN(nx) !== isNaN(ny)) { r = isNaN(nx) ? 1 : -1; }
      else { r = String(x).localeCompare(String(y)); }
      return asc ? r : -r;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def model_key(item: dict[str, Any]) -> str:
    """What was trained: the candidate with its settings (a variant row or a trial)."""
    settings = item.get("settings")
    if settings is None and "overrides" in item:
        settings = item
    if not settings:
        return str(item.get("candidate") or "?")
    keys = ("candidate", "overrides", "train")
    return describe({k: settings[k] for k in keys})


def _colors(results: dict[str, Any]) -> dict[str, str]:
    keys = [model_key(r) for r in results["variants"]] + [model_key(t) for t in results["trials"]]
    names = list(dict.fromkeys(keys))
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _shapes(results: dict[str, Any]) -> dict[str, str]:
    names = list(dict.fromkeys(r["variant"] for r in results["variants"]))
    return {n: SHAPES[i % len(SHAPES)] for i, n in enumerate(names)}


def _points(results: dict[str, Any], x: str, colors: dict[str, str]) -> list[dict[str, Any]]:
    shapes = _shapes(results)
    rows = [r for r in results["variants"] if r["status"] == "ok"]
    sizes = [r["values"]["size"] for r in rows]
    smax = max(sizes) if sizes else 1.0
    out = []
    for r in rows:
        v = r["values"]
        title = (
            f"{r['id']}: {describe(r)} [{r['variant']}] quality {fmt('quality', v['quality'], _q(results))}, "
            f"p50 {fmt('latency', v['latency'])} ms, {fmt('size', v['size'])} MB"
            + ("" if r["feasible"] else " (breaks a constraint)")
        )
        out.append(
            {
                "x": v[x],
                "y": 100 * v["quality"] if _q(results) == "maximize" else v["quality"],
                "r": 4 + 14 * math.sqrt(v["size"] / smax),  # marker area follows size
                "color": colors[model_key(r)],
                "shape": shapes[r["variant"]],
                "title": title,
                "pareto": r.get("pareto"),
                "feasible": r["feasible"],
                "recommended": r["id"] == results.get("recommended"),
            }
        )
    return out


def _cell(text: str, sort: Any = None, left: bool = False) -> str:
    v = html.escape(str(text if sort is None else sort), quote=True)
    return f'<td{" class=l" if left else ""} data-v="{v}">{html.escape(str(text))}</td>'


def render_html(results: dict[str, Any]) -> str:
    """The whole report as one HTML string (inline CSS, SVG and JavaScript; nothing fetched)."""
    colors = _colors(results)
    c = results["counts"]
    rec = _recommended(results)
    esc = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>tansuo study {esc(results['study'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Study {esc(results['study'])}</h1>",
        f"<p>Task <b>{esc(str(results['task']))}</b>"
        f" · objectives <b>{esc(', '.join(results['objectives']))}</b>"
        f" · constraints <b>{esc(', '.join(results['constraints']) or 'none')}</b>"
        f" · sampler {esc(results['sampler'])}"
        f" · trials: {c['complete']} complete, {c['fail']} failed, {c['running']} running"
        f" · {sum(r['status'] == 'ok' for r in results['variants'])} measured variants</p>",
        f"<p class=muted>{esc(_settings_line(results).replace('`', ''))}</p>",
        '<h2>Recommendation</h2><div class="rec" id="recommendation">',
    ]
    if rec is None:
        parts.append(f"<p>None: {esc(results['why'])}.</p>")
    else:
        figures = ", ".join(f"{TITLES[n]} {fmt(n, rec['values'].get(n), _q(results))}" for n in _shown(rec))
        parts.append(
            f"<p><b>{esc(rec['id'])}</b>: {esc(describe(rec))}, variant <b>{esc(rec['variant'])}</b> "
            f"({esc(' + '.join(rec['steps']) or 'as trained')}). {esc(figures)}.</p>"
            f"<p>Why: {esc(results['why'])}.</p><p class=muted>Copied to best/ in the study folder "
            f"(from {esc(str(rec['path']))}).</p>"
        )
    parts.append("</div>")
    legend = "".join(f'<span><i style="background:{col}"></i>{esc(n)}</span>' for n, col in colors.items())
    grey = 'fill="#888"'
    legend += "<br>" + "".join(
        f'<span><svg width="14" height="14">{marker(shape, 7, 7, 5, grey)}</svg> {esc(name)}</span>'
        for name, shape in _shapes(results).items()
    )
    parts.append(
        f'<div class="legend">{legend}<br><span>colour: trained model · shape: variant · black outline: '
        "Pareto front · gold ring: recommended · hollow: "
        "breaks a constraint · marker area: size on disk</span></div>"
    )
    ylabel = (
        f"{results['metric']} x100" if _q(results) == "maximize" else f"{results['metric']} (lower is better)"
    )
    parts.append("<h2>Quality against latency</h2>")
    parts.append(
        scatter(
            "plot-quality-latency",
            _points(results, "latency", colors),
            "latency p50 at batch 1 (ms)",
            ylabel,
            higher_is_better=_q(results) == "maximize",
            size_note="marker area: size",
        )
    )
    parts.append("<h2>Quality against size</h2>")
    parts.append(
        scatter(
            "plot-quality-size",
            _points(results, "size", colors),
            "size on disk (MB)",
            ylabel,
            higher_is_better=_q(results) == "maximize",
        )
    )
    parts.append("<h2>Training curves</h2>")
    trained = [t for t in results["trials"] if t["curves"]]
    val_key = f"val_{results['metric']}"
    for key, label in (("train_loss", "training loss"), (val_key, f"validation {results['metric']}")):
        series = [
            {
                "points": t["curves"].get(key, []),
                "color": colors.get(model_key(t), "#777"),
                "title": f"trial {t['number']} {t['candidate']}",
            }
            for t in trained
        ]
        parts.append(lines_plot(f"plot-curves-{key}", series, "step", label))
    parts.append("<h2>Every trial and variant</h2><p class=muted>Click a column to sort.</p>")
    head = ["id", "trial", "model and settings", "variant", "steps", *(TITLES[n] for n in TABLE)]
    head += ["spread", "feasible", "front", "status"]
    parts.append('<table id="variants" class="sortable"><thead><tr>')
    parts += [
        f'<th class="{"l" if i in (0, 2, 3, 4) or h == "status" else ""}">{esc(h)}</th>'
        for i, h in enumerate(head)
    ]
    parts.append("</tr></thead><tbody>")
    for r in results["variants"]:
        ok = r["status"] == "ok"
        cls = (
            "failed" if not ok else ("pareto" if r.get("pareto") else ("" if r["feasible"] else "infeasible"))
        )
        cells = [
            _cell(r["id"], left=True),
            _cell(r["trial"]),
            _cell(describe(r), left=True),
            _cell(r["variant"], left=True),
        ]
        cells.append(_cell(" + ".join(r["steps"]) or "as trained", left=True))
        for n in TABLE:
            v = r.get("values", {}).get(n)
            cells.append(_cell(fmt(n, v, _q(results)), "" if v is None else v))
        spread = r.get("figures", {}).get("latency_spread")
        cells.append(_cell("-" if spread is None else f"{100 * spread:.0f}%", spread))
        cells.append(_cell("yes" if r.get("feasible") else "no" if ok else "-"))
        cells.append(_cell("yes" if r.get("pareto") else ""))
        cells.append(_cell("ok" if ok else f"failed: {r['reason']}", left=True))
        parts.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    for t in results["trials"]:
        if t["state"] != "complete":
            cells = [
                _cell(f"{t['number']}/-", left=True),
                _cell(t["number"]),
                _cell(t.get("candidate") or "?", left=True),
            ]
            cells += [_cell("-", left=True), _cell("-", left=True)] + [_cell("-", "") for _ in TABLE]
            cells += [_cell("-", ""), _cell("-"), _cell("")]
            cells.append(_cell(f"trial {t['state']}: {t.get('reason') or ''}", left=True))
            parts.append('<tr class="failed">' + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    parts.append(f"<script>{SORT_JS}</script>")
    parts.append(f'<script type="application/json" id="results-data">{_json_for_html(results)}</script>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _json_for_html(results: dict[str, Any]) -> str:
    slim = {k: v for k, v in results.items() if k != "trials"}
    return json.dumps(slim).replace("</", "<\\/")
