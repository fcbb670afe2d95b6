"""SVG drawing for the study's report: scatter plots with the 2-D front, line charts of training curves and
the markers they use; each returns one inline ``<svg>`` string, nothing fetched.
"""

from __future__ import annotations

import html
import math
from typing import Any


def _empty(plot_id: str, width: int) -> str:
    no_data = '<text x="10" y="30">no data</text>'
    return f'<svg id="{plot_id}" class="plot" width="{width}" height="60">{no_data}</svg>'


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}"


def scatter(
    plot_id: str,
    points: list[dict[str, Any]],
    xlabel: str,
    ylabel: str,
    *,
    front_line: bool = True,
    higher_is_better: bool = True,
    size_note: str = "",
) -> str:
    """An SVG scatter plot: points {x, y, r, color, title, pareto, feasible, recommended}; the upper-left
    staircase of the non-dominated points (lower x, and higher y unless ``higher_is_better`` is False)
    drawn when ``front_line``."""
    W, H, L, R, T, B = 720, 420, 70, 20, 20, 55
    if not points:
        return _empty(plot_id, W)
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    logx = min(xs) > 0 and max(xs) / min(xs) > 20
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.08 or 0.5, (y1 - y0) * 0.1 or 0.01
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def sx(v: float) -> float:
        return L + (fx(v) - x0) / (x1 - x0) * (W - L - R)

    def sy(v: float) -> float:
        return T + (y1 - v) / (y1 - y0) * (H - T - B)

    out = [f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">']
    out.append(
        f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" stroke="#ccc"/>'
    )
    xt = [10**e for e in range(math.floor(x0), math.ceil(x1) + 1)] if logx else _ticks(x0, x1)
    for v in xt:
        if x0 <= fx(v) <= x1:
            x = sx(v)
            out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#eee"/>')
            out.append(
                f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle" font-size="11">{_label(v)}</text>'
            )
    for v in _ticks(y0, y1):
        y = sy(v)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_label(v)}</text>')
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle" font-size="12">'
        f"{html.escape(xlabel)}{' (log scale)' if logx else ''}</text>"
    )
    out.append(
        f'<text transform="translate(16,{(T + H - B) / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{html.escape(ylabel)}</text>"
    )
    if front_line:  # the 2-D front of these axes among feasible points: lower x is better
        sign = 1 if higher_is_better else -1
        best, stairs = -math.inf, []
        for p in sorted((p for p in points if p["feasible"]), key=lambda p: (p["x"], -sign * p["y"])):
            if sign * p["y"] > best:
                best = sign * p["y"]
                stairs.append(p)
        if len(stairs) > 1:
            d = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in stairs)
            out.append(
                f'<polyline class="front" points="{d}" fill="none" stroke="#555" stroke-dasharray="4 3"/>'
            )
    for p in sorted(points, key=lambda p: -p["r"]):  # big markers first, small ones stay visible on top
        fill = p["color"] if p["feasible"] else "none"
        stroke = "#000" if p.get("pareto") else (p["color"] if p["feasible"] else "#999")
        width = 2 if p.get("pareto") else 1
        attrs = (
            f'class="point{" pareto" if p.get("pareto") else ""}" fill="{fill}" fill-opacity="0.55" '
            f'stroke="{stroke}" stroke-width="{width}"'
        )
        out.append(marker(p.get("shape", "circle"), sx(p["x"]), sy(p["y"]), p["r"], attrs, p["title"]))
        if p.get("recommended"):
            out.append(
                f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="{p["r"] + 5:.1f}" fill="none" '
                'stroke="#e6a700" stroke-width="3"/>'
            )
    if size_note:
        out.append(
            f'<text x="{W - R - 4}" y="{T + 14}" text-anchor="end" font-size="11" fill="#555">'
            f"{size_note}</text>"
        )
    out.append("</svg>")
    return "".join(out)


SHAPES = ("circle", "square", "triangle", "diamond")


def marker(shape: str, x: float, y: float, r: float, attrs: str, title: str = "") -> str:
    """An SVG marker of about the area of a circle of radius ``r`` centred on (x, y)."""
    tip = f"<title>{html.escape(title)}</title>" if title else ""
    if shape == "square":
        a = r * 0.886  # same area as the circle
        box = f'x="{x - a:.1f}" y="{y - a:.1f}" width="{2 * a:.1f}" height="{2 * a:.1f}"'
        return f"<rect {box} {attrs}>{tip}</rect>"
    if shape in ("triangle", "diamond"):
        if shape == "triangle":
            a = r * 1.35
            pts = [(x, y - a), (x + 0.866 * a, y + 0.5 * a), (x - 0.866 * a, y + 0.5 * a)]
        else:
            a = r * 1.25
            pts = [(x, y - a), (x + a, y), (x, y + a), (x - a, y)]
        d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        return f'<polygon points="{d}" {attrs}>{tip}</polygon>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {attrs}>{tip}</circle>'


def lines_plot(plot_id: str, series: list[dict[str, Any]], xlabel: str, ylabel: str) -> str:
    """An SVG line chart: series {points: [[x, y]...], color, title}."""
    W, H, L, R, T, B = 720, 300, 70, 20, 20, 50
    pts = [xy for s in series for xy in s["points"]]
    if not pts:
        return _empty(plot_id, W)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

    def sx(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * (W - L - R)

    def sy(v: float) -> float:
        return T + (y1 - v) / (y1 - y0) * (H - T - B)

    out = [f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">']
    out.append(
        f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" stroke="#ccc"/>'
    )
    for v in _ticks(x0, x1):
        out.append(
            f'<text x="{sx(v):.1f}" y="{H - B + 16}" text-anchor="middle" font-size="11">{_label(v)}</text>'
        )
    for v in _ticks(y0, y1):
        out.append(f'<line x1="{L}" y1="{sy(v):.1f}" x2="{W - R}" y2="{sy(v):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{L - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" font-size="11">{_label(v)}</text>'
        )
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{xlabel}</text>'
    )
    out.append(
        f'<text transform="translate(16,{(T + H - B) / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{html.escape(ylabel)}</text>"
    )
    for s in series:
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
        out.append(
            f'<polyline class="curve" points="{d}" fill="none" stroke="{s["color"]}" stroke-width="1.5" '
            f'stroke-opacity="0.8"><title>{html.escape(s["title"])}</title></polyline>'
        )
    out.append("</svg>")
    return "".join(out)
