"""SVG charts of a plan: measured trials against the fitted law, the compute-optimal frontier, the backtest.

Each chart is one inline ``<svg>`` string, nothing fetched and no plotting library imported (as the
explore report's). A chart is a list of series: ``line`` (a polyline), ``points`` (markers) or ``band`` (a
filled area between ``low`` and ``high``), each with a colour and a title shown on hover.
"""

from __future__ import annotations

import html
import math
from typing import Any

from tansuo.explore.plots import _label, _ticks

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def chart(
    plot_id: str,
    series: list[dict[str, Any]],
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = True,
    logy: bool = False,
    width: int = 720,
    height: int = 400,
) -> str:
    """An SVG chart of ``series`` ({kind, points: [[x, y]] or [[x, low, high]] for a band, color, title})."""
    W, H, L, R, T, B = width, height, 75, 20, 20, 55
    xs = [p[0] for s in series for p in s["points"]]
    ys = [v for s in series for p in s["points"] for v in p[1:]]
    if not xs or (logx and min(xs) <= 0) or (logy and min(ys) <= 0):
        empty = '<text x="10" y="30">no data</text>'
        return f'<svg id="{plot_id}" class="plot" width="{W}" height="60">{empty}</svg>'
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y0, y1 = fy(min(ys)), fy(max(ys))
    px, py = (x1 - x0) * 0.05 or 0.5, (y1 - y0) * 0.08 or 0.05
    x0, x1, y0, y1 = x0 - px, x1 + px, y0 - py, y1 + py

    def sx(v: float) -> float:
        return L + (fx(v) - x0) / (x1 - x0) * (W - L - R)

    def sy(v: float) -> float:
        return T + (y1 - fy(v)) / (y1 - y0) * (H - T - B)

    out = [f'<svg id="{plot_id}" class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">']
    out.append(
        f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" stroke="#ccc"/>'
    )
    for v in _axis(x0, x1, logx):
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#eee"/>')
        out.append(
            f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle" font-size="11">{_label(v)}</text>'
        )
    for v in _axis(y0, y1, logy):
        y = sy(v)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_label(v)}</text>')
    scale = " (log scale)" if logx else ""
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle" font-size="12">'
        f"{html.escape(xlabel)}{scale}</text>"
    )
    out.append(
        f'<text transform="translate(16,{(T + H - B) / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
        f"{html.escape(ylabel)}{' (log scale)' if logy else ''}</text>"
    )
    for s in sorted(series, key=lambda s: {"band": 0, "line": 1, "points": 2}[s["kind"]]):
        tip = f"<title>{html.escape(s.get('title', ''))}</title>"
        color = s.get("color", "#555")
        if s["kind"] == "band":
            upper = [f"{sx(x):.1f},{sy(hi):.1f}" for x, _, hi in s["points"]]
            lower = [f"{sx(x):.1f},{sy(lo):.1f}" for x, lo, _ in reversed(s["points"])]
            area = " ".join(upper + lower)
            out.append(
                f'<polygon class="band" points="{area}" fill="{color}" fill-opacity="0.15" stroke="none">'
                f"{tip}</polygon>"
            )
        elif s["kind"] == "line":
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
            dash = ' stroke-dasharray="5 3"' if s.get("dashed") else ""
            out.append(
                f'<polyline class="fit" points="{d}" fill="none" stroke="{color}" stroke-width="1.5"{dash}>'
                f"{tip}</polyline>"
            )
        else:
            for x, y in s["points"]:
                r = s.get("r", 4)
                out.append(
                    f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{color}" '
                    f'fill-opacity="0.8" stroke="#333" stroke-width="0.5">{tip}</circle>'
                )
    out.append("</svg>")
    return "".join(out)


def _axis(lo: float, hi: float, log: bool) -> list[float]:
    """Tick values (in data units) between ``lo`` and ``hi`` (in plotted units)."""
    if not log:
        return [v for v in _ticks(lo, hi) if lo <= v <= hi]
    decades = [10.0**e for e in range(math.floor(lo), math.ceil(hi) + 1) if lo <= e <= hi]
    if len(decades) >= 2:
        return decades
    return [10**v for v in _ticks(lo, hi) if lo <= v <= hi]


def legend(items: list[tuple[str, str]]) -> str:
    """HTML swatches: (colour, text) pairs."""
    spans = (
        f'<span class="key"><span class="swatch" style="background:{c}"></span>{html.escape(t)}</span>'
        for c, t in items
    )
    return f'<div class="legend">{"".join(spans)}</div>'
