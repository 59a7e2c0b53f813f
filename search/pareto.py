"""Pareto fronts of predicted loss against one cost metric, their measurement, and the final recommendation.

    front = pareto_front(problem, "avg_weight_bits", n_points=20)          # predicted, from the table
    front = measure_front(front, model, calibration, eval_data)            # PTQ-evaluated, every point
    best = recommend(front, "avg_wbits=4")                                 # the best *measured* candidate

The sweep spans the swept metric from its cheapest to its dearest feasible value under the problem's other
budgets and constraints (which stay in force), solves each budget, drops repeated and dominated allocations,
and adds every uniform-precision allocation on the same axes. Sensitivity proxies are additive estimates
and can mislead, so the recommendation is chosen by measurement among the solver's candidates *and* the
uniform ones: it is never worse, as measured, than uniform precision at the same or lower cost.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from quant.allocation import Allocation
from quant.cost import MAX_METRICS
from quant.errors import BitsearchError
from quant.jsonfile import JsonFile

from .problem import (
    AllocationProblem,
    Budget,
    InfeasibleBudget,
    canonical_metric,
    format_value,
    parse_budgets,
)
from .solvers import get_solver, objective_solver

FRONT_SCHEMA = "bitsearch.pareto"
FRONT_VERSION = 1

#: Measured quantities a recommendation can rank by, and whether larger is better.
MEASURES: dict[str, bool] = {"top1": True, "agreement": True, "loss": False, "kl": False, "predicted": False}


@dataclass
class ParetoPoint:
    """One allocation on (or beside, for uniform baselines) a front."""

    allocation: Allocation
    predicted: float  # the table's predicted loss increase (sum over layers)
    metrics: dict[str, float]  # every cost metric, internal units (bits, BOPs, seconds)
    kind: str = "mixed"  # "mixed": found by the solver; "uniform": one option for every (unpinned) layer
    budget: float | None = None  # the swept budget that produced it (None for uniform points)
    within_budgets: bool = True  # meets the front's fixed budgets (uniform points may not)
    optimal: bool | None = None  # the solver proved it optimal for its budget
    label: str | None = None  # e.g. "W4A32" for a uniform point
    measured: dict[str, float | None] = field(default_factory=dict)  # filled by `measure_front`
    #: The same figures on the report data (`measure_front(..., role="report")`); never used to choose.
    report: dict[str, float | None] = field(default_factory=dict)
    #: role ("selection", "report") -> figure -> [low, high] interval of the mean (see `search.selection`).
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: role -> per-item values ("correct", "ce", "agree", "kl"), for paired tests; not serialized.
    samples: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    #: What `search.refine` did to reach this point, when it produced it.
    refinement: dict[str, Any] | None = None

    def value(self, metric: str) -> float:
        return self.metrics[canonical_metric(metric)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "label": self.label,
            "budget": self.budget,
            "predicted": self.predicted,
            "metrics": self.metrics,
            "measured": self.measured,
            "report": self.report,
            "intervals": self.intervals,
            "refinement": self.refinement,
            "within_budgets": self.within_budgets,
            "optimal": self.optimal,
            "allocation": self.allocation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParetoPoint":
        try:
            return cls(
                allocation=Allocation.from_dict(d["allocation"]),
                predicted=float(d["predicted"]),
                metrics={k: float(v) for k, v in d["metrics"].items() if v is not None},
                kind=str(d.get("kind", "mixed")),
                budget=d.get("budget"),
                within_budgets=bool(d.get("within_budgets", True)),
                optimal=d.get("optimal"),
                label=d.get("label"),
                measured=dict(d.get("measured") or {}),
                report=dict(d.get("report") or {}),
                intervals=dict(d.get("intervals") or {}),
                refinement=d.get("refinement"),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise BitsearchError(f"malformed Pareto point: {exc}") from None


@dataclass
class ParetoFront(JsonFile):
    """Predicted loss against `metric`: the solver's non-dominated allocations and the uniform baselines."""

    json_what = "Pareto front"

    metric: str
    points: list[ParetoPoint]  # kind "mixed", by increasing `metric`, strictly decreasing predicted loss
    uniform: list[ParetoPoint]  # kind "uniform", by increasing `metric`
    solver: str
    table_method: str
    budgets: list[Budget] = field(default_factory=list)  # the other budgets, in force at every point
    constraints: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None  # the FP32 model's measurement, from `measure_front`
    report_reference: dict[str, Any] | None = None  # the same on the report data

    def candidates(self) -> list[ParetoPoint]:
        """Every point, mixed and uniform."""
        return list(self.points) + list(self.uniform)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": FRONT_SCHEMA,
            "version": FRONT_VERSION,
            "metric": self.metric,
            "solver": self.solver,
            "table_method": self.table_method,
            "budgets": [b.to_dict() for b in self.budgets],
            "constraints": self.constraints,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "reference": self.reference,
            "report_reference": self.report_reference,
            "points": [p.to_dict() for p in self.points],
            "uniform": [p.to_dict() for p in self.uniform],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParetoFront":
        cls.check_header(d, FRONT_SCHEMA, FRONT_VERSION)
        return cls(
            metric=canonical_metric(d["metric"]),
            points=[ParetoPoint.from_dict(p) for p in d.get("points", [])],
            uniform=[ParetoPoint.from_dict(p) for p in d.get("uniform", [])],
            solver=str(d.get("solver", "")),
            table_method=str(d.get("table_method", "")),
            budgets=[Budget.from_dict(b) for b in d.get("budgets", [])],
            constraints=dict(d.get("constraints") or {}),
            seconds=float(d.get("seconds", 0.0)),
            notes=list(d.get("notes") or []),
            reference=d.get("reference"),
            report_reference=d.get("report_reference"),
        )

# --- the sweep --------------------------------------------------------------------------------------------


def _as_problem(problem_or_parts: Any) -> AllocationProblem:
    if isinstance(problem_or_parts, AllocationProblem):
        return problem_or_parts
    if isinstance(problem_or_parts, Mapping):
        return AllocationProblem(
            problem_or_parts["table"],
            problem_or_parts.get("cost"),
            problem_or_parts.get("budgets"),
            problem_or_parts.get("constraints"),
        )
    if isinstance(problem_or_parts, (tuple, list)) and 1 <= len(problem_or_parts) <= 4:
        return AllocationProblem(*problem_or_parts)
    raise BitsearchError(
        "pareto_front needs an AllocationProblem, a (table, cost[, budgets[, constraints]]) tuple or a dict "
        f"with those keys; got {type(problem_or_parts).__name__}"
    )


def _sweep_limits(base: AllocationProblem, metric: str, lo: float, hi: float, n_points: int) -> list[float]:
    if metric in MAX_METRICS:
        # A max over layers only changes at the per-layer values: sweep those (evenly by rank).
        vals = np.unique(base.costs[metric][base.structural_allowed])
        vals = vals[(vals >= lo * (1 - 1e-12)) & (vals <= hi * (1 + 1e-12))]
        if len(vals) > n_points:
            vals = vals[np.unique(np.round(np.linspace(0, len(vals) - 1, n_points)).astype(int))]
        return [float(v) for v in vals]
    if n_points == 1 or hi <= lo:
        return [float(hi)]
    return [float(v) for v in np.linspace(lo, hi, n_points)]


def pareto_front(
    problem_or_parts: Any,
    metric: str,
    n_points: int = 20,
    solver: str = "ilp",
    extra_limits: "Sequence[float] | None" = None,
    **solver_options: Any,
) -> ParetoFront:
    """Sweep `n_points` budgets on `metric` between its cheapest and dearest feasible values.

    `extra_limits`: budgets on `metric` to solve for as well (e.g. the ones a user asked for), so that a
    recommendation at such a budget can use the solver's answer for exactly that budget, not only the
    nearest cheaper grid point.

    `problem_or_parts`: an `AllocationProblem` or its parts, `(table, cost, budgets, constraints)`. A budget
    it already has on `metric` is replaced by the sweep; its other budgets and constraints hold at every
    point. Repeated and dominated allocations are dropped, so predicted loss strictly falls as the metric
    rises. Uniform-precision allocations are added as `front.uniform`.
    """
    t0 = time.perf_counter()
    problem = _as_problem(problem_or_parts)
    m = canonical_metric(metric)
    if m not in problem.costs:
        raise BitsearchError(
            f"the cost model cannot compute {m}" + (" (it needs a latency table)" if m == "latency" else "")
        )
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise BitsearchError(f"n_points must be a positive integer, got {n_points!r}")
    impl = get_solver(solver, **solver_options)
    base = problem.without_budget(m)
    base.check_budgets()
    bound_solver = objective_solver(impl)
    lo = base.min_metric(m, bound_solver)
    if lo is None:
        raise base.explain_infeasible()
    hi = base.max_metric(m, bound_solver)
    hi = lo if hi is None or hi < lo else hi
    limits = _sweep_limits(base, m, lo, hi, n_points)
    if extra_limits:
        limits = sorted(set(limits) | {float(x) for x in extra_limits if lo <= float(x) <= hi})
    notes: list[str] = []
    if bound_solver != impl.name:
        notes.append(
            f"the sweep's range was computed with {bound_solver} ({impl.name} optimises its own proxy)"
        )
    solutions = impl.sweep(base, m, limits)
    missed = [lim for lim, s in zip(limits, solutions) if s is None]
    if missed:
        notes.append(
            f"{impl.name} found no allocation for {len(missed)} of {len(limits)} budgets "
            f"(e.g. {m} <= {format_value(m, missed[0])})"
        )
    raw: list[ParetoPoint] = []
    seen: set[bytes] = set()
    for limit, sol in zip(limits, solutions):
        if sol is None:
            continue
        key = np.asarray(sol.choice).tobytes()
        if key in seen:
            continue
        seen.add(key)
        for note in sol.notes:
            if note not in notes and not note.startswith("LP relaxation"):
                notes.append(note)
        assert sol.allocation is not None
        raw.append(
            ParetoPoint(
                allocation=sol.allocation,
                predicted=sol.objective,
                metrics=sol.metrics,
                kind="mixed",
                budget=limit,
                optimal=sol.optimal,
            )
        )
    points = _non_dominated(raw, m)
    uniform = []
    for option, choice in problem.uniform_choices():
        predicted, metrics = base.evaluate(choice)
        uniform.append(
            ParetoPoint(
                allocation=base.to_allocation(choice, uniform=option.label()),
                predicted=predicted,
                metrics=metrics,
                kind="uniform",
                within_budgets=base.feasible(choice),
                label=option.label(),
            )
        )
    uniform.sort(key=lambda p: (p.metrics[m], p.predicted))
    return ParetoFront(
        metric=m,
        points=points,
        uniform=uniform,
        solver=impl.name,
        table_method=problem.table.method,
        budgets=list(base.budgets),
        constraints=problem.constraints.to_dict(),
        seconds=time.perf_counter() - t0,
        notes=list(problem.notes) + notes,
    )


def _non_dominated(points: list[ParetoPoint], metric: str) -> list[ParetoPoint]:
    """Points by increasing metric whose predicted loss is strictly below every cheaper point's."""
    ordered = sorted(points, key=lambda p: (p.metrics[metric], p.predicted))
    out: list[ParetoPoint] = []
    best = np.inf
    for p in ordered:
        eps = 1e-12 * (1.0 + abs(p.predicted))
        if p.predicted < best - eps:
            out.append(p)
            best = p.predicted
    return out


# --- measurement --------------------------------------------------------------------------------------------


class MeasuringModel:
    """One model wrapped for PTQ and calibrated once, then measured at many allocations on many data sets.

    A wrapped layer memoises the weight quantizers it derives per option (output-MSE clipping and GPTQ cost
    far more than the forward pass they feed; `quant.apply.QuantizedLayer`), but only for as long as that
    wrapped copy lives. One search measures the refinement's moves, every candidate on the selection data
    and the evidence points on the report data: sharing one wrapped copy derives each (layer, option) once
    instead of once per copy. The FP32 model's logits of each data set are computed once too, and an
    allocation met again on the same data (a front's twin points, the refinement's guarded start point) is
    answered from memory: the figures and per-item values, not the logits, are kept.

    The copy is wrapped on first use and calibrated on `calibration` the first time an allocation needs it
    (quantized activations, data-driven clipping, GPTQ, bias correction), as a fresh copy would be.
    """

    def __init__(self, model: Any, calibration: Any = None, quant_config: Any = None):
        from quant.apply import QuantConfig

        self.model = model
        self.calibration = calibration
        self.config = quant_config or QuantConfig()
        self.qmodel: Any = None
        self.layers: dict[str, Any] = {}
        self.calibrated_items: int | None = None  # items of the calibration pass, once it ran
        self.passes = 0  # quantized passes over a data set actually run (repeats are answered from memory)
        self._references: dict[int, tuple[Any, Any]] = {}  # id(data) -> (data, FP32 EvalResult)
        self._results: dict[tuple[frozenset, int], Any] = {}  # (allocation, id(data)) -> EvalResult

    def wrapped(self, allocations: Iterable[Allocation] = (), calibrate: bool = False) -> Any:
        """The wrapped copy, calibrated when `calibrate` or any of `allocations` needs it."""
        from quant.apply import collect_statistics, needs_calibration, wrap_model

        if self.qmodel is None:
            self.qmodel = copy.deepcopy(self.model).eval()
            self.layers = wrap_model(self.qmodel, self.config)
        if self.calibrated_items is None and (
            calibrate or any(needs_calibration(a, self.config) for a in allocations)
        ):
            if self.calibration is None:
                raise BitsearchError(
                    "measuring these allocations needs calibration data (quantized activations)"
                )
            self.calibrated_items = collect_statistics(
                self.qmodel, self.layers, self.calibration, self.config
            )
        return self.qmodel

    def reference(self, data: Any) -> Any:
        """The FP32 model's `EvalResult` on `data` (an `ArrayDataset`), computed once per data set."""
        from zoo.evaluate import evaluate

        hit = self._references.get(id(data))
        if hit is None or hit[0] is not data or hit[1] is None:
            hit = (data, evaluate(self.model, data))  # the data are kept so that their id stays theirs
            self._references[id(data)] = hit
        return hit[1]

    def release(self, data: Any) -> None:
        """Drop the FP32 logits of `data` (a language model's are N × vocab × T) once no more passes need them;
        the figures already measured on it are kept."""
        hit = self._references.get(id(data))
        if hit is not None and hit[0] is data:
            self._references[id(data)] = (data, None)

    def evaluate(self, allocation: Allocation, data: Any) -> Any:
        """`zoo.evaluate.evaluate` of the quantized model at `allocation` on `data` (an `ArrayDataset`)
        against the FP32 logits, without its logits. The same allocation on the same data is run once: the
        sweep's ends are often the uniform W2 and W8 allocations themselves, and the refinement's guard has
        already run its start point on the selection data."""
        import dataclasses

        from quant.apply import set_allocation
        from zoo.evaluate import evaluate

        ref = self.reference(data)  # also keeps `data` alive, so that its id stays its own
        key = (frozenset(allocation.layers.items()), id(data))
        hit = self._results.get(key)
        if hit is None:
            qmodel = self.wrapped([allocation])
            set_allocation(qmodel, allocation)
            r = evaluate(qmodel, data, reference_logits=ref.logits)
            self.passes += 1
            hit = self._results[key] = dataclasses.replace(r, logits=None)
        return hit


def measure_points(
    points: Sequence[ParetoPoint],
    measuring: MeasuringModel,
    data: Any,
    role: str = "selection",
    confidence: float = 0.95,
    progress: Callable[[float, str], None] | None = None,
) -> Any:
    """Measure `points` in place on `data` (an `ArrayDataset`) for `role`; returns the FP32 `EvalResult`.

    `role` "selection" fills `measured`, "report" fills `report`; either way `samples[role]` and
    `intervals[role]` (see `measure_front`).
    """
    from .selection import point_intervals

    if role not in ("selection", "report"):
        raise BitsearchError(f"role must be 'selection' or 'report', got {role!r}")
    ref = measuring.reference(data)
    measuring.wrapped([p.allocation for p in points])  # calibrated before the first point, as one pass
    for i, p in enumerate(points):
        r = measuring.evaluate(p.allocation, data)  # an allocation met before is not run again
        if role == "selection":
            p.measured = r.to_dict()
        else:
            p.report = r.to_dict()
        p.samples[role] = {k: v.numpy().copy() for k, v in r.per_sample.items()}
        if r.n > 1:
            p.intervals[role] = point_intervals(p.samples[role], confidence)
        if progress is not None:
            progress((i + 1) / len(points), f"measured {i + 1}/{len(points)}")
    return ref


def measure_front(
    front: ParetoFront,
    model: Any,
    calibration: Any,
    eval_data: Any,
    quant_config: Any = None,
    progress: Callable[[float, str], None] | None = None,
    role: str = "selection",
    confidence: float = 0.95,
    measuring: MeasuringModel | None = None,
) -> ParetoFront:
    """A copy of `front` with every point (mixed and uniform) measured by post-training quantization.

    `role`: "selection" (default) fills `measured` and `reference` (the figures a recommendation is chosen
    by); "report" fills `report` and `report_reference` (figures only shown, on data disjoint from the
    selection data). Either way each point keeps its per-item values in `samples[role]` (for the paired
    tests of `search.selection.select`) and the `confidence` intervals of its figures in `intervals[role]`.

    The model is wrapped and calibrated once (`quant.apply.wrap_model` + `collect_statistics`); each point
    then only re-derives the quantizers (`set_allocation`) and runs `eval_data` (held-out: not the
    calibration or sensitivity data). `measured` gets top1 and loss when `eval_data` has labels, and always
    agreement and KL divergence against the FP32 model; `front.reference` gets the FP32 figures.
    `measuring`: a `MeasuringModel` of the same model, calibration data and config to reuse (its derived
    quantizers and FP32 logits), e.g. across the selection and report calls; `model`, `calibration` and
    `quant_config` are then ignored.
    """
    from zoo.data import as_dataset  # imported here: the search core needs no torch data

    data = as_dataset(eval_data, "eval_data")
    out = copy.deepcopy(front)
    measuring = measuring or MeasuringModel(model, calibration, quant_config)
    ref = measure_points(out.candidates(), measuring, data, role, confidence, progress)
    if role == "selection":
        out.reference = ref.to_dict()
    else:
        out.report_reference = ref.to_dict()
    return out


def _rank_key(by: str, budget_metrics: Sequence[str]) -> Callable[[ParetoPoint], tuple]:
    """Sort key, best first: the chosen measure, then the other measures as tie-breakers, then cost."""
    tie = [k for k in ("loss", "kl", "agreement", "top1") if k != by]

    def measure(p: ParetoPoint, k: str) -> float:
        v = p.predicted if k == "predicted" else p.measured.get(k)
        if v is None:
            return np.inf
        return -float(v) if MEASURES[k] else float(v)

    def key(p: ParetoPoint) -> tuple:
        return (
            measure(p, by),
            *(measure(p, k) for k in tie),
            *(p.metrics.get(m, np.inf) for m in budget_metrics),
            p.predicted,
        )

    return key


def fitting_candidates(
    front: ParetoFront, budget: "Budget | str | Iterable[Budget | str] | None"
) -> tuple[list[Budget], list[ParetoPoint]]:
    """(the parsed `budget`, the candidates that meet it and the front's own budgets); `InfeasibleBudget`
    naming the cheapest point's figures when none does."""
    budgets = parse_budgets(budget)
    everything = front.candidates()
    if not everything:
        raise BitsearchError("the front has no points")
    # The front's own budgets stay in force unless `budget` sets the same metric anew.
    every = budgets + [b for b in front.budgets if b.metric not in {x.metric for x in budgets}]
    for b in every:
        if b.metric not in everything[0].metrics:
            raise BitsearchError(f"the front's points have no {b.metric} figure")
    cands = [p for p in everything if all(b.holds(p.metrics[b.metric]) for b in every)]
    if not cands:
        keys = [b.metric for b in budgets] or [front.metric]
        cheapest = min(everything, key=lambda p: tuple(p.metrics[k] for k in keys))
        figures = ", ".join(f"{k} {format_value(k, cheapest.metrics[k])}" for k in keys)
        raise InfeasibleBudget(
            f"no allocation of the front meets {', '.join(map(str, every))}; the cheapest has {figures}",
            {k: cheapest.metrics[k] for k in keys},
            every,
        )
    return budgets, cands


def recommend(
    front: ParetoFront,
    budget: "Budget | str | Iterable[Budget | str] | None" = None,
    by: str | None = None,
) -> ParetoPoint:
    """The best measured candidate (solver's or uniform) that meets `budget` and the front's own budgets.

    `by`: "top1" (default when the measurements have labels), "kl" (default otherwise), "loss",
    "agreement", or "predicted" (rank by the table's prediction; needs no measurement). Ties go to the
    other measures, then to the cheaper allocation. Because the uniform allocations are candidates too, the
    recommendation is never worse by `by` than any uniform allocation that meets the same budgets.
    """
    budgets, cands = fitting_candidates(front, budget)
    if by is None:
        by = "top1" if all(p.measured.get("top1") is not None for p in cands) else "kl"
    if by not in MEASURES:
        raise BitsearchError(f"unknown ranking {by!r}; known: {list(MEASURES)}")
    if by != "predicted":
        missing = [p for p in cands if p.measured.get(by) is None]
        if missing:
            raise BitsearchError(
                f"{len(missing)} candidate(s) have no measured {by!r}: run measure_front first "
                "(or rank by='predicted')"
            )
    return min(cands, key=_rank_key(by, [b.metric for b in budgets] or [front.metric]))


__all__ = [
    "FRONT_SCHEMA",
    "MEASURES",
    "MeasuringModel",
    "ParetoFront",
    "ParetoPoint",
    "measure_front",
    "measure_points",
    "pareto_front",
    "recommend",
]
