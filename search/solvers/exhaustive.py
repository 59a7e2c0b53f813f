"""`exhaustive`: every allocation, scored in vectorised chunks. The ground truth the other solvers are tested
against, and a fine solver for models with a handful of layers."""

from __future__ import annotations

import numpy as np

from quant.errors import BitsearchError

from ..problem import AllocationProblem
from .base import CAPACITY, RawResult, Solver, normalised_rows, register_solver


@register_solver
class ExhaustiveSolver(Solver):
    """Enumerates all allowed combinations; refuses above `max_combinations` (default 2e6)."""

    name = "exhaustive"
    exact = True

    def __init__(self, max_combinations: int = 2_000_000, chunk: int = 1 << 16):
        self.max_combinations = int(max_combinations)
        self.chunk = int(chunk)

    def _solve(self, problem: AllocationProblem) -> RawResult:
        allowed = problem.allowed
        options = [np.flatnonzero(row) for row in allowed]  # allowed option indices per variable
        dims = [len(o) for o in options]
        total = 1
        for d in dims:
            total *= d
            if total > self.max_combinations:
                raise BitsearchError(
                    f"the exhaustive solver would enumerate more than {self.max_combinations:,} allocations "
                    f"({problem.n_vars} decision variables with {dims} options each); "
                    "use the ilp or knapsack solver, or raise max_combinations"
                )
        obj = [problem.objective[g, o] for g, o in enumerate(options)]
        rows = [[a[g, o] for g, o in enumerate(options)] for _, a in normalised_rows(problem)]
        best_val, best_idx = np.inf, -1
        for start in range(0, total, self.chunk):
            idx = np.arange(start, min(start + self.chunk, total))
            digits = np.unravel_index(idx, dims) if dims else ()
            value = np.zeros(len(idx))
            for g, d in enumerate(digits):
                value += obj[g][d]
            ok = np.ones(len(idx), dtype=bool)
            for row in rows:
                used = np.zeros(len(idx))
                for g, d in enumerate(digits):
                    used += row[g][d]
                ok &= used <= CAPACITY
            if ok.any():
                value = np.where(ok, value, np.inf)
                i = int(np.argmin(value))
                if value[i] < best_val:  # strict: the first of equal optima wins, deterministically
                    best_val, best_idx = float(value[i]), int(idx[i])
        if best_idx < 0:
            return RawResult(None, optimal=True)
        digits = np.unravel_index(best_idx, dims)
        x = np.array([options[g][int(d)] for g, d in enumerate(digits)], dtype=np.int64)
        return RawResult(x, optimal=True, gap=0.0)
