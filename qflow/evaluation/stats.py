"""Small statistics shared by the evaluation: cosine, paired bootstrap (SQNR: qflow/quant/sqnr.py).

Example::

    cosine(torch.tensor([1., 0.]), torch.tensor([1., 1.]))     # 0.7071
    paired_bootstrap_ci(q, fp, lambda q, fp: q.mean() - fp.mean(), rng)
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch


def cosine(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """``⟨y,ŷ⟩ / (‖y‖‖ŷ‖)`` over the flattened tensors (1.0 for two zero tensors)."""
    a, b = y.double().reshape(-1), y_hat.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def fmt_db(value: float) -> str:
    """SQNR for tables: ``"inf"`` for identical tensors, otherwise 2 decimals."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2f}"


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap_ci(per_window_q: np.ndarray, per_window_ref: np.ndarray,
                        statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        rng: np.random.Generator, *, n_resamples: int = 1000,
                        level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap over windows: resample window indices (with replacement) once per replicate
    and apply ``statistic(q[idx], ref[idx])`` to both series with the *same* indices.

    ``statistic`` receives ``[n_resamples, n_windows]`` arrays and returns ``[n_resamples]``.
    """
    q = np.asarray(per_window_q, dtype=np.float64)
    ref = np.asarray(per_window_ref, dtype=np.float64)
    n = q.shape[0]
    if n == 0:
        return math.nan, math.nan
    idx = rng.integers(0, n, size=(n_resamples, n))
    return percentile_ci(np.asarray(statistic(q[idx], ref[idx]), dtype=np.float64), level)


def ppl_diff_ci(window_nll_q: np.ndarray, window_nll_fp: np.ndarray, rng: np.random.Generator,
                **kw) -> tuple[float, float]:
    """CI of ``PPL_q − PPL_fp`` with PPL = exp(mean NLL); windows carry equal token counts."""
    return paired_bootstrap_ci(window_nll_q, window_nll_fp,
                               lambda q, fp: np.exp(q.mean(1)) - np.exp(fp.mean(1)), rng, **kw)


def mean_ci(window_means: np.ndarray, rng: np.random.Generator, **kw) -> tuple[float, float]:
    """CI of the token mean of a per-window quantity (e.g. KL) by resampling windows."""
    w = np.asarray(window_means, dtype=np.float64)
    return paired_bootstrap_ci(w, w, lambda a, _: a.mean(1), rng, **kw)
