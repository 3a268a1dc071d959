"""Plots for run comparison: retrieval quality against query latency.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through
pyplot, so plotting works headless, in threads, and leaves the caller's matplotlib backend alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DPI = 150


def _require(points: Sequence[Mapping[str, Any]], keys: Sequence[str], what: str) -> None:
    """Fail early, naming the point and the missing key, rather than plot a partial figure."""
    if not points:
        raise ValueError(f"{what}: no points to plot")
    for i, p in enumerate(points):
        missing = [k for k in keys if p.get(k) is None]
        if missing:
            raise ValueError(f"{what}: point {i} ({dict(p)!r}) lacks {missing}")


def _use_log_x(values: Sequence[float]) -> bool:
    """Latencies of exact vs approximate search span decades; a log axis keeps both readable."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and max(positive) / min(positive) >= 20


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def quality_vs_latency_figure(points: Sequence[Mapping[str, Any]]) -> Figure:
    """Build the quality-vs-latency figure (see :func:`plot_quality_vs_latency`).

    Args:
        points: dicts with ``mode``, ``ndcg_10``, ``latency_ms_p50`` and optionally ``recall_100``
            and ``label``.

    Returns:
        The matplotlib Figure (two panels when any point has ``recall_100``, else one).
    """
    _require(points, ("mode", "ndcg_10", "latency_ms_p50"), "plot_quality_vs_latency")
    panels = [("ndcg_10", "nDCG@10")]
    if any(p.get("recall_100") is not None for p in points):
        panels.append(("recall_100", "Recall@100"))
    fig = Figure(figsize=(6.0 * len(panels), 4.6), layout="constrained")
    by_mode: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in points:
        by_mode[str(p["mode"])].append(p)
    log_x = _use_log_x([float(p["latency_ms_p50"]) for p in points])
    for col, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        for i, (mode, pts) in enumerate(by_mode.items()):
            pts = sorted((p for p in pts if p.get(key) is not None), key=lambda p: float(p["latency_ms_p50"]))
            if not pts:
                continue
            xs = [float(p["latency_ms_p50"]) for p in pts]
            ys = [float(p[key]) for p in pts]
            ax.plot(xs, ys, marker="o", markersize=7, linewidth=1.2, color=f"C{i}", label=mode)
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(
                    f"{p.get('label') or mode}\n{y:.3f}", (x, y), xytext=(6, 6), textcoords="offset points",
                    fontsize=8, color=f"C{i}",
                )
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("median query latency (ms)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs latency")
        ax.grid(True, alpha=0.3, which="both")
        ax.margins(x=0.15, y=0.12)  # room for the annotations at the edges
        ax.legend(title="mode", fontsize=8, loc="best")
    return fig


def plot_quality_vs_latency(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot nDCG@10 and Recall@100 against median query latency, one colour per retrieval mode.

    Points of one mode (e.g. several index settings) are joined in latency order; each point is
    labelled with its ``label`` (default: the mode) and value.

    Args:
        points: dicts with ``mode``, ``ndcg_10``, ``latency_ms_p50`` and optionally ``recall_100``
            and ``label``.
        path: the PNG file to write (folders are created).

    Returns:
        The PNG path.

    Raises:
        ValueError: no points, or a point lacks a required key.
    """
    return _save(quality_vs_latency_figure(points), path)


def recall_vs_latency_sweep_figure(sweep: Sequence[Mapping[str, Any]]) -> Figure:
    """Build the parameter-sweep figure (see :func:`plot_recall_vs_latency_sweep`).

    Args:
        sweep: dicts with ``param``, ``value``, ``recall_10`` and ``latency_ms``.

    Returns:
        The matplotlib Figure.
    """
    _require(sweep, ("param", "value", "recall_10", "latency_ms"), "plot_recall_vs_latency_sweep")
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    by_param: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in sweep:
        by_param[str(row["param"])].append(row)
    for i, (param, rows) in enumerate(by_param.items()):
        rows = sorted(rows, key=lambda r: float(r["value"]))
        xs = [float(r["latency_ms"]) for r in rows]
        ys = [float(r["recall_10"]) for r in rows]
        ax.plot(xs, ys, marker="o", linewidth=1.2, color=f"C{i}", label=param)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{param}={r['value']}", (x, y), xytext=(5, -11), textcoords="offset points",
                        fontsize=8, color=f"C{i}")
    if _use_log_x([float(r["latency_ms"]) for r in sweep]):
        ax.set_xscale("log")
    ax.set_xlabel("query latency (ms)")
    ax.set_ylabel("Recall@10 (vs exact search)")
    ax.set_title("Recall@10 vs latency")
    ax.grid(True, alpha=0.3, which="both")
    ax.margins(x=0.12, y=0.1)
    ax.legend(title="parameter", fontsize=8, loc="best")
    return fig


def plot_recall_vs_latency_sweep(sweep: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot Recall@10 against latency for an ANN parameter sweep (efSearch, nprobe, ...).

    One line per parameter, points in increasing parameter value, each annotated ``param=value``.

    Args:
        sweep: dicts with ``param``, ``value``, ``recall_10`` and ``latency_ms``.
        path: the PNG file to write (folders are created).

    Returns:
        The PNG path.

    Raises:
        ValueError: an empty sweep, or a row lacks a required key.
    """
    return _save(recall_vs_latency_sweep_figure(sweep), path)
