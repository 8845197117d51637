"""Line charts as inline SVG.

Drawn by the train stage (plots/loss.svg, the curves as an image beside their points) and by the promotion
report. No plotting library: a few lines of SVG open in any browser."""

from __future__ import annotations

import html

COLORS = ("#1f5fbf", "#d0352b")  # first and second line: distinct for the colour-blind too (blue, red)
WIDTH, HEIGHT, MARGIN = 560, 260, 48


def line_chart(series: list[tuple[str, str, list[tuple[int, float]]]], label: str) -> str:
    """An SVG line chart: (name, colour, [(step, value)]) per line, steps on x, values on y, with gridlines.

    Styled by its own attributes, so it is the same alone in a file and inside a page."""
    steps = [step for _, _, curve in series for step, _ in curve]
    values = [value for _, _, curve in series for _, value in curve]
    x0, x1, y0, y1 = min(steps), max(steps), min(values), max(values)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or abs(y0) or 1
    inner_w, inner_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def at(step: float, value: float) -> tuple[float, float]:
        return MARGIN + (step - x0) / span_x * inner_w, MARGIN + (y1 - value) / span_y * inner_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
             f'aria-label="{html.escape(label)}" font-family="sans-serif" font-size="11">']  # fmt: skip
    for tick in range(5):
        value = y0 + span_y * tick / 4
        y = at(x0, value)[1]
        parts.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{MARGIN - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    for step in (x0, x1):
        x = at(step, y0)[0]
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - MARGIN + 18}" text-anchor="middle">step {step}</text>')
    for index, (name, colour, curve) in enumerate(series):
        if curve:
            coords = [at(step, value) for step, value in curve]
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline points="{points}" stroke="{colour}" fill="none" stroke-width="2.5"/>')
            parts.append(f'<circle cx="{coords[-1][0]:.1f}" cy="{coords[-1][1]:.1f}" r="3" fill="{colour}"/>')
        legend_y = 16 + 16 * index
        parts.append(f'<rect x="{WIDTH - 170}" y="{legend_y - 9}" width="14" height="4" fill="{colour}"/>')
        parts.append(f'<text x="{WIDTH - 150}" y="{legend_y - 3}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"
