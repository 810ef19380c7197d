"""Figures the stages write as PNG files and log to MLflow.

PNGs because `dvc plots show` renders its data plots with Vega fetched from a CDN, so its
HTML draws nothing offline, while image plots are shown as they are; and because a line per
series (per model, per adapter) is what a loss plot needs, which DVC's templates cannot split
out of one CSV.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from bdc.jsonl import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_figure(rows: Iterable[Mapping], series: str, x: str = "step", y: str = "loss",
                ylabel: str = "loss", title: str | None = None):
    """One line per value of ``rows[series]``."""
    plt = _pyplot()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name in sorted({r[series] for r in rows}, key=str):
        points = sorted((r[x], r[y]) for r in rows if r[series] == name)
        ax.plot(*zip(*points, strict=True), label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if rows:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def bar_figure(values: Mapping[str, float], xlabel: str, title: str | None = None):
    """Horizontal bars, one per key, in the mapping's order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(3, len(values)) + 0.8))
    names = list(values)
    ax.barh(names, [values[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` atomically (a half-written PNG never looks like a plot) and close it."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _pyplot().close(fig)
    return path
