"""`lp`: OMPQ's linear program (Ma et al., "OMPQ: Orthogonal Mixed Precision Quantization", AAAI 2023).

OMPQ does not minimise a predicted loss. It gives each layer an importance θ_l from the network's
orthogonality (θ_l = exp(-β Σ_{j≠l} ORM_lj), computed by `sensitivity.orthogonality` and stored per layer in
`table.extra["orthogonality_importance"]`) and solves

    maximise  Σ_l c_l · b_l / 8        with c_l = mean(θ_l, ..., θ_L)   (a layer also carries the importance
                                                                        of the layers after it)
    subject to the budgets,  b_l in the bit range

as a linear program over relaxed bit-widths, then rounds. Here the relaxation is the exact convex hull of each
layer's options (one weight y[l, k] in [0, 1] per option, Σ_k y = 1), every budget of the problem is a row,
and rounding takes each layer's heaviest option, then repairs any overshoot and fills leftover budget greedily
on the same proxy. An option's "bits" are its weight bits, plus its activation bits when the options differ in
activation bits (floats count as 16), both over 8 as in OMPQ.

Without an orthogonality importance in the table, θ is derived from the table's values (the layer's mean
loss increase over its options, scaled to [0, 1]) and the solution says so. The reported objective is always
the problem's (predicted loss) so that solvers can be compared; the solver is never `optimal` for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quant.errors import BitsearchError

from ..problem import AllocationProblem
from ._greedy import improve, repair
from .base import CAPACITY, RawResult, Solver, normalised_rows, register_solver

IMPORTANCE_KEY = "orthogonality_importance"


def _importance_from_table(problem: AllocationProblem) -> tuple[np.ndarray | None, str]:
    raw: Any = (problem.table.extra or {}).get(IMPORTANCE_KEY)
    if raw is None:
        return None, ""
    names = problem.layer_names
    if isinstance(raw, dict):
        missing = [n for n in names if n not in raw]
        if missing:
            raise BitsearchError(f"the table's {IMPORTANCE_KEY} lacks layer(s) {missing[:5]}")
        theta = np.array([float(raw[n]) for n in names])
    else:
        theta = np.asarray(raw, dtype=np.float64).reshape(-1)
        if theta.shape != (len(names),):
            raise BitsearchError(
                f"the table's {IMPORTANCE_KEY} has {theta.size} values for {len(names)} layers"
            )
    if not np.all(np.isfinite(theta)):
        raise BitsearchError(f"the table's {IMPORTANCE_KEY} has non-finite values")
    return theta, f"OMPQ importance from the table's {IMPORTANCE_KEY}"


def _importance_from_values(problem: AllocationProblem) -> np.ndarray:
    vals = np.where(np.isfinite(problem.table.values), problem.table.values, np.nan)
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(np.clip(vals, 0.0, None), axis=1), nan=0.0)
    top = float(mean.max())
    return mean / top if top > 0 else np.ones_like(mean)


@register_solver
class LpSolver(Solver):
    """OMPQ's LP; see the module docstring.

    cumulative:  weight each layer by the mean importance of itself and the later layers (OMPQ's form);
                 default: on for orthogonality importance, off for importance derived from values
    """

    name = "lp"
    exact = False
    supports_objective = False

    def __init__(self, cumulative: bool | None = None):
        self.cumulative = cumulative

    def proxy(self, problem: AllocationProblem) -> tuple[np.ndarray, list[str]]:
        """(G, K) proxy costs to minimise (-importance × bits, +inf where not allowed) and notes."""
        theta, source = _importance_from_table(problem)
        notes = []
        cumulative = self.cumulative
        if theta is None:
            theta = _importance_from_values(problem)
            notes.append(
                f"the sensitivity table ({problem.table.method!r}) has no {IMPORTANCE_KEY}: "
                "lp used an importance "
                "derived from its values (each layer's mean loss increase, scaled to [0, 1]), not OMPQ's"
            )
            cumulative = bool(cumulative)
        else:
            notes.append(source)
            cumulative = True if cumulative is None else cumulative
        if cumulative:  # c_l = mean(θ_l .. θ_L), layers in execution order
            theta = np.cumsum(theta[::-1])[::-1] / np.arange(len(theta), 0, -1)
        c = np.zeros(problem.n_vars)
        np.add.at(c, problem.var_of_layer, theta)
        w = np.array([min(o.weight_bits, 16) for o in problem.options], dtype=np.float64) / 8
        acts = {o.activation_bits for o in problem.options}
        if len(acts) > 1:
            w = w + np.array([min(o.activation_bits, 16) for o in problem.options], dtype=np.float64) / 8
        return np.where(problem.allowed, -c[:, None] * w[None, :], np.inf), notes

    def _solve(self, problem: AllocationProblem) -> RawResult:
        from scipy.optimize import linprog
        from scipy.sparse import csr_array

        proxy, notes = self.proxy(problem)
        rows = [a for _, a in normalised_rows(problem)]
        cells = np.argwhere(problem.allowed)
        g_of, k_of = cells[:, 0], cells[:, 1]
        n, G = len(cells), problem.n_vars
        c = proxy[g_of, k_of]
        scale = float(np.abs(c).max()) or 1.0
        a_eq = csr_array((np.ones(n), (g_of, np.arange(n))), shape=(G, n))
        kw: dict[str, Any] = {}
        if rows:
            kw["A_ub"] = np.stack([a[g_of, k_of] for a in rows])
            kw["b_ub"] = np.full(len(rows), CAPACITY)
        res = linprog(c / scale, A_eq=a_eq, b_eq=np.ones(G), bounds=(0, 1), method="highs", **kw)
        if res.status == 2:
            return RawResult(None)
        if res.status != 0 or res.x is None:
            raise BitsearchError(f"the lp solver failed: {res.message}")
        y = np.zeros(problem.allowed.shape)
        y[g_of, k_of] = res.x
        fractional = int(np.sum(y.max(axis=1) < 1 - 1e-9))
        x = y.argmax(axis=1)
        r = np.arange(G)
        if any(float(a[r, x].sum()) > CAPACITY for a in rows):
            x = repair(proxy, rows, CAPACITY, x)
            if x is None:  # rounding left a corner the proxy's greedy cannot leave: ask the ilp
                return RawResult(None)
        x = improve(proxy, rows, CAPACITY, x)
        notes.append(
            f"LP relaxation: proxy {res.fun * scale:.6g}; {fractional} of {G} variables fractional, rounded"
        )
        return RawResult(x, optimal=False, gap=None, notes=notes)
