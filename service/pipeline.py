"""The stages of the data path as plain functions over typed objects.

The CLI, the REST service and the workers all call these, so a result means the same wherever it was made:
`resolve_inputs` turns references into a model and data, `run_ptq` quantizes and measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from quant import Allocation, LayerBits, QuantConfig, apply_allocation, discover_layers
from quant.cost import CostModel
from quant.errors import BitsearchError
from quant.layers import LayerInfo
from zoo import ArrayDataset, DataSplits, EvalResult, LoadedModel, evaluate, load_data, split
from zoo.uploads import load_any_model

ProgressFn = Callable[[str], None]


@dataclass
class Inputs:
    """A model with its layers, and the data to calibrate on and to evaluate on (disjoint)."""

    loaded: LoadedModel
    layers: list[LayerInfo]
    calibration: ArrayDataset | None
    evaluation: ArrayDataset | None
    notes: list[str] = field(default_factory=list)

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]


def resolve_inputs(
    model_ref: str,
    weights: str | None = None,
    data_ref: str | None = None,
    calib_ref: str | None = None,
    calib_size: int = 256,
    eval_limit: int | None = None,
    seed: int = 0,
) -> Inputs:
    """Load the model and its data. Without `data_ref`, a zoo model's own data set is used.

    Calibration comes from `calib_ref` when given, else from the data set's calibration split, else from a
    random part of `data_ref` that is then held out of the evaluation (said in `notes`).
    """
    loaded = load_any_model(model_ref, weights)
    notes = list(loaded.warnings)
    data_ref = data_ref or loaded.spec.dataset
    calibration = evaluation = None
    if data_ref is not None:
        data = load_data(data_ref, loaded.normalisation, seed=seed)
        if isinstance(data, DataSplits):
            calibration, evaluation = data.calibration, data.test
        else:
            evaluation = data
    if calib_ref is not None:
        cal = load_data(calib_ref, loaded.normalisation, seed=seed)
        calibration = cal.calibration or cal.train if isinstance(cal, DataSplits) else cal
        calibration = calibration.take(calib_size, seed=seed)
    elif calibration is None and evaluation is not None:
        parts = split(evaluation, calibration=calib_size, test=len(evaluation) - calib_size, seed=seed)
        calibration, evaluation = parts.calibration, parts.test
        notes.append(
            f"calibrating on {len(calibration)} items of the evaluation data, held out from the score "
            "(give --calib-data to calibrate on other data)"
        )
    elif calibration is not None:
        calibration = calibration.take(calib_size, seed=seed)
    if evaluation is not None and eval_limit is not None:
        evaluation = evaluation.take(eval_limit, seed=seed)
    example = loaded.example_input if calibration is None else calibration.x[:2]
    layers = discover_layers(loaded.model, example)
    return Inputs(loaded, layers, calibration, evaluation, notes)


@dataclass
class PTQResult:
    """One quantized variant of the model: its allocation, what it costs and how well it does."""

    label: str
    allocation: Allocation
    cost: dict[str, Any]
    metrics: dict[str, Any]  # EvalResult fields (top1, loss, agreement, kl); empty without evaluation data

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "allocation": self.allocation.to_dict(),
            "cost": self.cost,
            "metrics": self.metrics,
        }


def _metrics(result: EvalResult | None) -> dict[str, Any]:
    return {} if result is None else result.to_dict()


def run_ptq(
    inputs: Inputs,
    allocations: list[tuple[str, Allocation]],
    config: QuantConfig | None = None,
    progress: ProgressFn | None = None,
) -> tuple[PTQResult, list[PTQResult]]:
    """Post-training quantization of each allocation; returns the FP32 reference and the quantized results."""
    config = config or QuantConfig()
    progress = progress or (lambda msg: None)
    cost_model = CostModel(inputs.layers, weight_granularity=config.weight_granularity)
    model = inputs.loaded.model
    ev = inputs.evaluation
    progress("evaluating FP32")
    fp = evaluate(model, ev) if ev is not None else None
    fp32_alloc = Allocation.uniform(inputs.layer_names, LayerBits(32, 32), model=inputs.loaded.spec.ref)
    reference = PTQResult("FP32", fp32_alloc, cost_model.cost(fp32_alloc).to_dict(), _metrics(fp))
    results = []
    for label, alloc in allocations:
        progress(f"quantizing {label}")
        qmodel = apply_allocation(model, alloc, inputs.calibration, config)
        progress(f"evaluating {label}")
        res = evaluate(qmodel, ev, reference_logits=fp.logits if fp else None) if ev is not None else None
        results.append(PTQResult(label, alloc, cost_model.cost(alloc).to_dict(), _metrics(res)))
    return reference, results


def uniform_allocations(inputs: Inputs, bits: list[str]) -> list[tuple[str, Allocation]]:
    out = []
    for b in bits:
        lb = LayerBits.parse(b)
        out.append((lb.label(), Allocation.uniform(inputs.layer_names, lb, model=inputs.loaded.spec.ref)))
    if not out:
        raise BitsearchError("give at least one --bits option")
    return out


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


# --- search: model + data -> SensitivityTable -> ParetoFront (measured) -> recommendations -------------------

SEARCH_FIELDS = {
    "model", "weights", "data", "calib_data", "calib_size", "eval_limit", "seed", "budgets", "weight_bits",
    "activation_bits", "constraints", "method", "method_params", "samples", "solver", "solver_params", "pareto",
    "pareto_metric", "quant", "measure", "latency_table", "keep_first_last", "refine", "confidence", "selection",
}


@dataclass
class SearchSpec:
    """One search request, as the CLI, the REST API and the workers all pass it (JSON-able)."""

    model: str
    weights: str | None = None
    data: str | None = None  # None with a zoo model: its own data set; "none": data-free
    calib_data: str | None = None
    calib_size: int = 256
    eval_limit: int | None = None
    seed: int = 0
    budgets: list[str] = field(default_factory=list)
    weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    activation_bits: list[int] = field(default_factory=lambda: [32])
    constraints: dict[str, Any] = field(default_factory=dict)
    keep_first_last: bool = False  # pin the first and last layer at 8 bits
    method: str = "hessian"
    method_params: dict[str, Any] = field(default_factory=dict)
    samples: int = 256
    solver: str = "ilp"
    solver_params: dict[str, Any] = field(default_factory=dict)
    pareto: int = 10
    pareto_metric: str | None = None  # default: the first budget's metric, else average weight bits
    quant: dict[str, Any] = field(default_factory=dict)
    measure: bool = True
    latency_table: dict[str, Any] | None = None
    # Measured stage (search.selection / search.refine): the evaluation data are split at random into a
    # selection part (fraction or count; the recommendation is chosen there) and a report part (only
    # measured); a mixed point replaces uniform only on a significant paired advantage at `confidence`.
    refine: bool | dict[str, Any] = True  # interaction-aware refinement at the requested budgets
    confidence: float = 0.95
    selection: float | int = 0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpec":
        if not isinstance(d, dict):
            raise BitsearchError("a search spec must be an object")
        unknown = set(d) - SEARCH_FIELDS
        if unknown:
            raise BitsearchError(f"unknown search field(s) {sorted(unknown)}; known: {sorted(SEARCH_FIELDS)}")
        if "model" not in d or not isinstance(d["model"], str):
            raise BitsearchError("a search needs a model reference (e.g. zoo:digits-cnn)")
        spec = cls(**d)
        budgets = []
        for b in spec.budgets:
            if isinstance(b, dict):  # {"metric": ..., "value"/"limit": ...}
                b = f"{b.get('metric')}={b.get('value', b.get('limit'))}"
            budgets.append(str(b))
        spec.budgets = budgets
        if not isinstance(spec.pareto, int) or isinstance(spec.pareto, bool) or not 1 <= spec.pareto <= 500:
            raise BitsearchError("pareto must be an integer number of points within 1..500")
        from search.refine import RefineConfig
        from search.selection import split_roles

        RefineConfig.from_dict(spec.refine)  # validates
        if isinstance(spec.confidence, bool) or not isinstance(spec.confidence, (int, float)) \
                or not 0.5 <= spec.confidence < 1:
            raise BitsearchError(f"confidence must be a number in [0.5, 1), got {spec.confidence!r}")
        split_roles(1000, spec.selection)  # validates the fraction or count
        return spec

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def run_search(spec: dict[str, Any] | SearchSpec, progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """The whole search: sensitivity table, Pareto front over budgets, measured selection, recommendations."""
    import time

    from quant.cost import CostModel
    from search import AllocationProblem, Constraints, pareto_front, parse_budgets
    from search.selection import recommend_with_evidence, split_roles
    from search.problem import canonical_metric
    from sensitivity import SensitivityOptions, compute_sensitivity

    s = spec if isinstance(spec, SearchSpec) else SearchSpec.from_dict(spec)
    progress = progress or (lambda f, m: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress(0.0, "loading model and data")
    data_free = s.data == "none"
    inputs = resolve_inputs(s.model, s.weights, None if data_free else s.data, s.calib_data, s.calib_size,
                            s.eval_limit, s.seed)
    config = QuantConfig.from_dict(s.quant) if s.quant else QuantConfig()
    budgets = parse_budgets(s.budgets)  # validate before the expensive part
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    options = SensitivityOptions(tuple(s.weight_bits), tuple(s.activation_bits), samples=s.samples, seed=s.seed,
                                 quant=config, params=dict(s.method_params))
    sens_data = None if data_free else inputs.calibration
    table = compute_sensitivity(inputs.loaded.model, sens_data, s.method, options,
                                progress=lambda f, m: progress(0.05 + 0.45 * f, f"sensitivity: {m}"),
                                example_input=inputs.loaded.example_input)
    timings["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(0.5, "solving")
    cost = CostModel(table.layers, s.latency_table, weight_granularity=config.weight_granularity)
    constraints = Constraints.from_dict(s.constraints)
    if s.keep_first_last:
        constraints.pin_first = constraints.pin_first or LayerBits(8, 8)
        constraints.pin_last = constraints.pin_last or LayerBits(8, 8)
    problem = AllocationProblem(table, cost, budgets, constraints)
    metric = s.pareto_metric or (budgets[0].metric if budgets else "avg_weight_bits")
    # Solve exactly at the requested budgets on the swept metric too: a grid point just below a budget
    # can be much worse than the optimum at it (ResNet-20 at 2.5 average bits: 27 % against 65 %).
    requested = [b.limit for b in budgets if b.metric == canonical_metric(metric)]
    front = pareto_front(problem, metric, s.pareto, s.solver, extra_limits=requested, **s.solver_params)
    timings["solve"] = time.perf_counter() - t

    recommendations: list[dict[str, Any]] = []
    stage_costs_out: dict[str, Any] = {}
    data_roles: dict[str, Any] = {"calibration": len(inputs.calibration) if inputs.calibration is not None else 0}
    notes = list(inputs.notes)
    if s.measure and inputs.evaluation is not None:
        t = time.perf_counter()
        calib = None if data_free else inputs.calibration
        if calib is None and any(not b.activation_bits >= 16 for b in table.options):
            from sensitivity.datafree import distill_inputs

            calib = distill_inputs(inputs.loaded.model, inputs.loaded.example_input, s.calib_size, seed=s.seed)
        ev = inputs.evaluation
        roles = split_roles(len(ev), s.selection, seed=s.seed)
        selection = ev.subset(roles.selection)
        report = ev.subset(roles.report) if roles.honest else None
        data_roles.update(roles.sizes())
        if roles.note:
            notes.append(roles.note)
        front, selected, stage_costs = recommend_with_evidence(
            front, problem, budgets, inputs.loaded.model, calib, selection, report, config, s.refine,
            s.confidence, progress=lambda f, m: progress(0.55 + 0.4 * f, f"measuring: {m}"))
        recommendations = [r.to_dict() for r in selected]
        timings["measure"] = time.perf_counter() - t
        stage_costs_out.update(stage_costs)
    progress(1.0, "done")
    return {
        "spec": s.to_dict(),
        "layers": [l.to_dict() for l in table.layers],
        "sensitivity": table.to_dict(),
        "front": front.to_dict(),
        "recommendations": recommendations,
        "timings": timings,
        "data": data_roles,
        "costs": stage_costs_out,
        "notes": notes + list(front.notes),
    }
