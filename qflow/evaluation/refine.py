"""Measured plan refinement for ``allocate-bits`` (docs/METHODS.md §9.1).

The MILP minimises a *sum* of per-layer damage estimates. Each estimate prices one
layer quantized alone; many low-bit layers together can hurt far more than the sum
of their prices, and the MILP is drawn to exactly the options whose prices are the
most optimistic. Refinement keeps the MILP but lets measurement decide how much of
that interaction risk to take:

1. the unrefined plan uses ``n0`` layers at its lowest width ``b``;
2. candidate plans are the MILP optima under the same budget with at most ``c``
   layers at ``bits <= b``, for caps ``c`` spread from ``n0`` down to 0
   (:func:`cap_schedule`), i.e. points on the lower envelope of predicted damage
   vs the number of low-bit layers;
3. every candidate is quantized with round to nearest on its options' own grids and
   its mean exact KL to the float model is measured on calibration windows
   (:class:`PlanMeter`); further rounds try the caps midway between the best cap and
   its measured neighbours (:func:`bisect_caps`);
4. the candidate with the smallest measured KL is the plan. The unrefined plan is
   one of the candidates, so the chosen plan never measures worse than it on these
   windows.

Example::

    meter = PlanMeter(float_model, calib_ids[:8], batch_size=4)
    result = refine_plan(problem, budget, [], base, meter, spec_of, n_candidates=4, rounds=2)
    result.chosen.solution.choice
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from qflow.quant import dispatch
from qflow.quant.allocate import Option, Problem, Solution, solve_milp
from qflow.quant.spec import QuantSpec


@dataclass
class Candidate:
    label: str                     # "unrefined" or "bits<=2 x<=6"
    cap: int | None                # None: the unrefined plan
    solution: Solution
    n_low: int                     # layers at bits <= the refined width
    measured_kl: float = float("nan")
    seconds: float = 0.0           # quantize + forward passes + KL of this candidate
    round: int = 0

    def row(self, problem: Problem) -> dict:
        return {"label": self.label, "round": self.round, "cap": self.cap, "n_low": self.n_low,
                "bpw": self.solution.bpw(problem), "bytes": self.solution.nbytes,
                "predicted_damage": self.solution.damage, "measured_kl": self.measured_kl,
                "seconds": self.seconds, "optimal": self.solution.optimal}


@dataclass
class RefineResult:
    chosen: Candidate
    candidates: list[Candidate]
    low_bits: int | None           # the width whose count was capped (None: nothing to refine)
    n0: int                        # the unrefined plan's count at bits <= low_bits
    skipped: list[str] = field(default_factory=list)   # caps with no plan (infeasible / time limit)
    seconds: float = 0.0           # the whole refinement (model load, float logits, candidates)

    @property
    def unrefined(self) -> Candidate:
        return self.candidates[0]


class PlanMeter:
    """Mean exact KL(p_float || p_plan) of whole plans on fixed windows: the float logits once, then per plan
    one round-to-nearest pass over the planned layers and one forward pass over the windows (weights restored)."""

    def __init__(self, model, ids: torch.Tensor, batch_size: int):
        from .sensitivity import float_logits

        self.model, self.ids, self.batch_size = model, ids, batch_size
        self.reference = float_logits(model, ids, batch_size)
        self._float: dict[str, torch.Tensor] = {}

    def kl(self, specs: dict[str, QuantSpec]) -> float:
        from .sensitivity import mean_kl_to

        try:
            with torch.no_grad():
                for name, spec in specs.items():
                    module = self.model.get_submodule(name)
                    if name not in self._float:
                        self._float[name] = module.weight.detach().clone()
                    module.weight.copy_(dispatch.fake_quant(self._float[name].float(), spec).to(module.weight.dtype))
            return mean_kl_to(self.model, self.ids, self.reference, self.batch_size)
        finally:
            self.restore()

    def restore(self) -> None:
        with torch.no_grad():
            for name, w in self._float.items():
                self.model.get_submodule(name).weight.copy_(w)


def cap_schedule(n0: int, n_candidates: int) -> list[int]:
    """Caps of the ``n_candidates - 1`` capped candidates: ``n0 * (1 - k / (K - 1))`` rounded, k = 1..K-1
    (so the last is 0), distinct, below ``n0``, largest first."""
    k_max = n_candidates - 1
    caps = [round(n0 * (1 - k / k_max)) for k in range(1, k_max + 1)]
    return sorted({c for c in caps if c < n0}, reverse=True)


def bisect_caps(measured: dict[int, float], n0: int) -> list[int]:
    """The caps midway between the best measured cap and its nearest measured neighbours on either
    side (``n0``, the unrefined plan, counts as measured), not measured yet."""
    tried = sorted(measured)
    best = min(tried, key=lambda c: (measured[c], c))
    i = tried.index(best)
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(tried):
            mid = (best + tried[j]) // 2 if tried[j] > best else (best + tried[j] + 1) // 2
            if mid not in measured and min(best, tried[j]) < mid < max(best, tried[j]):
                out.append(mid)
    return [c for c in out if c <= n0]


def _count_low(options: list[Option], low_bits: int) -> int:
    return sum(o.bits <= low_bits for o in options)


def refine_plan(problem: Problem, budget_bytes: int, distinct, base: Solution, meter: PlanMeter,
                spec_of: Callable[[Option], QuantSpec], *, n_candidates: int, rounds: int,
                time_limit_seconds: float | None = None, progress=None) -> RefineResult:
    """Measure the unrefined plan ``base`` and the capped MILP candidates; return the one with the smallest
    measured KL (ties: the unrefined plan, then the larger cap). ``progress(candidate)`` is called after each."""

    def measure(cand: Candidate) -> Candidate:
        t0 = time.perf_counter()
        cand.measured_kl = meter.kl({n: spec_of(o) for n, o in zip(problem.layers, cand.solution.options(problem))})
        cand.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(cand)
        return cand

    base_opts = base.options(problem)
    widths = sorted({o.bits for opts in problem.options for o in opts})
    low_bits = min(o.bits for o in base_opts)
    unrefined = measure(Candidate("unrefined", None, base, _count_low(base_opts, low_bits)))
    if low_bits == widths[-1]:   # every layer at the widest option: no lower width to trade away
        return RefineResult(unrefined, [unrefined], None, unrefined.n_low)
    n0 = unrefined.n_low
    candidates, skipped = [unrefined], []
    measured = {n0: unrefined.measured_kl}

    def solve(cap: int, round_: int) -> None:
        sol = solve_milp(problem, budget_bytes, distinct, time_limit_seconds, caps=[(low_bits, cap)])
        if sol is None:
            skipped.append(f"bits<={low_bits} x<={cap}: no plan within the budget (or the MILP time limit)")
            measured[cap] = float("inf")
            return
        cand = measure(Candidate(f"bits<={low_bits} x<={cap}", cap, sol, _count_low(sol.options(problem), low_bits),
                                 round=round_))
        candidates.append(cand)
        measured[cap] = cand.measured_kl

    for cap in cap_schedule(n0, n_candidates):
        solve(cap, 1)
    for r in range(2, rounds + 1):
        new = bisect_caps(measured, n0)
        if not new:
            break
        for cap in new:
            solve(cap, r)
    chosen = min(candidates, key=lambda c: (c.measured_kl, c.cap is not None, -(c.cap or 0)))
    return RefineResult(chosen, candidates, low_bits, n0, skipped)
