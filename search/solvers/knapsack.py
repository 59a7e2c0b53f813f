"""`knapsack`: a fast multiple-choice knapsack solver for up to two additive budgets.

Each variable picks one option; the budgets are knapsack capacities. The solver works on the Lagrangian
relaxation, which decomposes by variable:

* one budget: per variable, the lower convex hull of its options in the (cost, objective) plane gives the
  only options a Lagrange multiplier can select, and the multipliers at which it moves from one hull vertex
  to the next (the hull slopes). Sorting all slopes once gives the exact LP/Lagrangian optimum for *every*
  capacity: a greedy walk down the sorted slopes until the budget holds. A Pareto sweep therefore builds the
  hulls once and answers each point with a binary search.
* two budgets: an outer one-dimensional search over the second multiplier (the dual is concave in it;
  tangent intersection, falling back to bisection), each step solving the one-budget case exactly.

The Lagrangian value is a lower bound on the optimum, so every solution carries a proven `gap`. The greedy
answer is polished by single-variable moves; when a gap remains and the problem is small, a depth-first
branch-and-bound with the Lagrangian bound closes it, and the solution is then `optimal`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from quant.cost import SUM_METRICS

from ..problem import AllocationProblem, InfeasibleBudget, canonical_metric
from ._greedy import improve, repair
from .base import CAPACITY, RawResult, Solution, Solver, normalised_rows, register_solver


@dataclass
class Hull:
    """Every variable's lower convex hull, as moves sorted by the multiplier at which they happen."""

    start: np.ndarray  # (G,) the objective-minimising option of each variable (cheapest among ties)
    base_cost: float  # total cost at `start`
    slope: np.ndarray  # (S,) multiplier of each move, non-decreasing
    var: np.ndarray  # (S,) variable it moves
    to: np.ndarray  # (S,) option it moves to
    rank: np.ndarray  # (S,) its position among that variable's moves (0, 1, ...)
    d_cost: np.ndarray  # (S,) the cost change of each move (negative)
    cum_cost: np.ndarray  # (S,) total cost after the moves up to and including this one


def build_hull(obj_t: np.ndarray, cost_t: np.ndarray, allowed_t: np.ndarray) -> Hull:
    """Walk each variable from its cheapest-objective option towards cheaper options along the lower hull.

    Arrays are transposed, (K, G): per-variable reductions then run over K contiguous vectors, which numpy
    does some fifty times faster than reducing the short last axis of a (G, K) array.
    """
    K, G = obj_t.shape
    r = np.arange(G)
    mins = obj_t.min(axis=0)
    start = np.where(obj_t <= mins, cost_t, np.inf).argmin(axis=0)
    cur = start.copy()
    last = np.full(G, -np.inf)
    active = np.ones(G, dtype=bool)
    parts: list[tuple[np.ndarray, ...]] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for rank in range(K - 1):
            c_cost, c_obj = cost_t[cur, r], obj_t[cur, r]
            cand = allowed_t & (cost_t < c_cost) & active
            slope = np.where(cand, (obj_t - c_obj) / (c_cost - cost_t), np.inf)
            # The first option at the smallest slope. Collinear options then take one move each; the
            # strictly increasing slopes below keep those moves in order.
            pick = slope.argmin(axis=0)
            best = slope[pick, r]
            has = best < np.inf
            idx = np.flatnonzero(has)
            if len(idx) == 0:
                break
            p = pick[idx]
            # A row's own moves must sort in order whatever the rounding: make its slopes strictly increase.
            s = np.maximum(best[idx], np.nextafter(last[idx], np.inf))
            parts.append((s, idx, p, np.full(len(idx), rank), cost_t[p, idx] - c_cost[idx]))
            last[idx] = s
            cur[idx] = p
            active = has
    base = float(cost_t[start, r].sum())
    if not parts:
        e = np.empty(0)
        ei = np.empty(0, dtype=np.int64)
        return Hull(start, base, e, ei, ei, ei, e, e)
    slope, var, to, rank, d_cost = (np.concatenate(p) for p in zip(*parts))
    order = np.argsort(slope)
    return Hull(
        start=start,
        base_cost=base,
        slope=slope[order],
        var=var[order],
        to=to[order],
        rank=rank[order],
        d_cost=d_cost[order],
        cum_cost=base + np.cumsum(d_cost[order]),
    )


def _apply(h: Hull, moves: np.ndarray) -> np.ndarray:
    """`h.start` with `moves` (positions in the sorted list; each row's moves a prefix of its own) applied."""
    x = h.start.copy()
    var, to, rank = h.var[moves], h.to[moves], h.rank[moves]
    for k in range(int(rank.max()) + 1 if len(rank) else 0):  # one move per row and rank: unambiguous
        m = rank == k
        x[var[m]] = to[m]
    return x


def hull_greedy(h: Hull, cap: float) -> tuple[np.ndarray, float, np.ndarray | None] | None:
    """The greedy allocation within `cap`, the optimal multiplier, and the "skip" alternative (or None);
    None when even the cheapest allocation is over `cap`.

    The greedy walks the moves down to the first one after which the cost fits: that last move is the
    LP's fractional one and can be much larger than needed (a big layer's whole downgrade). The skip
    alternative leaves that variable where it was and takes the next moves of the other variables instead,
    the classic second candidate of a multiple-choice knapsack greedy; it is a primal candidate only."""
    if h.base_cost <= cap:
        return h.start.copy(), 0.0, None
    i = int(np.searchsorted(-h.cum_cost, -cap, side="left"))  # first move after which the cost fits
    if i >= len(h.cum_cost):
        return None
    x = _apply(h, np.arange(i + 1))
    alt = None
    later = np.arange(i + 1, len(h.var))
    later = later[h.var[later] != h.var[i]]
    if len(later):
        before = h.cum_cost[i - 1] if i > 0 else h.base_cost
        cum = before + np.cumsum(h.d_cost[later])
        j = int(np.searchsorted(-cum, -cap, side="left"))
        if j < len(later):
            alt = _apply(h, np.concatenate([np.arange(i), later[: j + 1]]))
    return x, float(h.slope[i]), alt


def dual_value(obj_t: np.ndarray, rows_t: Sequence[np.ndarray], lams: Sequence[float], cap: float) -> float:
    """The Lagrangian lower bound (transposed arrays): the sum over variables of min_k obj + Σ lam·row,
    minus Σ lam·cap."""
    m = obj_t
    for a, lam in zip(rows_t, lams):
        if lam:
            m = m + lam * a
    return float(m.min(axis=0).sum() - cap * float(sum(lams)))


def branch_and_bound(
    obj: np.ndarray,
    rows: Sequence[np.ndarray],
    allowed: np.ndarray,
    cap: float,
    lams: Sequence[float],
    incumbent: np.ndarray,
    max_nodes: int,
) -> tuple[np.ndarray, bool]:
    """Depth-first search with the Lagrangian bound at fixed multipliers; (best, proven optimal)."""
    G, K = obj.shape
    r = np.arange(G)
    reduced = obj.copy()
    for a, lam in zip(rows, lams):
        reduced += lam * a
    const = -cap * float(sum(lams))
    min_red = reduced.min(axis=1)
    min_cost = [np.where(allowed, a, np.inf).min(axis=1) for a in rows]
    spread = np.where(allowed, reduced, -np.inf).max(axis=1) - min_red
    order = np.argsort(-spread, kind="stable")  # decide the most consequential variables first
    suf_red = np.concatenate([np.cumsum(min_red[order][::-1])[::-1], [0.0]]).tolist()
    suf_cost = [np.concatenate([np.cumsum(mc[order][::-1])[::-1], [0.0]]).tolist() for mc in min_cost]
    opts = [[int(k) for k in np.argsort(reduced[g]) if allowed[g, k]] for g in order]
    red_l = [reduced[g].tolist() for g in order]
    obj_l = [obj[g].tolist() for g in order]
    cost_l = [[a[g].tolist() for g in order] for a in rows]
    m = len(rows)

    best_val = float(obj[r, incumbent].sum())
    eps = 1e-12 * (1.0 + abs(best_val))
    best = [int(incumbent[g]) for g in order]
    cur = [0] * G
    nodes = 0
    aborted = False

    def dfs(d: int, acc_red: float, acc_cost: list[float], acc_obj: float) -> None:
        nonlocal best_val, best, nodes, aborted
        if d == G:
            if acc_obj < best_val - eps:
                best_val, best = acc_obj, list(cur)
            return
        nodes += 1
        if nodes > max_nodes:
            aborted = True
            return
        for k in opts[d]:
            bound = acc_red + red_l[d][k] + suf_red[d + 1] + const
            if bound >= best_val - eps:
                break  # options are in increasing reduced cost: the rest bound no lower
            new_cost = [acc_cost[j] + cost_l[j][d][k] for j in range(m)]
            if any(new_cost[j] + suf_cost[j][d + 1] > cap for j in range(m)):
                continue
            cur[d] = k
            dfs(d + 1, acc_red + red_l[d][k], new_cost, acc_obj + obj_l[d][k])
            if aborted:
                return

    dfs(0, 0.0, [0.0] * m, 0.0)
    x = np.empty(G, dtype=np.int64)
    x[order] = best
    return x, not aborted


@register_solver
class KnapsackSolver(Solver):
    """Lagrangian multiple-choice knapsack; see the module docstring.

    tol:           relative gap under which a solution counts as optimal
    dual_tol:      the two-budget multiplier search stops when the dual bound cannot rise by more than this
                   (relative); the reported gap stays a proven one either way
    max_iter:      outer iterations of the two-budget multiplier search
    core:          it bisects on until the allocations either side of the second budget differ in at
                   most this many variables, then tries every mix of them (2^core at most)
    bnb_max_vars:  run branch-and-bound to close a remaining gap only up to this many variables
    max_nodes:     node limit of that branch-and-bound (the gap stays reported when it is hit)
    """

    name = "knapsack"
    exact = False
    max_sum_budgets = 2

    def __init__(
        self,
        tol: float = 1e-9,
        dual_tol: float = 1e-6,
        max_iter: int = 40,
        core: int = 10,
        bnb_max_vars: int = 48,
        max_nodes: int = 50_000,
    ):
        self.tol = float(tol)
        self.dual_tol = float(dual_tol)
        self.core = int(core)
        self.max_iter = int(max_iter)
        self.bnb_max_vars = int(bnb_max_vars)
        self.max_nodes = int(max_nodes)
        self._mu_hint: float | None = None  # the last two-budget multiplier: a warm start within a sweep

    # --- one problem --------------------------------------------------------------------------------
    def _solve(self, problem: AllocationProblem) -> RawResult:
        obj, allowed = problem.objective, problem.allowed
        rows = [a for _, a in normalised_rows(problem)]
        if not rows:
            return RawResult(obj.argmin(axis=1), optimal=True, gap=0.0)
        obj_t, allowed_t = np.ascontiguousarray(obj.T), np.ascontiguousarray(allowed.T)
        rows_t = [np.ascontiguousarray(a.T) for a in rows]
        if len(rows) == 1:
            got = hull_greedy(build_hull(obj_t, rows_t[0], allowed_t), CAPACITY)
            if got is None:
                return RawResult(None)
            x, lam, alt = got
            dual = dual_value(obj_t, rows_t, [lam], CAPACITY)
            return self._polish(obj, rows, allowed, [x, alt], dual, [lam])
        return self._solve_two(obj, rows, allowed, obj_t, rows_t, allowed_t)

    def _polish(
        self,
        obj: np.ndarray,
        rows: list[np.ndarray],
        allowed: np.ndarray,
        candidates: Sequence[np.ndarray | None],
        dual: float,
        lams: Sequence[float],
    ) -> RawResult:
        """Improve each feasible candidate by single moves, keep the best, close the gap on small problems."""
        r = np.arange(obj.shape[0])
        best, val = None, np.inf
        for c in candidates:
            if c is None or any(float(a[r, c].sum()) > CAPACITY for a in rows):
                continue
            c = improve(obj, rows, CAPACITY, c)
            v = float(obj[r, c].sum())
            if v < val:
                best, val = c, v
        if best is None:
            return RawResult(None)
        x = best
        scale = 1.0 + abs(val)
        notes: list[str] = []
        if val - dual > self.tol * scale and len(x) <= self.bnb_max_vars:
            x, proven = branch_and_bound(obj, rows, allowed, CAPACITY, lams, x, self.max_nodes)
            val = float(obj[r, x].sum())
            if proven:
                return RawResult(x, optimal=True, gap=0.0, notes=["optimality proven by branch-and-bound"])
            notes.append(f"branch-and-bound stopped at {self.max_nodes} nodes")
        gap = max(val - dual, 0.0)
        return RawResult(x, optimal=gap <= self.tol * scale, gap=gap, notes=notes)

    def _solve_two(
        self,
        obj: np.ndarray,
        rows: list[np.ndarray],
        allowed: np.ndarray,
        obj_t: np.ndarray,
        rows_t: list[np.ndarray],
        allowed_t: np.ndarray,
    ) -> RawResult:
        a1_t, a2_t = rows_t
        a2 = rows[1]
        r = np.arange(obj.shape[0])
        cap = CAPACITY

        def inner(mu: float):
            o_t = obj_t + mu * a2_t if mu else obj_t
            got = hull_greedy(build_hull(o_t, a1_t, allowed_t), cap)
            if got is None:
                return None
            x, lam, alt = got
            alts.append(alt)
            g = dual_value(o_t, [a1_t], [lam], cap) - mu * cap
            return x, lam, g, float(a2[r, x].sum()) - cap

        best_x, best_val = None, np.inf
        best_dual, best_lams = -np.inf, (0.0, 0.0)
        alts: list[np.ndarray | None] = []

        def feasible_value(x: np.ndarray | None) -> float:
            if x is None or float(a2[r, x].sum()) > cap or float(rows[0][r, x].sum()) > cap:
                return np.inf
            return float(obj[r, x].sum())

        def consider(res, mu: float) -> None:
            nonlocal best_x, best_val, best_dual, best_lams
            x, lam, g, s = res
            if g > best_dual:
                best_dual, best_lams = g, (lam, mu)
            for cand in (x, alts[-1]):
                v = feasible_value(cand)
                if v < best_val:
                    best_x, best_val = cand, v

        res = inner(0.0)
        if res is None:
            return RawResult(None)
        consider(res, 0.0)
        x_lo = None
        if res[3] > 0:
            mu_lo, g_lo, s_lo, x_lo = 0.0, res[2], res[3], res[0]
            mu = self._mu_hint or self._mu_scale(obj_t, a2_t, allowed_t)
            hi = None
            for _ in range(80):
                res = inner(mu)
                consider(res, mu)
                if res[3] <= 0:
                    hi = (mu, res[2], res[3], res[0])
                    break
                mu_lo, g_lo, s_lo, x_lo = mu, res[2], res[3], res[0]
                mu *= 4.0
            if hi is not None:
                mu_hi, g_hi, s_hi, x_hi = hi
                side = 0
                dual_done = False
                for _ in range(self.max_iter):
                    scale = 1.0 + abs(best_dual)
                    if best_val - best_dual <= self.tol * scale:
                        break
                    # Two phases: raise the dual bound (tangent intersection, with bisection as the
                    # safeguard) until it cannot rise by more than dual_tol; then bisect on until the
                    # allocations on either side of the budget differ in a few variables only, so that the
                    # boundary search below sees every allocation between them.
                    mu_c = (g_hi - g_lo + s_lo * mu_lo - s_hi * mu_hi) / (s_lo - s_hi)
                    if not dual_done and g_lo + s_lo * (mu_c - mu_lo) - best_dual <= self.dual_tol * scale:
                        dual_done = True
                    if dual_done:
                        if int(np.count_nonzero(x_lo != x_hi)) <= self.core:
                            break
                        mu_c = 0.5 * (mu_lo + mu_hi)
                    elif not (mu_lo < mu_c < mu_hi) or abs(side) >= 2:
                        mu_c, side = 0.5 * (mu_lo + mu_hi), 0
                    res = inner(mu_c)
                    consider(res, mu_c)
                    if res[3] > 0:
                        mu_lo, g_lo, s_lo, x_lo = mu_c, res[2], res[3], res[0]
                        side = side + 1 if side > 0 else 1
                    else:
                        mu_hi, g_hi, s_hi, x_hi = mu_c, res[2], res[3], res[0]
                        side = side - 1 if side < 0 else -1
                    if mu_hi - mu_lo <= 1e-15 * max(mu_hi, 1.0):
                        break
                self._mu_hint = mu_hi
                got = self._boundary(obj, rows, x_lo, x_hi)
                if got is not None and got[1] < best_val:
                    best_x, best_val = got
        # The last infeasible Lagrangian point is often a few moves from a better feasible one.
        fixed = repair(obj, rows, cap, x_lo) if x_lo is not None else None
        if best_x is None and fixed is None:
            return RawResult(None)
        return self._polish(obj, rows, allowed, [best_x, fixed], best_dual, best_lams)

    def _boundary(
        self, obj: np.ndarray, rows: list[np.ndarray], x_lo: np.ndarray, x_hi: np.ndarray
    ) -> tuple[np.ndarray, float] | None:
        """Best feasible mix of two allocations that differ in a few variables (each takes either's option).

        Either side of the second budget's boundary the Lagrangian allocations differ only where the LP
        optimum is fractional or tied; trying every mix there is the integer rounding done exactly."""
        diff = np.flatnonzero(x_lo != x_hi)
        if len(diff) == 0 or len(diff) > min(self.core, 16):
            return None
        r = np.arange(len(x_hi))
        combos = (np.arange(1 << len(diff))[:, None] >> np.arange(len(diff))[None, :]) & 1  # (C, D) 0/1
        picks = np.where(combos == 1, x_lo[diff][None, :], x_hi[diff][None, :])  # (C, D) options
        rest = np.ones(len(r), dtype=bool)
        rest[diff] = False
        value = obj[r[rest], x_hi[rest]].sum() + obj[diff[None, :], picks].sum(axis=1)
        ok = np.ones(len(combos), dtype=bool)
        for a in rows:
            ok &= a[r[rest], x_hi[rest]].sum() + a[diff[None, :], picks].sum(axis=1) <= CAPACITY
        if not ok.any():
            return None
        i = int(np.argmin(np.where(ok, value, np.inf)))
        x = x_hi.copy()
        x[diff] = picks[i]
        return x, float(value[i])

    @staticmethod
    def _mu_scale(obj_t: np.ndarray, a_t: np.ndarray, allowed_t: np.ndarray) -> float:
        """A first multiplier on the right scale: objective spread per unit of normalised cost spread."""
        hi_o = np.where(allowed_t, obj_t, -np.inf).max(axis=0)
        num = float((hi_o - obj_t.min(axis=0)).sum())
        den = float(
            (
                np.where(allowed_t, a_t, -np.inf).max(axis=0) - np.where(allowed_t, a_t, np.inf).min(axis=0)
            ).sum()
        )
        return num / den if den > 0 and num > 0 else 1.0

    # --- sweeps ------------------------------------------------------------------------------------------
    def sweep(
        self, problem: AllocationProblem, metric: str, limits: Sequence[float]
    ) -> list[Solution | None]:
        """With the swept budget the only additive one, the hulls are built once for the whole sweep."""
        m = canonical_metric(metric)
        others = [b for b in problem.sum_budgets if b.metric != m]
        if m not in SUM_METRICS or others:
            self._mu_hint = None
            return super().sweep(problem, m, limits)
        p0 = problem.without_budget(m)
        try:
            p0.check_budgets()  # a peak budget no allocation meets leaves no point feasible
        except InfeasibleBudget:
            return [None] * len(limits)
        obj, allowed = p0.objective, p0.allowed
        scale = float(np.abs(np.where(allowed, p0.costs[m], 0.0)).sum(axis=1).max()) or 1.0
        a = np.where(allowed, p0.costs[m] / scale, 0.0)
        obj_t, a_t = np.ascontiguousarray(obj.T), np.ascontiguousarray(a.T)
        t0 = time.perf_counter()
        hull = build_hull(obj_t, a_t, np.ascontiguousarray(allowed.T))
        setup = time.perf_counter() - t0
        out: list[Solution | None] = []
        for i, limit in enumerate(limits):
            t1 = time.perf_counter()
            p = p0.with_budget(m, float(limit))
            cap = CAPACITY * float(limit) / scale
            got = hull_greedy(hull, cap)
            if got is None:
                out.append(None)
                continue
            x, lam, alt = got
            row = a * (CAPACITY / cap)  # costs / limit: capacity CAPACITY, like every other solver
            dual = dual_value(obj_t, [a_t], [lam], cap)
            raw = self._polish(obj, [row], allowed, [x, alt], dual, [lam * cap / CAPACITY])
            out.append(self._finish(p, raw, time.perf_counter() - t1 + (setup if i == 0 else 0.0)))
        return out
