"""`ilp`: the exact integer program (HAWQ-V3's formulation, generalised to many budgets and activation bits).

One binary x[g, k] per allowed (variable, option) cell:

    minimise    sum_gk objective[g, k] * x[g, k]
    subject to  sum_k x[g, k] = 1                                  for every variable g
                sum_gk cost_b[g, k] / limit_b * x[g, k] <= 1        for every additive budget b

A peak-activation budget is a max over layers, so it needs no row: options whose own activation size is
over the limit are simply not variables (`AllocationProblem.allowed`). Rows are normalised by their limit
and the objective by its largest coefficient, so the solver's absolute tolerances mean the same thing for
BOPs in the billions and for bits per weight.

Backends: "cbc" (PuLP's bundled CBC), "highs" (PuLP's HiGHS interface, when `highspy` is installed),
"scipy" (`scipy.optimize.milp`, HiGHS compiled into SciPy: no model building in Python, the fastest on large
problems); "auto" picks highs, else cbc.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Sequence

import numpy as np

from quant.errors import BitsearchError

from ..problem import FEAS_RTOL, AllocationProblem
from .base import CAPACITY, RawResult, Solver, normalised_rows, register_solver

BACKENDS = ("auto", "cbc", "highs", "scipy")


def highs_available() -> bool:
    return importlib.util.find_spec("highspy") is not None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise BitsearchError(f"unknown ilp backend {backend!r}; known: {list(BACKENDS)}")
    if backend == "auto":
        return "highs" if highs_available() else "cbc"
    if backend == "highs" and not highs_available():
        raise BitsearchError(
            "the highs backend needs the highspy package (pip install highspy); or use cbc/scipy"
        )
    return backend


def _solve_pulp(
    obj: np.ndarray,
    allowed: np.ndarray,
    rows: Sequence[np.ndarray],
    caps: Sequence[float],
    backend: str,
    time_limit: float | None,
    msg: bool,
    gap_rel: float,
) -> tuple[np.ndarray | None, bool]:
    import pulp

    cells = np.argwhere(allowed)
    g_of, k_of = cells[:, 0], cells[:, 1]
    prob = pulp.LpProblem("bitsearch", pulp.LpMinimize)
    # PuLP 3 deprecates free-standing LpVariable in favour of the model's own factory; support both.
    if hasattr(prob, "add_variable"):
        xs = [prob.add_variable(f"x{g}_{k}", 0, 1, pulp.LpBinary) for g, k in cells.tolist()]
    else:  # pragma: no cover - PuLP 2
        xs = [pulp.LpVariable(f"x{g}_{k}", 0, 1, pulp.LpBinary) for g, k in cells.tolist()]
    c = obj[g_of, k_of]
    scale = float(np.abs(c).max()) or 1.0
    prob += pulp.LpAffineExpression(list(zip(xs, (c / scale).tolist()))), "objective"
    starts = np.searchsorted(g_of, np.arange(obj.shape[0] + 1))  # argwhere is row-major: cells grouped by g
    for g in range(obj.shape[0]):
        prob += (
            pulp.LpAffineExpression([(xs[i], 1.0) for i in range(starts[g], starts[g + 1])]) == 1,
            f"one_{g}",
        )
    for j, (a, cap) in enumerate(zip(rows, caps)):
        coef = a[g_of, k_of]
        nz = np.flatnonzero(coef)
        prob += pulp.LpAffineExpression([(xs[i], float(coef[i])) for i in nz]) <= float(cap), f"budget_{j}"
    kw = {"msg": msg, "gapRel": gap_rel}
    if time_limit is not None:
        kw["timeLimit"] = time_limit
    with warnings.catch_warnings():
        # PuLP 3 announces that the bundled CBC moves to an extra in PuLP 4; until then it is the one
        # solver every install has, so the notice is noise for our users.
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.HiGHS(**kw) if backend == "highs" else pulp.PULP_CBC_CMD(**kw)
        prob.solve(solver)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, prob.status == pulp.LpStatusInfeasible
    vals = np.array([v.varValue if v.varValue is not None else 0.0 for v in xs])
    return _pick(obj.shape[0], g_of, k_of, vals), prob.sol_status == pulp.LpSolutionOptimal


def _solve_scipy(
    obj: np.ndarray,
    allowed: np.ndarray,
    rows: Sequence[np.ndarray],
    caps: Sequence[float],
    time_limit: float | None,
    msg: bool,
    gap_rel: float,
) -> tuple[np.ndarray | None, bool]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    cells = np.argwhere(allowed)
    g_of, k_of = cells[:, 0], cells[:, 1]
    n, G = len(cells), obj.shape[0]
    c = obj[g_of, k_of]
    scale = float(np.abs(c).max()) or 1.0
    one_hot = csr_array((np.ones(n), (g_of, np.arange(n))), shape=(G, n))
    cons = [LinearConstraint(one_hot, 1.0, 1.0)]
    if rows:
        cons.append(
            LinearConstraint(np.stack([a[g_of, k_of] for a in rows]), -np.inf, np.asarray(caps, dtype=float))
        )
    options = {"disp": msg, "mip_rel_gap": gap_rel}
    if time_limit is not None:
        options["time_limit"] = time_limit
    res = milp(c / scale, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=cons, options=options)
    if res.x is None:
        return None, res.status == 2
    return _pick(G, g_of, k_of, res.x), res.status == 0


def _pick(G: int, g_of: np.ndarray, k_of: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """The option with the largest value per variable (binaries come back as 0.9999999 and 1e-9)."""
    order = np.lexsort((vals, g_of))  # by variable, and within it by value: the largest comes last
    last = order[np.searchsorted(g_of[order], np.arange(G), side="right") - 1]
    return k_of[last].astype(np.int64)


@register_solver
class IlpSolver(Solver):
    """Exact integer program; see the module docstring.

    backend:     "auto" (highs when highspy is installed, else cbc), "cbc", "highs" or "scipy"
    gap_rel:     relative MIP gap at which the backend stops: `optimal` means optimal within it, and the
                 solution's `gap` bounds the distance (a zero gap makes CBC crawl on 1,000-layer problems
                 for a difference no sensitivity proxy can resolve)
    time_limit:  seconds; when hit, the best allocation found is returned with optimal=False
    msg:         let the backend print its log
    """

    name = "ilp"
    exact = True

    def __init__(
        self,
        backend: str = "auto",
        gap_rel: float = 1e-6,
        time_limit: float | None = 120.0,
        msg: bool = False,
    ):
        if not 0.0 <= float(gap_rel) < 1.0:
            raise BitsearchError(f"gap_rel must be in [0, 1), got {gap_rel!r}")
        if time_limit is not None and (
            isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0
        ):
            raise BitsearchError(f"time_limit must be a positive number of seconds (or None), got {time_limit!r}")
        self.gap_rel = float(gap_rel)
        self.backend = _resolve_backend(backend)
        self.time_limit = time_limit
        self.msg = bool(msg)

    def _solve(self, problem: AllocationProblem) -> RawResult:
        obj, allowed = problem.objective, problem.allowed
        rows = [a for _, a in normalised_rows(problem)]
        caps = [CAPACITY] * len(rows)
        r = np.arange(problem.n_vars)
        notes: list[str] = []
        for _ in range(4):
            if self.backend == "scipy":
                x, optimal = _solve_scipy(obj, allowed, rows, caps, self.time_limit, self.msg, self.gap_rel)
            else:
                x, optimal = _solve_pulp(
                    obj, allowed, rows, caps, self.backend, self.time_limit, self.msg, self.gap_rel
                )
            if x is None:
                if not optimal:  # neither a solution nor a proof of infeasibility: the time limit
                    raise BitsearchError(
                        f"the ilp solver ({self.backend}) found no allocation within its time limit "
                        f"({self.time_limit} s); raise time_limit or use the knapsack solver"
                    )
                return RawResult(None)
            # MIP solvers accept rows a little over their bound (their feasibility tolerance); tighten the
            # offending rows by the overshoot and solve again rather than hand back an over-budget choice.
            over = [float(a[r, x].sum()) - 1.0 - FEAS_RTOL for a in rows]
            if all(o <= 0 for o in over):
                if not optimal:
                    notes.append(
                        f"time limit ({self.time_limit} s) hit: the best allocation found, not proven optimal"
                    )
                value = float(obj[r, x].sum())
                gap = self.gap_rel * abs(value) if optimal else None
                return RawResult(x, optimal=optimal, gap=gap, notes=notes)
            caps = [c - max(o, 0.0) - 1e-7 if o > 0 else c for c, o in zip(caps, over)]
        raise BitsearchError("internal error: the ilp solver kept returning allocations over budget")
