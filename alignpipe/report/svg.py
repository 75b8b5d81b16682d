"""Small inline SVG charts for the HTML report: a line chart and a histogram, no dependencies, no script.

Every text (titles, labels) is escaped; numbers are formatted here, so the SVG holds no data-derived markup.
"""
from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 220, 52, 12, 26, 34


def _fmt(v: float, step: float | None = None) -> str:
    """A tick label: as many decimals as the tick spacing needs (0.69185, 0.6919 ...), else 3 digits."""
    if step and 0 < step < 1 and abs(v) < 1e5:
        return f"{v:.{min(8, max(0, -math.floor(math.log10(step) + 1e-9)))}f}"
    if abs(v) < 1e-12:
        return "0"
    return f"{v:.6g}" if abs(v) >= 1 and float(v).is_integer() else f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _frame(title: str, xlabel: str, x0: float, x1: float, y0: float, y1: float, body: list[str],
           integer_x: bool) -> str:
    def sx(x):
        return PAD_L + (x - x0) / ((x1 - x0) or 1) * (W - PAD_L - PAD_R)

    def sy(y):
        return H - PAD_B - (y - y0) / ((y1 - y0) or 1) * (H - PAD_T - PAD_B)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img"><title>{escape(title)}</title>'),
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>',
           (f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 4}" text-anchor="middle" font-size="11" '
            f'fill="#555">{escape(xlabel)}</text>')]
    yt = _ticks(y0, y1)
    ystep = yt[1] - yt[0] if len(yt) > 1 else None
    for t in yt:
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{PAD_L - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{_fmt(t, ystep)}</text>')
    xt = [t for t in _ticks(x0, x1, 6) if not integer_x or float(t).is_integer()]
    xstep = xt[1] - xt[0] if len(xt) > 1 else None
    for t in xt:
        out.append(f'<text x="{sx(t):.1f}" y="{H - PAD_B + 13}" text-anchor="middle" font-size="10">'
                   f'{_fmt(t, xstep)}</text>')
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
               f'fill="none" stroke="#888"/>')
    out += body
    out.append("</svg>")
    return "".join(out)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step",
               ylim: tuple[float, float] | None = None, integer_x: bool = False, hline: float | None = None,
               max_points: int = 400, xlim: tuple[float, float] | None = None) -> str:
    """One or more (x, y) series on shared axes; long series are thinned to `max_points` for size."""
    pts = {k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(float(y))]
           for k, v in series.items()}
    pts = {k: v[::max(1, math.ceil(len(v) / max_points))] for k, v in pts.items() if v}
    if not pts:
        return ""
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v] + ([hline] if hline is not None else [])
    x0, x1 = xlim or (min(xs), max(xs))
    y0, y1 = ylim or (min(ys), max(ys))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)

    def sx(x):
        return PAD_L + (x - x0) / ((x1 - x0) or 1) * (W - PAD_L - PAD_R)

    def sy(y):
        return H - PAD_B - (y - y0) / ((y1 - y0) or 1) * (H - PAD_T - PAD_B)

    body = []
    if hline is not None:
        body.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" '
                    f'stroke="#999" stroke-dasharray="4 3"/>')
    for i, (name, v) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        if len(v) <= 30:
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in v]
        if len(pts) > 1:
            body.append(f'<text x="{PAD_L + 6}" y="{PAD_T + 14 + 13 * i}" font-size="10" fill="{color}">'
                        f'{escape(name)}</text>')
    return _frame(title, xlabel, x0, x1, y0, y1, body, integer_x)


def histogram(values: list[float], title: str, xlabel: str = "weight", bins: int = 20) -> str:
    """Counts of `values` in `bins` equal-width bins."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    top = max(counts)

    def sx(x):
        return PAD_L + (x - lo) / (hi - lo) * (W - PAD_L - PAD_R)

    def sy(y):
        return H - PAD_B - y / top * (H - PAD_T - PAD_B)

    body = [f'<rect x="{sx(lo + i * width) + 0.5:.1f}" y="{sy(c):.1f}" width="{max(1.0, sx(lo + width) - sx(lo) - 1):.1f}" '
            f'height="{sy(0) - sy(c):.1f}" fill="#1f77b4"><title>{_fmt(lo + i * width)}..'
            f'{_fmt(lo + (i + 1) * width)}: {c}</title></rect>' for i, c in enumerate(counts) if c]
    return _frame(title, xlabel, lo, hi, 0, top, body, False)
