"""Bit-width search: per-layer options that minimise a sensitivity table's predicted loss under budgets.

    from search import AllocationProblem, Budget, Constraints, solve, pareto_front, measure_front, recommend

    problem = AllocationProblem(table, cost, ["avg_wbits=4", "bops=1.2G"], Constraints.keep_first_last())
    solution = solve(problem, solver="ilp")            # or "knapsack", "lp", "exhaustive"
    solution.allocation.save("alloc.json")

    front = pareto_front(problem, "avg_weight_bits", n_points=20)
    front = measure_front(front, model, calibration, eval_data)
    best = recommend(front, "avg_wbits=4")

This package never imports `service` or `db`; it needs `quant` (cost model, allocations) and, only for
measurement, `zoo` (evaluation).
"""

from .pareto import ParetoFront, ParetoPoint, measure_front, pareto_front, recommend
from .problem import (
    FEAS_RTOL,
    METRIC_ALIASES,
    AllocationProblem,
    Budget,
    Constraints,
    InfeasibleBudget,
    format_value,
    parse_budgets,
)
from .solvers import SOLVERS, Solution, Solver, get_solver, register_solver, solve

__all__ = [
    "FEAS_RTOL",
    "METRIC_ALIASES",
    "SOLVERS",
    "AllocationProblem",
    "Budget",
    "Constraints",
    "InfeasibleBudget",
    "ParetoFront",
    "ParetoPoint",
    "Solution",
    "Solver",
    "format_value",
    "get_solver",
    "measure_front",
    "pareto_front",
    "parse_budgets",
    "recommend",
    "register_solver",
    "solve",
]
