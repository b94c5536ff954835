"""Figures of the evaluation report (matplotlib, Agg canvas; no pyplot, no global state).

Example::

    sqnr_chart(rows, out / "layer_sqnr.png")
    kl_histogram(kl, out / "kl_hist.png", {"kl_mean": 0.01})
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 5: "#17becf", 6: "#9467bd", 8: "#2ca02c"}
PROTOCOL_MARKERS = "osD^vP*X"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _finite_cap(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return (max(finite) if finite else 0.0) + 10.0


def sqnr_chart(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per-layer output SQNR bars (isolated) in network order, colored by bits; accumulated as dots."""
    fig = _figure(max(8.0, min(24.0, 0.06 * len(rows) + 6)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if not rows:
        ax.text(0.5, 0.5, "no quantized layers", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    x = np.arange(len(rows))
    iso = [r["isolated_sqnr_db"] for r in rows]
    acc = [r["accumulated_sqnr_db"] for r in rows]
    cap = _finite_cap(iso + acc)
    iso_plot = [v if math.isfinite(v) else cap for v in iso]
    acc_plot = [v if math.isfinite(v) else cap for v in acc]
    colors = [BIT_COLORS.get(int(r["bits"]), "#7f7f7f") for r in rows]
    ax.bar(x, iso_plot, color=colors, width=0.85, linewidth=0)
    ax.plot(x, acc_plot, ".", color="black", markersize=3, label="accumulated")
    worst = [r["index"] for r in rows if r.get("worst_rank")]
    if worst:
        ax.plot(worst, [iso_plot[i] for i in worst], "v", color="black", markersize=6, fillstyle="none",
                label="worst 10 (isolated)")
    if any(not math.isfinite(v) for v in iso + acc):
        ax.axhline(cap, color="#999999", linestyle=":", linewidth=1)
        ax.text(0, cap, " inf", va="bottom", fontsize=8, color="#555555")
    # label the first linear of every decoder block
    ticks, labels, last_block = [], [], None
    for r in rows:
        parts = r["layer"].split(".")
        block = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"), None)
        if block != last_block:
            ticks.append(r["index"])
            labels.append(block if block is not None else r["layer"])
            last_block = block
    step = max(1, len(ticks) // 30)
    ax.set_xticks(ticks[::step], labels[::step], fontsize=7)
    ax.set_xlabel("decoder block (layers in network order)")
    ax.set_ylabel("output SQNR, isolated (dB)")
    ax.set_xlim(-1, len(rows))
    from matplotlib.patches import Patch

    handles = [Patch(color=BIT_COLORS.get(b, "#7f7f7f"), label=f"{b}-bit") for b in sorted({int(r["bits"]) for r in rows})]
    h2, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + h2, fontsize=8, loc="lower right", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def kl_histogram(kl: np.ndarray | None, path: Path, stats: dict[str, float], *, kind: str = "exact") -> Path:
    """Histogram of per-token KL(p_fp ‖ p_q), log10 scale, with mean / median / p99 marked.

    ``kind``: ``"exact"`` (full vocabulary; marks ``kl_*``) or ``"topk"`` (the top-k lower-bound
    estimate; marks ``kl_topk_*``). The axis label says which.
    """
    if kind not in ("exact", "topk"):
        raise ValueError(f"kind must be 'exact' or 'topk', got {kind!r}")
    prefix = "kl_topk_" if kind == "topk" else "kl_"
    what = "top-k estimate, lower bound" if kind == "topk" else "exact, full vocabulary"
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    kl = np.asarray(kl, dtype=np.float64).reshape(-1) if kl is not None else np.zeros(0)
    positive = kl[kl > 0]
    if positive.size == 0:
        msg = "KL not computed (kl_exact: false, topk: 0)" if kl.size == 0 else \
            f"KL ({what}) = 0 for all {kl.size} tokens"
        ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    floor = max(positive.min(), 1e-12)
    ax.hist(np.log10(np.clip(kl, floor, None)), bins=60, color="#1f77b4", alpha=0.85)
    for stat, style in (("mean", "-"), ("median", "--"), ("p99", ":")):
        v = stats.get(prefix + stat)
        if v and v > 0:
            ax.axvline(math.log10(v), color="black", linestyle=style, linewidth=1, label=f"{stat} {v:.3g}")
    ax.set_xlabel(f"log10 KL(p_fp ‖ p_q) per token, {what} (nats)")
    ax.set_ylabel("tokens")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_scatter(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], highlight: Sequence[int],
                   groups: Sequence[str], path: Path, *, xlabel: str, ylabel: str,
                   x_dir: str = "min", y_dir: str = "min", title: str = "") -> Path:
    """Scatter with the 2-D Pareto front of (x, y) of each group drawn as a step line.

    ``highlight`` (e.g. the members of the N-D Pareto set) are drawn in red, the rest in grey;
    each group (evaluation protocol, or "mixed" / "uniform" series) gets its own marker and its own front.
    """
    from .pareto import pareto_front

    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    marked = set(highlight)
    uniq = list(dict.fromkeys(groups))
    for g_i, g in enumerate(uniq):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        marker = PROTOCOL_MARKERS[g_i % len(PROTOCOL_MARKERS)]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], marker=marker, s=36,
                   c=["#d62728" if i in marked else "#7f7f7f" for i in idx],
                   label=(g if len(uniq) > 1 else None), zorder=3)
        front = pareto_front([{"x": xs[i], "y": ys[i]} for i in idx], {"x": x_dir, "y": y_dir})
        pts = sorted((xs[idx[k]], ys[idx[k]]) for k in front)
        if len(pts) > 1:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post" if x_dir == "min" else "pre",
                    color="#d62728", linewidth=1.1, alpha=0.8, zorder=2,
                    label="2-D front" if g_i == 0 else None)
    for i, label in enumerate(labels):
        ax.annotate(label, (xs[i], ys[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if ys and all(y > 0 for y in ys) and max(ys) / max(min(ys), 1e-300) > 100:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)
