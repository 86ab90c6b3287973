"""Small SVG charts for ``pelt report``, written as strings: line panels, a heatmap, a grid of histograms and bars.

No dependency and no script: every chart is one ``<svg id=…>`` element with fixed geometry (a ``viewBox``, so it
scales with the page), text in the page's font, and a ``<title>`` on each mark, which browsers show on hover. The
charts are meant for inline use in HTML, where the parser gives them the SVG namespace: they carry no ``xmlns`` (and
so the report holds no URL at all).
Values that are NaN or None are left out of lines and drawn as empty cells.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
VIRIDIS = (
    (68, 1, 84),
    (72, 40, 120),
    (62, 74, 137),
    (49, 104, 142),
    (38, 130, 142),
    (31, 158, 137),
    (53, 183, 121),
    (109, 205, 89),
    (180, 222, 44),
    (253, 231, 37),
)
INK, GRID, FONT = "#333", "#e4e4e4", 11


def esc(value: object) -> str:
    """Text escaped for HTML and SVG (quotes too)."""
    return html.escape(str(value), quote=True)


def fmt(v: float | None) -> str:
    """A number for a label or a tooltip: 4 significant digits, integers with thousands separators."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, int) or (abs(v) >= 1e4 and float(v).is_integer()):
        return f"{int(v):,}"
    return f"{v:.4g}"


def finite(v: object) -> bool:
    """Whether ``v`` is a real number (not None, NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def color(i: int) -> str:
    """The i-th categorical colour."""
    return PALETTE[i % len(PALETTE)]


def viridis(t: float) -> str:
    """The viridis colour at ``t`` in [0, 1] (linear between ten anchors)."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b, f = VIRIDIS[i], VIRIDIS[i + 1], t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    return [t for t in ticks if t >= lo - step * 1e-9] or [lo, hi]


def tick(t: float) -> str:
    """A tick label: ``0.25``, ``1e-05``, and large values short (``250k``, ``1.5M``)."""
    if abs(t) >= 1e6:
        return f"{t / 1e6:g}M"
    if abs(t) >= 1e4:
        return f"{t / 1e3:g}k"
    return f"{t:g}"


def svg_open(chart_id: str, width: float, height: float, label: str) -> str:
    """The opening tag of a chart (an id for tests and links; a title for screen readers and hovering)."""
    return (
        f'<svg id="{esc(chart_id)}" class="chart" viewBox="0 0 {width:g} '
        f'{height:g}" width="{width:g}" height="{height:g}" role="img" aria-label="{esc(label)}" '
        f'font-family="system-ui, sans-serif" font-size="{FONT}"><title>{esc(label)}</title>'
    )


def text(
    x: float, y: float, s: object, anchor: str = "start", size: int = FONT, extra: str = "", fill: str = INK
) -> str:
    """A text element (``extra``: more attributes)."""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{fill}"{extra}>{esc(s)}</text>'
    )


@dataclass
class Series:
    """One line of a line panel: ``points`` (x, y); ``dashed``; ``markers`` at each point (``hollow``: open)."""

    name: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False
    markers: bool = False
    hollow: bool = False
    line: bool = True


@dataclass
class Panel:
    """One set of axes with its series; ``y_range`` fixes the y axis (else it fits the data); ``log_y``."""

    title: str
    series: list[Series]
    y_range: tuple[float, float] | None = None
    log_y: bool = False
    x_integer: bool = False
    points: list[tuple[float, float]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.points = [
            (x, y) for s in self.series for x, y in s.points if finite(x) and finite(y) and (y > 0 or not self.log_y)
        ]


@dataclass
class Box:
    """A panel's plotting area in the SVG and the data ranges it maps."""

    left: float
    top: float
    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float
    log_y: bool = False

    def x(self, v: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (v - self.x0) / span * self.width

    def y(self, v: float) -> float:
        if self.log_y:
            v, lo, hi = math.log10(v), math.log10(self.y0), math.log10(self.y1)
        else:
            lo, hi = self.y0, self.y1
        return self.top + self.height - (v - lo) / ((hi - lo) or 1.0) * self.height


def _ranges(panel: Panel) -> tuple[float, float, float, float]:
    xs = [x for x, _ in panel.points] or [0.0, 1.0]
    ys = [y for _, y in panel.points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if panel.y_range:
        return x0, x1, *panel.y_range
    y0, y1 = min(ys), max(ys)
    if panel.log_y:
        return x0, x1, 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1) + 1e-12)
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.1 or 0.5
    return x0, x1, y0 - pad, y1 + pad


def _y_ticks(box: Box) -> list[float]:
    if box.log_y:
        lo, hi = round(math.log10(box.y0)), round(math.log10(box.y1))
        step = max(1, math.ceil((hi - lo) / 6))
        return [10.0**k for k in range(lo, hi + 1, step)]
    return [t for t in nice_ticks(box.y0, box.y1) if box.y0 <= t <= box.y1]


def _y_axis(box: Box) -> list[str]:
    """Horizontal grid lines with their values, and the frame."""
    out = []
    for t in _y_ticks(box):
        y = box.y(t)
        out.append(
            f'<line x1="{box.left:.1f}" x2="{box.left + box.width:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(text(box.left - 4, y + 3.5, tick(t), "end", 10))
    out.append(
        f'<rect x="{box.left:.1f}" y="{box.top:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" '
        'fill="none" stroke="#999"/>'
    )
    return out


def _axes(box: Box, x_label: str, x_integer: bool) -> list[str]:
    out = _y_axis(box)
    xt = [t for t in nice_ticks(box.x0, box.x1, 6) if box.x0 <= t <= box.x1]
    if x_integer:
        xt = sorted({round(t) for t in xt if abs(t - round(t)) < 1e-9})
    bottom = box.top + box.height
    for t in xt:
        out.append(text(box.x(t), bottom + 13, f"{t:g}", "middle", 10))
    out.append(text(box.left + box.width / 2, bottom + 27, x_label, "middle"))
    return out


def _series(box: Box, s: Series) -> list[str]:
    pts = [(x, y) for x, y in s.points if finite(x) and finite(y) and (y > 0 or not box.log_y)]
    out = []
    if s.line and len(pts) > 1:
        d = " ".join(f"{box.x(x):.1f},{box.y(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(
            f'<polyline points="{d}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}>'
            f"<title>{esc(s.name)}</title></polyline>"
        )
    if s.markers or len(pts) == 1:
        fill = "#fff" if s.hollow else s.color
        for x, y in pts:
            out.append(
                f'<circle cx="{box.x(x):.1f}" cy="{box.y(y):.1f}" r="3.2" fill="{fill}" stroke="{s.color}" '
                f'stroke-width="1.5"><title>{esc(s.name)}: {fmt(x)} → {fmt(y)}</title></circle>'
            )
    return out


def _legend(series: Sequence[Series], x: float, y: float, width: float) -> tuple[list[str], float]:
    """Legend entries in rows from (x, y); returns the elements and the height used."""
    out, cx, cy = [], x, y
    for s in series:
        w = 30 + 6.2 * len(s.name)
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 16
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if s.line:
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx + 18:.1f}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="{s.color}" '
                f'stroke-width="2"{dash}/>'
            )
        if s.markers or not s.line:
            fill = "#fff" if s.hollow else s.color
            out.append(f'<circle cx="{cx + 9:.1f}" cy="{cy:.1f}" r="3.2" fill="{fill}" stroke="{s.color}"/>')
        out.append(text(cx + 22, cy + 4, s.name, size=10))
        cx += w
    return out, cy - y + 16 if series else 0.0


def line_panels(chart_id: str, title: str, panels: list[Panel], x_label: str, panel_height: int = 190) -> str:
    """Panels side by side (wrapping after three; one alone is wide), each with its own y axis, sharing one legend
    of the series names; a panel without data says so."""
    per_row = min(len(panels), 3)
    panel_width = {1: 700, 2: 440}.get(per_row, 300)
    rows = math.ceil(len(panels) / per_row)
    left, gap, top = 48, 24, 38
    width = per_row * (left + panel_width) + (per_row - 1) * gap + 12
    legend_series = list({s.name: s for p in panels for s in p.series}.values())
    legend, legend_h = _legend(legend_series, left, 0, width - left - 12)
    cell_h = top + panel_height + 34
    height = rows * cell_h + legend_h + 14
    out = [svg_open(chart_id, width, height, title)]
    for i, p in enumerate(panels):
        ox = (i % per_row) * (left + panel_width + gap) + left
        oy = (i // per_row) * cell_h + 8
        out.append(text(ox, oy + 14, p.title, size=12, extra=' font-weight="600"'))
        x0, x1, y0, y1 = _ranges(p)
        box = Box(ox, oy + top - 14, panel_width, panel_height, x0, x1, y0, y1, p.log_y)
        out += _axes(box, x_label, p.x_integer)
        if not p.points:
            out.append(text(box.left + box.width / 2, box.top + box.height / 2, "no data", "middle"))
        for s in p.series:
            out += _series(box, s)
    out += [f'<g transform="translate(0 {rows * cell_h + 14:.1f})">', *legend, "</g>"]
    return "".join(out) + "</svg>"


def heatmap(
    chart_id: str, title: str, rows: list[str], cols: list[str], values: list[list[float | None]], cell: int = 84
) -> str:
    """A rows × cols grid coloured by value on [0, 1] (viridis), the value written in each cell, with a colour bar."""
    label_w = 8 + 7 * max((len(r) for r in rows), default=4)
    ch = 30
    width = label_w + cell * len(cols) + 90
    height = 34 + ch * len(rows) + 30
    out = [svg_open(chart_id, width, height, title)]
    for j, c in enumerate(cols):
        out.append(text(label_w + cell * j + cell / 2, 24, c, "middle", extra=' font-weight="600"'))
    for i, r in enumerate(rows):
        y = 30 + ch * i
        out.append(text(label_w - 6, y + ch / 2 + 4, r, "end"))
        for j, v in enumerate(values[i]):
            x = label_w + cell * j
            fill = viridis(v) if finite(v) else "#f4f4f4"
            out.append(
                f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{ch - 2}" fill="{fill}">'
                f"<title>{esc(r)} · {esc(cols[j])}: {fmt(v)}</title></rect>"
            )
            ink = "#fff" if finite(v) and v < 0.55 else INK
            out.append(text(x + cell / 2 - 1, y + ch / 2 + 3, fmt(v) if finite(v) else "", "middle", 10, fill=ink))
    bx = label_w + cell * len(cols) + 18
    bar_h = max(ch * len(rows) - 2, 60)
    for k in range(20):
        out.append(
            f'<rect x="{bx}" y="{30 + bar_h * (19 - k) / 20:.1f}" width="14" height="{bar_h / 20 + 0.5:.1f}" '
            f'fill="{viridis((k + 0.5) / 20)}"/>'
        )
    out += [text(bx + 18, 38, "1"), text(bx + 18, 30 + bar_h, "0"), text(bx + 18, 30 + bar_h / 2 + 4, "0.5")]
    return "".join(out) + "</svg>"


def histograms(
    chart_id: str,
    title: str,
    rows: list[str],
    cols: list[str],
    cells: dict[tuple[int, int], list[tuple[str, list[int]]]],
    cell_w: int = 150,
    cell_h: int = 64,
) -> str:
    """A rows × cols grid of small histograms on [0, 1]: per cell one outline per labelled count vector (the share
    of each bin, so epochs with different counts compare), coloured from light (first) to dark (last); the last is
    filled."""
    label_w = 8 + 7 * max((len(r) for r in rows), default=4)
    labels = list(dict.fromkeys(lab for hs in cells.values() for lab, _ in hs))
    shade = {lab: viridis(0.1 + 0.75 * (len(labels) - 1 - k) / max(len(labels) - 1, 1)) for k, lab in enumerate(labels)}
    gap = 10
    width = label_w + (cell_w + gap) * len(cols) + 10
    height = 26 + (cell_h + gap) * len(rows) + 46
    out = [svg_open(chart_id, width, height, title)]
    for j, c in enumerate(cols):
        out.append(text(label_w + (cell_w + gap) * j + cell_w / 2, 18, c, "middle", extra=' font-weight="600"'))
    for i, r in enumerate(rows):
        y = 26 + (cell_h + gap) * i
        out.append(text(label_w - 6, y + cell_h / 2 + 4, r, "end"))
        for j in range(len(cols)):
            x = label_w + (cell_w + gap) * j
            out.append(f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="#fafafa" stroke="#ccc"/>')
            hs = cells.get((i, j), [])
            out += _hist_cell(x, y, cell_w, cell_h, hs, shade, f"{r} · {cols[j]}")
    ly = 26 + (cell_h + gap) * len(rows) + 4
    for j in range(len(cols)):
        x = label_w + (cell_w + gap) * j
        out += [text(x + cell_w * t, ly - 1, f"{t:g}", "middle", 9) for t in (0, 0.5, 1)]
    out.append(text(label_w, ly + 14, "gate value 0 → 1; bar height: share of the eval set", size=10))
    out += _legend([Series(lab, [], shade[lab]) for lab in labels], label_w, ly + 30, width - label_w)[0]
    return "".join(out) + "</svg>"


def _hist_cell(
    x: float, y: float, w: float, h: float, hs: list[tuple[str, list[int]]], shade: dict[str, str], where: str
) -> list[str]:
    shares = [(lab, [c / max(sum(counts), 1) for c in counts]) for lab, counts in hs if counts and sum(counts)]
    if not shares:
        return [text(x + w / 2, y + h / 2 + 4, "no data", "middle", 10)]
    top = max(max(s) for _, s in shares) or 1.0
    out = []
    for k, (lab, s) in enumerate(shares):
        bw = w / len(s)
        pts = [f"{x:.1f},{y + h:.1f}"]
        for b, v in enumerate(s):
            yy = y + h - v / top * (h - 6)
            pts += [f"{x + b * bw:.1f},{yy:.1f}", f"{x + (b + 1) * bw:.1f},{yy:.1f}"]
        pts.append(f"{x + w:.1f},{y + h:.1f}")
        last = k == len(shares) - 1
        fill = f'fill="{shade[lab]}" fill-opacity="0.35"' if last else 'fill="none"'
        tip = f"{where}, {lab}: " + " ".join(f"{v:.0%}" for v in s)
        out.append(
            f'<polyline points="{" ".join(pts)}" {fill} stroke="{shade[lab]}" stroke-width="1.4">'
            f"<title>{esc(tip)}</title></polyline>"
        )
    return out


@dataclass
class Bar:
    """One bar: its label (under it), value, colour and tooltip."""

    label: str
    value: float
    color: str
    tip: str = ""


def bars(
    chart_id: str,
    title: str,
    items: list[Bar],
    y_label: str,
    y_range: tuple[float, float] | None = None,
    rule: tuple[float, str] | None = None,
    legend: list[tuple[str, str]] | None = None,
    values: bool = False,
) -> str:
    """Vertical bars with labels under them (turned when they do not fit), an optional horizontal rule (value,
    label), a legend of (name, colour), and with ``values`` each bar's value above it."""
    n = max(len(items), 1)
    bw = max(min(90, 760 / n), 9)
    left, top, plot_h = 56, 14, 180
    longest = max((len(b.label) for b in items), default=0)
    turn = longest * 6 > bw - 2  # labels that do not fit under their bar are turned
    label_h = 12 + 5.5 * longest if turn else 20
    width = left + bw * n + 24
    height = top + plot_h + label_h + 40
    lo, hi = y_range or (0.0, max([b.value for b in items if finite(b.value)] or [1.0]) * 1.08)
    box = Box(left, top, bw * n, plot_h, 0, n, lo, hi)
    out = [svg_open(chart_id, max(width, 420), height, title)]
    out += _y_axis(box)
    for k, b in enumerate(items):
        v = b.value if finite(b.value) else 0.0
        x, y0 = box.left + k * bw + 1.5, box.y(max(lo, min(v, hi)))
        out.append(
            f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw - 3:.1f}" height="{box.y(lo) - y0:.1f}" '
            f'fill="{b.color}"><title>{esc(b.tip or b.label)}: {fmt(b.value)}</title></rect>'
        )
        lx, ly = x + (bw - 3) / 2, box.top + plot_h + 12
        if values:
            out.append(text(lx, y0 - 4, fmt(b.value), "middle", 10))
        rot = f' transform="rotate(-55 {lx:.1f} {ly:.1f})"' if turn else ""
        out.append(text(lx, ly, b.label, "end" if turn else "middle", 10, rot))
    if rule is not None and lo <= rule[0] <= hi:
        ry = box.y(rule[0])
        out.append(
            f'<line x1="{box.left:.1f}" x2="{box.left + box.width:.1f}" y1="{ry:.1f}" y2="{ry:.1f}" '
            f'stroke="#c00" stroke-dasharray="6 3"/>'
        )
        out.append(text(box.left + box.width - 2, ry - 4, rule[1], "end", 10, fill="#c00"))
    out.append(text(14, top + plot_h / 2, y_label, "middle", 10, f' transform="rotate(-90 14 {top + plot_h / 2})"'))
    if legend:
        out += _legend([Series(name, [], c, line=False) for name, c in legend], left, height - 12, width)[0]
    return "".join(out) + "</svg>"
