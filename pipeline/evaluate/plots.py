"""The evaluation report's PNG plots, as bytes: a reconstruction grid, the per-group KL histogram, code usage.

Charts use matplotlib when it is importable (`pip install matplotlib`) and otherwise a small PIL drawing
of the same content (axes, ticks, bars or a line, a reference line), so a bare install still gets plots.
The reconstruction grid is always drawn with PIL.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKENDS = ("auto", "matplotlib", "pil")
MAX_BARS = 80


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _use_matplotlib(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "matplotlib" and not have_matplotlib():
        raise ImportError("matplotlib is not installed")
    return backend == "matplotlib" or (backend == "auto" and have_matplotlib())


# --- the three report plots ---------------------------------------------------------------------------------


def reconstruction_grid(
    columns: Sequence[np.ndarray],
    labels: Sequence[str] = ("original", "continuous", "GQ"),
    min_tile: int = 128,
) -> bytes:
    """A PNG of rows of images side by side under column labels; `columns` are uint8 (n, H, W, 3) arrays
    (e.g. originals, continuous and GQ reconstructions). Small images are enlarged (nearest) to `min_tile`."""
    n, h, w = columns[0].shape[:3]
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw, gap, head = h * scale, w * scale, 4, 20
    canvas = Image.new("RGB", (len(columns) * (tw + gap) + gap, head + n * (th + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, (images, label) in enumerate(zip(columns, labels)):
        x = gap + c * (tw + gap)
        draw.text((x + 2, 4), label, fill="black", font=font)
        for r in range(n):
            tile = Image.fromarray(images[r]).resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, head + gap + r * (th + gap)))
    return _png(canvas)


def kl_histogram(
    counts: np.ndarray,
    bin_bits: float,
    *,
    target_bits: float,
    lo: float,
    hi: float,
    backend: str = "auto",
) -> bytes:
    """Histogram of per-group KL (bits) from fine bin counts of width `bin_bits` starting at 0 (the last
    count: values beyond the bins, folded into the last bar), rebinned to at most MAX_BARS bars over the
    observed [lo, hi], with a line at the target log2 K."""
    counts = np.asarray(counts, np.int64).copy()
    counts[-2] += counts[-1]
    counts = counts[:-1]
    first = int(max(0, math.floor(min(lo, target_bits - 1) / bin_bits)))
    last = int(min(len(counts), math.ceil(max(hi, target_bits + 1) / bin_bits) + 1))
    fine = counts[first:last]
    factor = max(1, math.ceil(len(fine) / MAX_BARS))
    fine = np.pad(fine, (0, (-len(fine)) % factor))
    bars = fine.reshape(-1, factor).sum(1)
    edges = (first + factor * np.arange(len(bars) + 1)) * bin_bits
    title = f"per-group KL (bits); target log2 K = {target_bits:g}"
    return histogram(
        bars, edges, title=title, xlabel="KL (bits)", ylabel="groups", vline=target_bits, backend=backend
    )


def code_usage(code_counts: np.ndarray, *, backend: str = "auto") -> bytes:
    """The used codes sorted by how often they occur (rank-frequency), with the count a uniform use of all K
    codes would give each (tokens / K) as a red line."""
    sorted_counts = np.sort(np.asarray(code_counts, np.int64))[::-1]
    k, n = len(sorted_counts), int(sorted_counts.sum())
    used = int((sorted_counts > 0).sum())
    title = f"code usage: {used} of {k} codes used ({used / k:.1%}) by {n} tokens; red: uniform {n / k:.3g}"
    return line(
        sorted_counts[: max(used, 1)],
        title=title,
        xlabel="code rank (used codes)",
        ylabel="count",
        hline=n / k,
        backend=backend,
    )


# --- generic charts ----------------------------------------------------------------------------------------


def histogram(
    bars: np.ndarray,
    edges: np.ndarray,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    vline: float | None = None,
    backend: str = "auto",
) -> bytes:
    """Bars of heights `bars` between `edges` (len(bars) + 1), optional vertical reference line."""
    if _use_matplotlib(backend):
        fig, ax = _figure()
        ax.bar(edges[:-1], bars, width=np.diff(edges), align="edge", color="#4c72b0")
        if vline is not None:
            ax.axvline(vline, color="#c44e52", linewidth=1.5)
        return _mpl_png(fig, ax, title, xlabel, ylabel)
    chart = _Chart(
        title, xlabel, ylabel, (float(edges[0]), float(edges[-1])), (0.0, float(max(bars.max(), 1)))
    )
    for left, right, height in zip(edges[:-1], edges[1:], bars):
        chart.rect(float(left), float(right), float(height))
    if vline is not None:
        chart.vline(float(vline))
    return chart.png()


def line(
    values: np.ndarray,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hline: float | None = None,
    backend: str = "auto",
) -> bytes:
    """values[i] against i, optional horizontal reference line."""
    x = np.arange(len(values))
    if _use_matplotlib(backend):
        fig, ax = _figure()
        ax.plot(x, values, color="#4c72b0", linewidth=1.0)
        ax.fill_between(x, values, color="#4c72b0", alpha=0.3)
        if hline is not None:
            ax.axhline(hline, color="#c44e52", linewidth=1.0)
        return _mpl_png(fig, ax, title, xlabel, ylabel)
    top = float(max(values.max() if len(values) else 1, hline or 0, 1))
    chart = _Chart(title, xlabel, ylabel, (0.0, float(max(len(values) - 1, 1))), (0.0, top))
    chart.polyline(x, values)
    if hline is not None:
        chart.hline(float(hline))
    return chart.png()


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    return fig, fig.add_subplot()


def _mpl_png(fig, ax, title: str, xlabel: str, ylabel: str) -> bytes:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) inside [lo, hi], about `target` of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


class _Chart:
    """A minimal PIL chart: a framed plot area with 5 ticks per axis, mapping data to pixels."""

    W, H = 640, 400
    LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44
    BLUE, RED = (76, 114, 176), (196, 78, 82)

    def __init__(
        self, title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float]
    ):
        self.image = Image.new("RGB", (self.W, self.H), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.x0, self.x1 = xr if xr[1] > xr[0] else (xr[0], xr[0] + 1)
        self.y0, self.y1 = yr if yr[1] > yr[0] else (yr[0], yr[0] + 1)
        self.box = (self.LEFT, self.TOP, self.W - self.RIGHT, self.H - self.BOTTOM)
        d, (left, _, right, bottom) = self.draw, self.box
        d.text((left, 8), title, fill="black", font=self.font)
        d.text(((left + right) // 2 - 3 * len(xlabel), self.H - 16), xlabel, fill="black", font=self.font)
        d.text((4, 8), ylabel, fill="black", font=self.font)
        for xv in nice_ticks(self.x0, self.x1):
            px = self.px(xv, self.y0)[0]
            d.line([(px, bottom), (px, bottom + 4)], fill="black")
            d.text((px - 12, bottom + 6), f"{xv:.6g}", fill="black", font=self.font)
        for yv in nice_ticks(self.y0, self.y1):
            py = self.px(self.x0, yv)[1]
            d.line([(left - 4, py), (left, py)], fill="black")
            d.text((4, py - 6), f"{yv:.6g}", fill="black", font=self.font)
        d.rectangle(self.box, outline="black")

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (
            left + (x - self.x0) / (self.x1 - self.x0) * (right - left),
            bottom - (y - self.y0) / (self.y1 - self.y0) * (bottom - top),
        )

    def rect(self, x_left: float, x_right: float, height: float) -> None:
        if height <= 0:
            return
        (xa, ya), (xb, yb) = self.px(x_left, height), self.px(x_right, self.y0)
        self.draw.rectangle([xa, ya, max(xa, xb - 1), yb], fill=self.BLUE)

    def polyline(self, xs: np.ndarray, ys: np.ndarray) -> None:
        if len(xs) > 4 * self.W:  # one point per quarter pixel is plenty
            step = math.ceil(len(xs) / (4 * self.W))
            xs, ys = xs[::step], ys[::step]
        points = [self.px(float(x), float(y)) for x, y in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=self.BLUE, width=2)

    def vline(self, x: float) -> None:
        px = self.px(x, self.y0)[0]
        self.draw.line([(px, self.box[1]), (px, self.box[3])], fill=self.RED, width=2)

    def hline(self, y: float) -> None:
        py = self.px(self.x0, y)[1]
        self.draw.line([(self.box[0], py), (self.box[2], py)], fill=self.RED, width=1)

    def png(self) -> bytes:
        return _png(self.image)
