"""Inline SVG line plots: no script, no external file, readable from file:// anywhere."""

from __future__ import annotations

from html import escape
from typing import Mapping, Sequence

# Colour-blind-safe (Okabe-Ito); methods beyond eight reuse colours but keep their labels.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 12, 12, 32
INSET = 16  # keeps the first and last versions' points and labels off the axes
LEGEND_ROW = 16

Point = tuple[float, float]


def fmt(value: float) -> str:
    return f"{value:.3g}"


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:  # one value still needs a visible, centred range
        pad = abs(low) * 0.1 or 0.5
        return low - pad, high + pad
    return low, high


def line_plot(title: str, series: Mapping[str, Sequence[Point]], width: int = 420, height: int = 200) -> str:
    """One polyline per series over shared axes; x values are labelled as catalog versions.

    Every point also carries a <title>, so hovering shows its exact value.
    """
    points = [p for line in series.values() for p in line]
    if not points:
        return ""
    x_low, x_high = _span([x for x, _ in points])
    y_low, y_high = _span([y for _, y in points])
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM

    def sx(x: float) -> float:
        return MARGIN_LEFT + INSET + (x - x_low) / (x_high - x_low) * (plot_w - 2 * INSET)

    def sy(y: float) -> float:
        return MARGIN_TOP + (y_high - y) / (y_high - y_low) * plot_h

    bottom, right = MARGIN_TOP + plot_h, MARGIN_LEFT + plot_w
    parts = [f'<line class="axis" x1="{MARGIN_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
             f'<line class="axis" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{bottom}"/>']
    for x in sorted({x for x, _ in points}):
        parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{bottom + 14}" text-anchor="middle">v{x:g}</text>')
    for y in (y_low, (y_low + y_high) / 2, y_high):
        parts.append(f'<text class="tick" x="{MARGIN_LEFT - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{fmt(y)}</text>')

    legend_y = height + 4
    for i, (name, line) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        label = escape(name)
        ordered = sorted(line)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
        parts.append(f'<polyline class="series" data-series="{label}" points="{coords}" stroke="{colour}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                  f"<title>{label} v{x:g}: {fmt(y)}</title></circle>" for x, y in ordered]
        row_y = legend_y + i * LEGEND_ROW
        parts.append(f'<line x1="{MARGIN_LEFT}" y1="{row_y + 8}" x2="{MARGIN_LEFT + 18}" y2="{row_y + 8}" '
                     f'stroke="{colour}" stroke-width="3"/>'
                     f'<text class="legend" x="{MARGIN_LEFT + 24}" y="{row_y + 12}">{label}</text>')
    total_h = legend_y + len(series) * LEGEND_ROW + 4
    return (f'<svg class="plot" role="img" aria-label="{escape(title)}" width="{width}" height="{total_h}" '
            f'viewBox="0 0 {width} {total_h}"><title>{escape(title)}</title>{"".join(parts)}</svg>')
