"""Figures of mixed precision: damage heatmap, estimator vs measured KL, budget-vs-damage Pareto curve.

Example::

    damage_heatmap(layers, option_labels, matrix, out / "damage_heatmap.png")
    estimator_vs_kl(estimates, measured, rho, out / "estimator_vs_kl.png")
    pareto_curve([(4.1, 0.2), (4.6, 0.05)], out / "pareto.png", chosen=(4.1, 0.2))
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .plots import _figure, _save


def damage_heatmap(layers: list[str], options: list[str], matrix: np.ndarray, path: Path, estimator: str) -> Path:
    """``log10(damage)`` of every (layer, option); grey where the option does not fit the layer (NaN)."""
    fig = _figure(max(6.0, 0.5 * len(options) + 3), max(3.0, min(40.0, 0.16 * len(layers) + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = np.log10(np.where(matrix > 0, matrix, np.nan))
    finite = shown[np.isfinite(shown)]
    img = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis", interpolation="nearest",
                    vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(options)), options, rotation=60, fontsize=7, ha="right")
    step = max(1, len(layers) // 60)
    ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=6)
    ax.set_xlabel("option (bits / group size)")
    ax.set_title(f"estimated damage ({estimator}), log10")
    fig.colorbar(img, ax=ax, fraction=0.04)
    return _save(fig, path)


def estimator_vs_kl(estimates: list[float], measured: list[float], rho: float, path: Path, estimator: str) -> Path:
    """Scatter of the estimator's damage against the measured single-layer KL (log-log where positive)."""
    fig = _figure(5.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(estimates, measured, "o", markersize=4, color="#1f77b4")
    if estimates and min(estimates) > 0 and min(measured) > 0:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"estimated damage ({estimator})")
    ax.set_ylabel("measured KL, single layer quantized (nats/token)")
    rho_text = "n/a" if math.isnan(rho) else f"{rho:.3f}"
    ax.set_title(f"Spearman rank correlation {rho_text} ({len(estimates)} layer/option samples)")
    return _save(fig, path)


def pareto_curve(points: list[tuple[float, float]], path: Path, chosen: tuple[float, float] | None = None) -> Path:
    """Predicted summed damage against the budget (bits per weight over the quantized linears)."""
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if points:
        x, y = zip(*sorted(points))
        ax.plot(x, y, "o-", markersize=4, color="#1f77b4", label="optimal plan per budget")
    if chosen is not None:
        ax.plot([chosen[0]], [chosen[1]], "*", markersize=12, color="#d62728", label="chosen plan")
    if points and min(p[1] for p in points) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight, quantized linears (as stored)")
    ax.set_ylabel("predicted damage (sum over layers)")
    ax.legend(fontsize=8)
    return _save(fig, path)
