"""Bit allocation: one option per layer under a byte budget, minimising the summed damage (docs/METHODS.md §9).

The problem is a multiple-choice knapsack. :func:`solve_milp` solves it exactly
with ``scipy.optimize.milp`` (HiGHS, ``mip_rel_gap=0``); :func:`solve_greedy`
is the fallback above ``milp_max_vars`` binaries or when the MILP hits its time
limit, and reports its gap to the LP-relaxation bound (it is never called
optimal). Constraints (:mod:`qflow.quant.allocate_rules`) either remove options
from layers (``re:.*v_proj >= 4``) or cap the distinct values of an attribute
(``distinct_group_sizes <= 2``).

Example::

    problem = Problem(["a", "b"], [4096, 4096], [[Option(2, 64, 1280, 1.0), Option(4, 64, 2304, 0.1)], ...])
    solution = allocate(problem, budget_bytes=3000)
    solution.choice   # option index per layer
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .allocate_rules import DistinctRule


@dataclass(frozen=True)
class Option:
    bits: int
    group_size: int
    nbytes: int           # exactly what the IR stores (qflow.quant.ir.layer_nbytes)
    damage: float


@dataclass(frozen=True)
class Problem:
    layers: list[str]
    n_weights: list[int]
    options: list[list[Option]]   # per layer, at least one

    @property
    def total_weights(self) -> int:
        return sum(self.n_weights)

    def restricted(self, keep) -> "Problem":
        """The problem with only the options for which ``keep(layer_index, option)`` is true."""
        return replace(self, options=[[o for o in opts if keep(i, o)] for i, opts in enumerate(self.options)])


@dataclass
class Solution:
    choice: list[int]             # option index per layer (into Problem.options[li])
    nbytes: int
    damage: float
    solver: str                   # "milp" or "greedy"
    optimal: bool
    lp_bound: float | None = None
    gap: float | None = None      # (damage - lp_bound) / max(|lp_bound|, tiny): 0 for a proven optimum
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def options(self, problem: Problem) -> list[Option]:
        return [problem.options[li][k] for li, k in enumerate(self.choice)]

    def bpw(self, problem: Problem) -> float:
        return 8.0 * self.nbytes / problem.total_weights


def _evaluate(problem: Problem, choice: list[int]) -> tuple[int, float]:
    opts = [problem.options[li][k] for li, k in enumerate(choice)]
    return sum(o.nbytes for o in opts), float(sum(o.damage for o in opts))


def _distinct_subsets(problem: Problem, distinct: list[DistinctRule]):
    """Every way to keep at most ``max_count`` values per distinct rule, as a restricted problem."""
    per_rule = []
    for rule in distinct:
        values = sorted({getattr(o, rule.attr) for opts in problem.options for o in opts})
        k = min(rule.max_count, len(values))
        per_rule.append([(rule.attr, set(c)) for c in itertools.combinations(values, k)])
    for combo in itertools.product(*per_rule) if per_rule else [()]:
        sub = problem.restricted(lambda li, o, combo=combo: all(getattr(o, a) in vals for a, vals in combo))
        if all(sub.options):
            yield sub


def minimum_bytes(problem: Problem, distinct: list[DistinctRule] = ()) -> int | None:
    """The smallest total size any feasible assignment reaches (None: the rules leave none)."""
    best = None
    for sub in _distinct_subsets(problem, list(distinct)):
        size = sum(min(o.nbytes for o in opts) for opts in sub.options)
        best = size if best is None else min(best, size)
    return best


def maximum_useful_bytes(problem: Problem) -> int:
    """Total size when every layer takes its largest option (a budget above it changes nothing)."""
    return sum(max(o.nbytes for o in opts) for opts in problem.options)


# ---- MILP ------------------------------------------------------------------------------

def _milp_arrays(problem: Problem, budget_bytes: int, distinct: list[DistinctRule],
                 caps: list[tuple[int, int]] = ()):
    from scipy.optimize import LinearConstraint
    from scipy.sparse import coo_matrix

    offsets = np.cumsum([0] + [len(o) for o in problem.options])
    n_x = int(offsets[-1])
    flat = [o for opts in problem.options for o in opts]
    # y variables: one per (distinct rule, value): is the value used at all
    y_index: dict[tuple[int, int], int] = {}
    for r, rule in enumerate(distinct):
        for v in sorted({getattr(o, rule.attr) for o in flat}):
            y_index[(r, v)] = n_x + len(y_index)
    n = n_x + len(y_index)
    # damage scaled to O(1): HiGHS' absolute tolerances would otherwise dominate tiny damages
    damages = np.array([o.damage for o in flat], dtype=np.float64)
    scale = float(np.abs(damages).max()) or 1.0
    c = np.zeros(n)
    c[:n_x] = damages / scale
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(entries, lower, upper):
        r = len(lo)
        for j, v in entries:
            rows.append(r), cols.append(j), vals.append(v)
        lo.append(lower), hi.append(upper)

    for li in range(len(problem.options)):
        add([(j, 1.0) for j in range(offsets[li], offsets[li + 1])], 1.0, 1.0)
    sizes = np.array([o.nbytes for o in flat], dtype=np.float64)
    add([(j, sizes[j]) for j in range(n_x)], -np.inf, float(budget_bytes))
    for r, rule in enumerate(distinct):
        for j, o in enumerate(flat):
            add([(j, 1.0), (y_index[(r, getattr(o, rule.attr))], -1.0)], -np.inf, 0.0)
        add([(y, 1.0) for (rr, _), y in y_index.items() if rr == r], -np.inf, float(rule.max_count))
    for max_bits, max_count in caps:   # at most max_count layers at bits <= max_bits (plan refinement)
        add([(j, 1.0) for j, o in enumerate(flat) if o.bits <= max_bits], -np.inf, float(max_count))
    a = coo_matrix((vals, (rows, cols)), shape=(len(lo), n)).tocsr()
    return c, scale, n_x, offsets, LinearConstraint(a, np.array(lo), np.array(hi))


@contextlib.contextmanager
def _stdout_to_stderr():
    """HiGHS (scipy's MILP solver) may print diagnostics on file descriptor 1 from C++, which would corrupt
    ``qflow run --json``'s stdout: send fd 1 to stderr while it runs."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):   # no real stdout (an embedding host): nothing to guard
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def lp_bound(problem: Problem, budget_bytes: int, distinct: list[DistinctRule] = ()) -> float:
    """The LP relaxation's optimum: no assignment within the budget has a smaller damage."""
    from scipy.optimize import Bounds, milp

    c, scale, _, _, cons = _milp_arrays(problem, budget_bytes, list(distinct))
    with _stdout_to_stderr():
        res = milp(c, integrality=np.zeros_like(c), bounds=Bounds(0, 1), constraints=[cons])
    if res.status != 0:
        raise RuntimeError(f"LP relaxation failed: {res.message}")
    return float(res.fun) * scale


def solve_milp(problem: Problem, budget_bytes: int, distinct: list[DistinctRule] = (),
               time_limit_seconds: float | None = None, caps: list[tuple[int, int]] = ()) -> Solution | None:
    """The exact optimum (None when the time limit is hit before any solution or the budget is infeasible).

    ``caps``: ``(max_bits, max_count)`` pairs, at most ``max_count`` layers at ``bits <= max_bits``
    (the candidates of plan refinement, docs/METHODS.md §9.1)."""
    from scipy.optimize import Bounds, milp

    t0 = time.perf_counter()
    c, scale, n_x, offsets, cons = _milp_arrays(problem, budget_bytes, list(distinct), list(caps))
    options = {"mip_rel_gap": 0.0}
    if time_limit_seconds is not None:
        options["time_limit"] = float(time_limit_seconds)
    with _stdout_to_stderr():
        res = milp(c, integrality=np.ones_like(c), bounds=Bounds(0, 1), constraints=[cons], options=options)
    if res.x is None:
        return None
    x = np.round(res.x[:n_x]).astype(int)
    choice = []
    for li in range(len(problem.options)):
        picked = np.flatnonzero(x[offsets[li]:offsets[li + 1]])
        if len(picked) != 1:  # re-verify the rounding (docs/METHODS.md §9)
            return None
        choice.append(int(picked[0]))
    nbytes, damage = _evaluate(problem, choice)
    if nbytes > budget_bytes:
        return None
    opts = [problem.options[li][k] for li, k in enumerate(choice)]
    if any(sum(o.bits <= b for o in opts) > n for b, n in caps):
        return None
    optimal = res.status == 0
    notes = [] if optimal else [f"MILP stopped early ({res.message}); best solution found"]
    sol = Solution(choice, nbytes, damage, "milp", optimal, seconds=time.perf_counter() - t0, notes=notes)
    if optimal:
        sol.lp_bound, sol.gap = damage, 0.0
    return sol


# ---- greedy ------------------------------------------------------------------------------

def _greedy_one(problem: Problem, budget_bytes: int) -> list[int] | None:
    """docs/METHODS.md §9 greedy on one problem (no distinct rules): cheapest start, best damage-per-byte upgrades."""
    frontier = []   # per layer: option indices not dominated in (size, damage), by size
    for opts in problem.options:
        order = sorted(range(len(opts)), key=lambda k: (opts[k].nbytes, opts[k].damage))
        kept = []
        for k in order:
            if not kept or opts[k].damage < opts[kept[-1]].damage:
                kept.append(k)
        frontier.append(kept)
    choice = [f[0] for f in frontier]
    used = sum(problem.options[li][k].nbytes for li, k in enumerate(choice))
    if used > budget_bytes:
        return None
    while True:
        best = None
        for li, kept in enumerate(frontier):
            cur = problem.options[li][choice[li]]
            for k in kept:
                o = problem.options[li][k]
                extra = o.nbytes - cur.nbytes
                gain = cur.damage - o.damage
                if extra <= 0 or gain <= 0 or used + extra > budget_bytes:
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, li, k, extra)
        if best is None:
            return choice
        _, li, k, extra = best
        choice[li] = k
        used += extra


def solve_greedy(problem: Problem, budget_bytes: int, distinct: list[DistinctRule] = (),
                 with_bound: bool = True) -> Solution | None:
    """The greedy fallback, best over the allowed value subsets of the distinct rules; gap to the LP bound."""
    t0 = time.perf_counter()
    best = None
    for sub in _distinct_subsets(problem, list(distinct)):
        sub_choice = _greedy_one(sub, budget_bytes)
        if sub_choice is None:
            continue
        # map back to indices of the full problem
        choice = [problem.options[li].index(sub.options[li][k]) for li, k in enumerate(sub_choice)]
        nbytes, damage = _evaluate(problem, choice)
        if best is None or damage < best[1]:
            best = (choice, damage, nbytes)
    if best is None:
        return None
    choice, damage, nbytes = best
    sol = Solution(choice, nbytes, damage, "greedy", optimal=False, seconds=time.perf_counter() - t0)
    if with_bound:
        sol.lp_bound = lp_bound(problem, budget_bytes, distinct)
        sol.gap = (damage - sol.lp_bound) / max(abs(sol.lp_bound), 1e-12)
    return sol


# ---- the entry point -----------------------------------------------------------------------

class InfeasibleBudget(ValueError):
    """The budget is below the smallest size any allowed assignment reaches."""

    def __init__(self, budget_bytes: int, minimum: int | None):
        self.budget_bytes, self.minimum = budget_bytes, minimum
        super().__init__(f"budget {budget_bytes} bytes < minimum feasible {minimum} bytes")


def allocate(problem: Problem, budget_bytes: int, distinct: list[DistinctRule] = (), *, solver: str = "auto",
             milp_max_vars: int = 20000, time_limit_seconds: float | None = 60.0) -> Solution:
    """Solve with ``solver`` (auto: MILP up to ``milp_max_vars`` binaries, else greedy); InfeasibleBudget if none fits."""
    distinct = list(distinct)
    minimum = minimum_bytes(problem, distinct)
    if minimum is None or budget_bytes < minimum:
        raise InfeasibleBudget(budget_bytes, minimum)
    n_vars = sum(len(o) for o in problem.options)
    use_milp = solver == "milp" or (solver == "auto" and n_vars <= milp_max_vars)
    if use_milp:
        sol = solve_milp(problem, budget_bytes, distinct, time_limit_seconds)
        if sol is not None and sol.optimal:
            return sol
        greedy = solve_greedy(problem, budget_bytes, distinct)
        if sol is not None and greedy is not None and sol.damage <= greedy.damage:
            sol.lp_bound, sol.gap = greedy.lp_bound, (sol.damage - greedy.lp_bound) / max(abs(greedy.lp_bound), 1e-12)
            return sol
        if greedy is None:
            raise RuntimeError("neither the MILP nor the greedy fallback found an assignment above the minimum")
        greedy.notes.append("MILP hit its time limit; greedy fallback used")
        return greedy
    sol = solve_greedy(problem, budget_bytes, distinct)
    if sol is None:
        raise RuntimeError("greedy found no assignment above the minimum feasible budget")
    sol.notes.append(f"{n_vars} options > milp_max_vars {milp_max_vars}: greedy fallback" if solver == "auto"
                     else "solver: greedy")
    return sol


def budget_bytes_for_bpw(bpw: float, n_weights: int) -> int:
    """The byte budget of ``bpw`` bits per weight over ``n_weights`` (rounded down to whole bytes)."""
    return math.floor(bpw * n_weights / 8 * (1 + 1e-12))


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(size, damage) points no other point dominates; sorted by size, duplicates collapsed (docs/METHODS.md §9)."""
    front: list[tuple[int, float]] = []
    for size, damage in sorted(set(points)):
        if not front or damage < front[-1][1]:
            front.append((size, damage))
    return front
