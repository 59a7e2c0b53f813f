"""The search as one function over typed objects: `run_search(spec, model, data) -> SearchResult`.

model + data -> sensitivity table -> Pareto front (with exact solves at the requested budgets) -> measured
on the selection data -> recommendations (one per swept budget, one at the requested budgets) -> the
recommended points reported on the report data. The CLI, the REST workers and `bitsearch.search` all run
this function, so a spec gives the same front wherever it runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch

from quant import Allocation, QuantConfig
from quant.cost import CostModel
from quant.errors import BitsearchError

from . import models
from .data import resolve_data
from .result import Recommendation, SearchResult
from .spec import SearchSpec

ProgressFn = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    pass


def prepare(spec: SearchSpec, model: Any = None, data: Any = None, roles: Mapping[str, Any] | None = None,
            example_input: torch.Tensor | None = None):
    """(LoadedModel, ResolvedData) for a spec, with Python objects for the model and data when given."""
    target = model if model is not None else spec.model
    if target is None:
        raise BitsearchError("a search needs a model: an nn.Module, an ExportedProgram, 'zoo:NAME' or a .pt2 path")
    loaded = None
    if not isinstance(target, torch.nn.Module) or example_input is not None:
        loaded = models.load(target, spec.weights, example_input)
    source = data if data is not None else spec.data
    resolved = resolve_data(
        source,
        roles if roles is not None else spec.roles,
        normalisation=loaded.normalisation if loaded else None,
        model_dataset=loaded.spec.dataset if loaded else None,
        calib_size=spec.calib_size,
        eval_limit=spec.eval_limit,
        seed=spec.seed,
        num_classes=loaded.num_classes if loaded else None,
    )
    if loaded is None:  # a module object: its example input comes from the data
        ds = next((resolved.get(r) for r in ("calibration", "selection", "report", "train") if resolved.get(r)), None)
        if ds is None:
            raise BitsearchError("a model object needs data (or example_input=...) to know its input shape")
        loaded = models.load(target, None, ds.x[:2])
        for role in ("train", "calibration", "selection", "report"):
            d = resolved.get(role)
            if d is not None and d.y is not None and len(d.y) and int(d.y.max()) >= loaded.num_classes:
                raise BitsearchError(f"the {role} data has labels up to {int(d.y.max())}, but the model has "
                                     f"{loaded.num_classes} classes")
    return loaded, resolved


def run_search(
    spec: SearchSpec | Mapping[str, Any],
    progress: ProgressFn | None = None,
    *,
    model: Any = None,
    data: Any = None,
    roles: Mapping[str, Any] | None = None,
    example_input: torch.Tensor | None = None,
) -> SearchResult:
    """The whole search; see the module docstring. `model`/`data`/`roles`: Python objects that take the place
    of the spec's references."""
    from search import AllocationProblem, Budget, measure_front, pareto_front, recommend
    from search.budgets import canonical_metric
    from sensitivity import SensitivityOptions, compute_sensitivity

    s = SearchSpec.parse(spec)
    progress = progress or _no_progress
    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress(0.0, "loading model and data")
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else None
    loaded, resolved = prepare(s, model, data, roles, example_input)
    try:
        config = QuantConfig.from_dict(s.quant) if s.quant else QuantConfig()
        budgets = [Budget(b.metric, b.limit()) for b in s.budgets]  # validated by the spec
        timings["load"] = time.perf_counter() - t

        t = time.perf_counter()
        options = SensitivityOptions(tuple(s.options.weight_bits), tuple(s.options.activation_bits),
                                     samples=s.sensitivity.samples, seed=s.seed, quant=config,
                                     params=dict(s.sensitivity.settings))
        table = compute_sensitivity(loaded.model, resolved.calibration, s.sensitivity.method, options,
                                    progress=lambda f, m: progress(0.05 + 0.45 * f, f"sensitivity: {m}"),
                                    example_input=loaded.example_input)
        timings["sensitivity"] = time.perf_counter() - t

        t = time.perf_counter()
        progress(0.5, "solving")
        cost = CostModel(table.layers, s.latency_table, weight_granularity=config.weight_granularity)
        constraints = s.options.constraints()
        check_layer_names(constraints, [l.name for l in table.layers])
        problem = AllocationProblem(table, cost, budgets, constraints)
        metric = s.pareto_metric or (budgets[0].metric if budgets else "avg_weight_bits")
        # Solve exactly at the requested budgets on the swept metric too: a grid point just below a budget
        # can be much worse than the optimum at it (ResNet-20 at 2.5 average bits: 27 % against 65 %).
        requested = [b.limit for b in budgets if b.metric == canonical_metric(metric)]
        front = pareto_front(problem, metric, s.pareto_points, s.solver.name, extra_limits=requested,
                             **s.solver.settings)
        timings["solve"] = time.perf_counter() - t

        recs: list[Recommendation] = []
        reference_report = None
        if s.measure and resolved.selection is not None:
            t = time.perf_counter()
            calib = resolved.calibration
            if calib is None and any(not b.activation_bits >= 16 for b in table.options):
                from sensitivity.datafree import distill_inputs

                calib = distill_inputs(loaded.model, loaded.example_input, s.calib_size, seed=s.seed)
            front = measure_front(front, loaded.model, calib, resolved.selection, config,
                                  progress=lambda f, m: progress(0.55 + 0.35 * f, f"measuring: {m}"))
            timings["measure"] = time.perf_counter() - t
            points = list(front.points) + list(front.uniform)
            index = {id(p): i for i, p in enumerate(points)}
            # one recommendation per swept budget (the front's own budgets stay in force)
            for limit in sorted({p.budget for p in front.points if p.budget is not None}):
                b = Budget(metric, limit)
                p = recommend(front, [b])
                recs.append(Recommendation(index[id(p)], [b], False, p))
            if budgets:
                p = recommend(front, budgets)
                recs.append(Recommendation(index[id(p)], list(budgets), True, p))
            if resolved.report is not None and recs:
                t = time.perf_counter()
                progress(0.92, "reporting the recommended points")
                reference_report, reports = report_points(
                    loaded.model, [r.point.allocation for r in recs], calib, resolved.report, config)
                for r, rep in zip(recs, reports):
                    r.report = rep
                timings["report"] = time.perf_counter() - t
        progress(1.0, "done")
        notes = list(loaded.warnings) + resolved.notes + list(front.notes)
        return SearchResult(spec=s, model=loaded.spec.ref, table=table, front=front, recommendations=recs,
                            timings=timings, notes=notes, data=resolved.record, reference_report=reference_report)
    finally:
        if module is not None and was_training:
            module.train()


def check_layer_names(constraints, names: list[str]) -> None:
    """Pins and ties must name layers the model has (a typo would otherwise pin nothing)."""
    known = set(names)
    named = set(constraints.pinned) | {n for g in constraints.ties for n in g}
    unknown = sorted(named - known)
    if unknown:
        raise BitsearchError(f"pins/ties name unknown layer(s) {unknown[:10]}; the model's layers: {names[:50]}")


def report_points(model, allocations: list[Allocation], calibration, report, config: QuantConfig):
    """The FP32 model and each allocation on the report data: (reference metrics, [metrics])."""
    import copy

    from quant.apply import collect_statistics, needs_calibration, set_allocation, wrap_model
    from zoo import evaluate

    ref = evaluate(model, report)
    qmodel = copy.deepcopy(model).eval()
    layers = wrap_model(qmodel, config)
    if any(needs_calibration(a, config) for a in allocations):
        collect_statistics(qmodel, layers, calibration, config)
    out = []
    for a in allocations:
        set_allocation(qmodel, a)
        out.append(evaluate(qmodel, report, reference_logits=ref.logits).to_dict())
    return ref.to_dict(), out
