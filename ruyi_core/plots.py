"""Charts as PNG files or bytes, drawn headless: each figure gets its own Agg canvas, never pyplot, whose figure
registry is process-global state (a long-lived process would keep every chart it drew)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path


def axes(width: float, height: float = 3.5):
    """A new figure of `width` x `height` inches at 100 dpi, and its one set of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png(fig, path: Path | None = None, dpi: float | None = None, crop: bool = False) -> bytes | None:
    """The figure as a PNG at `path`, or its bytes without one. Laid out tightly; `crop` instead trims the
    saved image to what is drawn (for charts without axes)."""
    fit = {"bbox_inches": "tight"} if crop else {}
    if not crop:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png", dpi=dpi, **fit)
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **fit)
    return buf.getvalue()


def curves(path: Path, x: Sequence, series: Mapping[str, Sequence], xlabel: str, ylabel: str, title: str,
           height: float = 3.5, dpi: float | None = None, **line) -> None:
    """One line per series over `x` (None values left as gaps), with a legend and a light grid."""
    fig, ax = axes(6, height)
    for label, ys in series.items():
        ax.plot(x, [float("nan") if y is None else y for y in ys], label=label, **line)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    png(fig, path, dpi)


def exit_losses(history: Sequence[dict], path: Path, title: str) -> None:
    """A training loss log's curves, one per exit: records with `step`, `exits` and `exit_points`."""
    series = {f"exit {p}": [h["exits"][k] for h in history] for k, p in enumerate(history[0]["exit_points"])}
    curves(path, [h["step"] for h in history], series, "step", "loss", title, height=3.6, dpi=110)
