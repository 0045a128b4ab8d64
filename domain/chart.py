"""A signal's last hour against its thresholds, drawn twice from one geometry: as SVG for the
status page (inline, no script, no font or style from anywhere else) and as PNG for Slack.

Pure: a `Chart` in (minutes and values, `None` for a minute without a value, the warning and
critical lines, a title and a unit), a string or bytes out. Both renderings place everything
with the same `Layout`, so a point on the threshold sits exactly on the threshold's line in
either. Minutes without a value break the line (a gap, never a line drawn across it).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from PIL import Image, ImageDraw, ImageFont

WIDTH = 760
HEIGHT = 300
# The plot inside the picture: room for the title above, the values left, the times below.
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 52, 34
FONT_SIZE = 12
TITLE_SIZE = 14
PNG_SCALE = 2  # Slack shows pictures scaled down: draw at twice the size, crisp on any screen

# Colours (RGB hex): the signal, the two thresholds, the breach side of the warning line.
INK = "#111827"
MUTED = "#6b7280"
GRID = "#e5e7eb"
SIGNAL = "#1f4e9e"
SIGNAL_FAINT = "#a9bddf"  # the values the rule does not judge (too few samples)
WARNING = "#d97706"
CRITICAL = "#c8102e"
WARNING_SHADE = "#fdf3e2"
CRITICAL_SHADE = "#fbe5e7"
BACKGROUND = "#ffffff"
TIME_LABEL_EVERY_MINUTES = 15
# Values this far out are drawn at the edge of the plot (a steady baseline's drift is 1e9 sd).
VALUE_LIMIT = 1e12


@dataclass(frozen=True)
class Chart:
    title: str
    points: Sequence[tuple[datetime, float | None]]  # one per minute, oldest first
    unit: str = ""  # appended to every number shown ("%", " s", "x")
    warning: float | None = None
    critical: float | None = None
    above: bool = True  # True: values above the lines are bad; False: below them
    subtitle: str = ""
    # Drawn thin and pale under `points`: every value there is, also those the rule does not
    # judge (a minute with too few samples), for context. Same minutes as `points`, or empty.
    faint: Sequence[tuple[datetime, float | None]] = ()

    @property
    def values(self) -> list[float]:
        return [v for _, v in self.points if v is not None and _finite(v)]

    @property
    def faint_values(self) -> list[float]:
        return [v for _, v in self.faint if v is not None and _finite(v)]

    @property
    def thresholds(self) -> list[tuple[str, float, str]]:
        """(name, value, colour) of each line there is: warning first."""
        found = []
        if self.warning is not None and _finite(self.warning):
            found.append(("warning", self.warning, WARNING))
        if self.critical is not None and _finite(self.critical):
            found.append(("critical", self.critical, CRITICAL))
        return found


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and abs(value) < VALUE_LIMIT


def _nice_step(span: float, ticks: int = 4) -> float:
    """1, 2 or 5 times a power of ten: about `ticks` steps over `span`."""
    raw = span / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0):
        if raw <= factor * power:
            return factor * power
    return 10.0 * power


@dataclass(frozen=True)
class Layout:
    """Where things go: the plot's box, the value range and the time range."""

    chart: Chart
    low: float
    high: float
    step: float
    width: int = WIDTH
    height: int = HEIGHT

    @classmethod
    def of(cls, chart: Chart) -> Layout:
        known = chart.values + chart.faint_values + [value for _, value, _ in chart.thresholds]
        low, high = min([0.0, *known]), max([0.0, *known])
        if high - low <= 0:
            high = low + 1.0
        step = _nice_step((high - low) * 1.08)  # some headroom above the highest line or point
        low = math.floor(low / step) * step
        high = math.ceil(high * 1.05 / step) * step if high > 0 else math.ceil(high / step) * step
        if high <= low:
            high = low + step
        return cls(chart, low, high, step)

    @property
    def left(self) -> float:
        return LEFT

    @property
    def right(self) -> float:
        return self.width - RIGHT

    @property
    def top(self) -> float:
        return TOP

    @property
    def bottom(self) -> float:
        return self.height - BOTTOM

    def x(self, index: int) -> float:
        count = len(self.chart.points)
        if count <= 1:
            return (self.left + self.right) / 2
        return self.left + (self.right - self.left) * index / (count - 1)

    def y(self, value: float) -> float:
        clamped = min(max(value, self.low), self.high)
        share = (clamped - self.low) / (self.high - self.low)
        return self.bottom - (self.bottom - self.top) * share

    def ticks(self) -> list[float]:
        count = round((self.high - self.low) / self.step)
        return [self.low + i * self.step for i in range(count + 1)]

    def decimals(self) -> int:
        return max(0, -math.floor(math.log10(self.step) + 1e-9))

    def number(self, value: float) -> str:
        decimals = self.decimals()
        shown = f"{value:.{decimals}f}"
        if shown.startswith("-") and float(shown) == 0:
            shown = shown[1:]
        return f"{shown}{self.chart.unit}"

    def segments(self, faint: bool = False) -> list[list[tuple[float, float]]]:
        """The signal as runs of consecutive minutes with a value (the gaps are the breaks)."""
        runs: list[list[tuple[float, float]]] = []
        current: list[tuple[float, float]] = []
        for index, (_, value) in enumerate(self.chart.faint if faint else self.chart.points):
            if not _finite(value):
                if current:
                    runs.append(current)
                current = []
                continue
            assert value is not None
            current.append((self.x(index), self.y(value)))
        if current:
            runs.append(current)
        return runs

    def time_labels(self) -> list[tuple[float, str]]:
        labels = []
        for index, (minute, _) in enumerate(self.chart.points):
            if minute.minute % TIME_LABEL_EVERY_MINUTES == 0:
                labels.append((self.x(index), f"{minute:%H:%M}"))
        return labels

    def breach_bands(self) -> list[tuple[float, float, str]]:
        """(top y, bottom y, colour) beyond each line, warning first: where the signal breaches."""
        shades = {"warning": WARNING_SHADE, "critical": CRITICAL_SHADE}
        bands = []
        for name, value, _ in self.chart.thresholds:
            line = self.y(value)
            top, bottom = (self.top, line) if self.chart.above else (line, self.bottom)
            bands.append((top, bottom, shades[name]))
        return bands

    def label_offset(self, name: str) -> int:
        """A threshold's label sits on the side of its line away from the other line: above
        the higher of the two, below the lower."""
        lines = dict((n, v) for n, v, _ in self.chart.thresholds)
        other = "warning" if name == "critical" else "critical"
        if other not in lines:
            return -4
        return -4 if lines[name] >= lines[other] else FONT_SIZE + 2


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _f(value: float) -> str:
    return f"{value:.1f}"


def render_svg(chart: Chart) -> str:
    """The chart as a standalone SVG element (inline in HTML, or a file of its own)."""
    layout = Layout.of(chart)
    left, right, top, bottom = layout.left, layout.right, layout.top, layout.bottom
    description = describe(chart)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="pagerloop-chart" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{_e(description)}" font-family="DejaVu Sans, Arial, sans-serif" '
        f'font-size="{FONT_SIZE}">',
        f"<title>{_e(description)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="{BACKGROUND}"/>',
        f'<text class="title" x="{LEFT}" y="20" font-size="{TITLE_SIZE}" font-weight="bold" '
        f'fill="{INK}">{_e(chart.title)}</text>',
    ]
    if chart.subtitle:
        parts.append(
            f'<text class="subtitle" x="{LEFT}" y="38" fill="{MUTED}">{_e(chart.subtitle)}</text>'
        )
    for band_top, band_bottom, shade in layout.breach_bands():
        parts.append(
            f'<rect class="breach" x="{_f(left)}" y="{_f(band_top)}" width="{_f(right - left)}" '
            f'height="{_f(band_bottom - band_top)}" fill="{shade}"/>'
        )
    for tick in layout.ticks():
        y = _f(layout.y(tick))
        parts.append(
            f'<line class="grid" x1="{_f(left)}" y1="{y}" x2="{_f(right)}" y2="{y}" '
            f'stroke="{GRID}" stroke-width="1"/>'
            f'<text class="tick" x="{_f(left - 6)}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle" fill="{MUTED}">{_e(layout.number(tick))}</text>'
        )
    for at_x, label in layout.time_labels():
        parts.append(
            f'<line class="grid" x1="{_f(at_x)}" y1="{_f(top)}" x2="{_f(at_x)}" '
            f'y2="{_f(bottom)}" stroke="{GRID}" stroke-width="1"/>'
            f'<text class="time" x="{_f(at_x)}" y="{_f(bottom + 18)}" text-anchor="middle" '
            f'fill="{MUTED}">{_e(label)}</text>'
        )
    parts.append(
        f'<text class="time" x="{_f(right)}" y="{_f(bottom + 32)}" text-anchor="end" '
        f'font-size="10" fill="{MUTED}">UTC</text>'
    )
    parts.append(
        f'<path class="axis" d="M{_f(left)},{_f(top)} V{_f(bottom)} H{_f(right)}" '
        f'fill="none" stroke="{MUTED}" stroke-width="1"/>'
    )
    for name, value, colour in chart.thresholds:
        line_y = layout.y(value)
        label = f"{name} {layout_threshold(layout, value)}"
        parts.append(
            f'<line class="threshold {name}" data-threshold="{name}" data-value="{value!r}" '
            f'x1="{_f(left)}" y1="{_f(line_y)}" x2="{_f(right)}" y2="{_f(line_y)}" '
            f'stroke="{colour}" stroke-width="2" stroke-dasharray="6 4"/>'
            f'<text class="threshold-label {name}" x="{_f(right - 4)}" '
            f'y="{_f(line_y + layout.label_offset(name))}" text-anchor="end" fill="{colour}" '
            f'font-weight="bold">{_e(label)}</text>'
        )
    for run in layout.segments(faint=True):
        if len(run) > 1:
            points = " ".join(f"{_f(x)},{_f(y)}" for x, y in run)
            parts.append(
                f'<polyline class="signal-faint" points="{points}" fill="none" '
                f'stroke="{SIGNAL_FAINT}" stroke-width="1"/>'
            )
    for run in layout.segments():
        if len(run) == 1:
            dot_x, dot_y = run[0]
            parts.append(
                f'<circle class="signal" cx="{_f(dot_x)}" cy="{_f(dot_y)}" r="2.5" '
                f'fill="{SIGNAL}"/>'
            )
        else:
            points = " ".join(f"{_f(x)},{_f(y)}" for x, y in run)
            parts.append(
                f'<polyline class="signal" points="{points}" fill="none" stroke="{SIGNAL}" '
                f'stroke-width="2" stroke-linejoin="round" stroke-linecap="round"/>'
            )
    if not chart.values and not chart.faint_values:
        parts.append(
            f'<text class="empty" x="{_f((left + right) / 2)}" y="{_f((top + bottom) / 2)}" '
            f'text-anchor="middle" fill="{MUTED}">no data in this hour</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def layout_threshold(layout: Layout, value: float) -> str:
    """A threshold as its label shows it: with as many decimals as it needs (2.5%, not 3%)."""
    text = f"{value:.6g}"
    if "e" in text:
        return layout.number(value)
    return f"{text}{layout.chart.unit}"


def describe(chart: Chart) -> str:
    """One line saying what the chart shows (its title for screen readers, Slack's alt text)."""
    parts = [chart.title]
    if chart.subtitle:
        parts.append(chart.subtitle)
    if chart.thresholds:
        lines = ", ".join(f"{name} {value:.6g}{chart.unit}" for name, value, _ in chart.thresholds)
        parts.append(f"bad {'above' if chart.above else 'below'} {lines}")
    last = next((v for _, v in reversed(chart.points) if v is not None and _finite(v)), None)
    parts.append(f"latest {last:.4g}{chart.unit}" if last is not None else "no data")
    return " · ".join(parts)


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def render_png(chart: Chart, scale: int = PNG_SCALE) -> bytes:
    """The same chart as a PNG (WIDTH x HEIGHT times `scale`), drawn with Pillow."""
    layout = Layout.of(chart)
    image = Image.new("RGB", (WIDTH * scale, HEIGHT * scale), _rgb(BACKGROUND))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE * scale)
    small = ImageFont.load_default(size=10 * scale)
    title_font = ImageFont.load_default(size=TITLE_SIZE * scale)

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale, y * scale

    left, right, top, bottom = layout.left, layout.right, layout.top, layout.bottom
    draw.text(at(LEFT, 20), chart.title, fill=_rgb(INK), font=title_font, anchor="ls")
    if chart.subtitle:
        draw.text(at(LEFT, 38), chart.subtitle, fill=_rgb(MUTED), font=font, anchor="ls")
    for band_top, band_bottom, shade in layout.breach_bands():
        draw.rectangle([at(left, band_top), at(right, band_bottom)], fill=_rgb(shade))
    for tick in layout.ticks():
        y = layout.y(tick)
        draw.line([at(left, y), at(right, y)], fill=_rgb(GRID), width=scale)
        draw.text(at(left - 6, y), layout.number(tick), fill=_rgb(MUTED), font=font, anchor="rm")
    for x, label in layout.time_labels():
        draw.line([at(x, top), at(x, bottom)], fill=_rgb(GRID), width=scale)
        draw.text(at(x, bottom + 18), label, fill=_rgb(MUTED), font=font, anchor="ms")
    draw.text(at(right, bottom + 32), "UTC", fill=_rgb(MUTED), font=small, anchor="rs")
    draw.line([at(left, top), at(left, bottom), at(right, bottom)], fill=_rgb(MUTED), width=scale)
    for name, value, colour in chart.thresholds:
        y = layout.y(value)
        x = left
        while x < right:  # dashes of 6, gaps of 4, as the SVG's stroke-dasharray
            draw.line([at(x, y), at(min(x + 6, right), y)], fill=_rgb(colour), width=2 * scale)
            x += 10
        label = f"{name} {layout_threshold(layout, value)}"
        draw.text(
            at(right - 4, y + layout.label_offset(name)),
            label,
            fill=_rgb(colour),
            font=font,
            anchor="rs",
        )
    for run in layout.segments(faint=True):
        if len(run) > 1:
            draw.line([at(x, y) for x, y in run], fill=_rgb(SIGNAL_FAINT), width=scale)
    for run in layout.segments():
        if len(run) == 1:
            x, y = at(*run[0])
            r = 2.5 * scale
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_rgb(SIGNAL))
        else:
            draw.line([at(x, y) for x, y in run], fill=_rgb(SIGNAL), width=2 * scale, joint="curve")
    if not chart.values and not chart.faint_values:
        draw.text(
            at((left + right) / 2, (top + bottom) / 2),
            "no data in this hour",
            fill=_rgb(MUTED),
            font=font,
            anchor="mm",
        )
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
