"""Allocation solvers behind one interface (`Solver.solve(problem) -> Solution`) and one registry.

Importing a solver module registers it; a new solver (e.g. BOMP-NAS's `bayes`, `qbitopt`) is one more module
here and one more import line below.
"""

from .base import (
    SOLVERS,
    RawResult,
    Solution,
    Solver,
    get_solver,
    objective_solver,
    register_solver,
    solve,
)

from . import exhaustive, ilp, knapsack, lp  # noqa: E402,F401  (registers them)
from . import bayes  # noqa: E402,F401  (BOMP-NAS-style measured search, Optuna)
from . import qbitopt  # noqa: E402,F401  (QBitOpt: re-allocation during QAT)
from . import bompnas  # noqa: E402,F401  (BOMP-NAS: architecture and bits, QAFT in the loop)

__all__ = [
    "SOLVERS",
    "RawResult",
    "Solution",
    "Solver",
    "get_solver",
    "objective_solver",
    "register_solver",
    "solve",
]
