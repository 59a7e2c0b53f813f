"""The solver interface, its registry and the one entry point `solve`.

Adding a solver is one module with one class, registered as Optuna registers samplers:

    @register_solver
    class MySolver(Solver):
        name = "mine"
        def _solve(self, problem: AllocationProblem) -> RawResult: ...

`Solver.solve` does the common part around `_solve`: the cheap per-budget infeasibility check, timing,
evaluation of the returned choice on the *per-layer* matrices, a feasibility check of that choice (a solver
bug must not reach the user as an allocation over budget), and an exact explanation when nothing is found.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from quant.allocation import Allocation
from quant.errors import BitsearchError
from quant.registry import Capabilities, Registry

from ..problem import FEAS_RTOL, AllocationProblem, InfeasibleBudget, canonical_metric

#: Every solver by name; a second solver under a taken name is refused.
SOLVERS: Registry[type["Solver"]] = Registry("solver")


def register_solver(cls: type["Solver"]) -> type["Solver"]:
    return SOLVERS.register(cls)


@dataclass
class RawResult:
    """What `Solver._solve` returns, per decision variable (tie groups merged)."""

    var_choice: np.ndarray | None  # None: no feasible allocation found
    optimal: bool = False  # proven optimal for the problem's objective
    gap: float | None = None  # proven bound on (objective - optimum); None: unknown
    notes: list[str] = field(default_factory=list)


@dataclass
class Solution:
    """One allocation found by a solver. `choice[i]` indexes `problem.options` for layer i."""

    choice: np.ndarray
    objective: float  # the problem's objective (predicted loss increase) of this allocation
    metrics: dict[str, float]  # every cost metric of this allocation (internal units)
    seconds: float
    solver: str
    optimal: bool  # proven optimal, within the solver's tolerance (ilp: gap_rel; knapsack: tol)
    gap: float | None = None  # proven bound on objective - optimum (None when unknown)
    notes: list[str] = field(default_factory=list)
    allocation: Allocation | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": [int(c) for c in self.choice],
            "objective": self.objective,
            "metrics": self.metrics,
            "seconds": self.seconds,
            "solver": self.solver,
            "optimal": self.optimal,
            "gap": self.gap,
            "notes": list(self.notes),
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
        }


class Solver:
    """Interface of an allocation solver; subclasses take their options as keyword arguments."""

    name: ClassVar[str] = ""
    #: Always returns a proven optimum (or proves infeasibility) for the problem's objective.
    exact: ClassVar[bool] = False
    #: Minimises `problem.objective`. False for solvers that optimise a proxy of their own (OMPQ's lp): they
    #: cannot be used to minimise a metric, so budget ranges are then computed with ilp.
    supports_objective: ClassVar[bool] = True
    #: Most additive budgets the solver handles at once (None: any number).
    max_sum_budgets: ClassVar[int | None] = None
    #: What the solver needs from a run (checked by `POST /search` before queueing).
    capabilities: ClassVar[Capabilities] = Capabilities()

    def _solve(self, problem: AllocationProblem) -> RawResult:
        raise NotImplementedError

    # --- common driver --------------------------------------------------------------------------------
    def solve(self, problem: AllocationProblem, explain: bool = True) -> Solution:
        """The best allocation this solver finds; `InfeasibleBudget` when there is none.

        `explain=False` skips the exact (and slower) computation of the smallest feasible budget values
        when budgets are infeasible only together; internal feasibility probes use it.
        """
        t0 = time.perf_counter()
        problem.check_budgets()
        self._check_capacity(problem)
        raw = self._solve(problem)
        seconds = time.perf_counter() - t0
        if raw.var_choice is None:
            if not self.exact and problem._any_feasible():
                raise BitsearchError(
                    f"the {self.name} solver found no allocation within the budgets, but one exists; "
                    "use the ilp solver for this problem"
                )
            if explain:
                raise problem.explain_infeasible()
            raise InfeasibleBudget(
                "no allocation meets all the budgets together: " + ", ".join(map(str, problem.budgets)),
                {},
                problem.budgets,
            )
        return self._finish(problem, raw, seconds)

    def _check_capacity(self, problem: AllocationProblem) -> None:
        n_sum = len(problem.sum_budgets)
        if self.max_sum_budgets is not None and n_sum > self.max_sum_budgets:
            raise BitsearchError(
                f"the {self.name} solver handles at most {self.max_sum_budgets} additive budgets at once, "
                f"got {n_sum} ({', '.join(map(str, problem.sum_budgets))}); use the ilp solver"
            )

    def _finish(self, problem: AllocationProblem, raw: RawResult, seconds: float) -> Solution:
        choice = problem.expand(raw.var_choice)
        bad = problem.violations(choice)
        if bad:
            raise BitsearchError(
                f"internal error: the {self.name} solver returned an invalid allocation: {bad[0]}"
            )
        objective, metrics = problem.evaluate(choice)
        return Solution(
            choice=choice,
            objective=objective,
            metrics=metrics,
            seconds=seconds,
            solver=self.name,
            optimal=raw.optimal,
            gap=raw.gap if raw.gap is not None else (0.0 if raw.optimal else None),
            notes=list(problem.notes) + list(raw.notes),
            allocation=problem.to_allocation(choice, solver=self.name, optimal=raw.optimal),
        )

    def sweep(
        self, problem: AllocationProblem, metric: str, limits: Sequence[float]
    ) -> list[Solution | None]:
        """Solve `problem` with the budget on `metric` set to each of `limits` (None where infeasible).

        Solvers that can reuse work between budgets (the knapsack's hulls) override this.
        """
        m = canonical_metric(metric)
        self._check_capacity(problem.with_budget(m, 1.0))
        out: list[Solution | None] = []
        for limit in limits:
            t0 = time.perf_counter()
            p = problem.with_budget(m, float(limit))
            try:
                p.check_budgets()
            except InfeasibleBudget:
                out.append(None)
                continue
            # No exact explanation here: a point a heuristic misses is reported as missing, not chased.
            raw = self._solve(p)
            out.append(None if raw.var_choice is None else self._finish(p, raw, time.perf_counter() - t0))
        return out


def get_solver(solver: "str | Solver", **options: Any) -> Solver:
    """A solver instance from a registered name (or an instance, returned as is)."""
    if isinstance(solver, Solver):
        if options:
            raise BitsearchError("solver options go with a solver name, not with a solver instance")
        return solver
    cls = SOLVERS.get(str(solver))
    if cls is None:
        raise BitsearchError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}")
    try:
        return cls(**options)
    except TypeError:
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise BitsearchError(
            f"unknown option(s) {sorted(options)} for the {cls.name} solver; it takes {params or 'none'}"
        ) from None


def objective_solver(solver: "str | Solver") -> str:
    """`solver`'s name when it minimises the problem's objective, else "ilp" (for metric minimisation)."""
    name = solver.name if isinstance(solver, Solver) else str(solver)
    cls = SOLVERS.get(name)
    return name if cls is not None and cls.supports_objective else "ilp"


def solve(
    problem: AllocationProblem, solver: "str | Solver" = "ilp", explain: bool = True, **options: Any
) -> Solution:
    """Solve `problem` with a registered solver ("ilp", "knapsack", "lp", "exhaustive", ...)."""
    return get_solver(solver, **options).solve(problem, explain=explain)


def normalised_rows(problem: AllocationProblem) -> list[tuple[str, np.ndarray]]:
    """Each additive budget as (metric, costs / limit) with 0 on disallowed cells, so capacities are 1."""
    out = []
    for b in problem.sum_budgets:
        out.append((b.metric, np.where(problem.allowed, problem.costs[b.metric] / b.limit, 0.0)))
    return out


#: The capacity of a normalised budget row for every solver: half the slack `Budget.holds` grants, so that
#: rounding in a solver's running sums can never turn an accepted allocation into one `holds` rejects.
CAPACITY = 1.0 + 0.5 * FEAS_RTOL
