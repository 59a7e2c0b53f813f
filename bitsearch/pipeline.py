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

from quant import Allocation, QuantConfig, default_tie_groups
from quant.apply import search_quant_config
from quant.cost import CostModel
from quant.errors import BitsearchError

from search.measured import MEASURED_SOLVERS, measured_front

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
    measured_context: Mapping[str, Any] | None = None,
) -> SearchResult:
    """The whole search; see the module docstring. `model`/`data`/`roles`: Python objects that take the place
    of the spec's references. `measured_context`: where the measured solvers (bayes, bomp-nas, qbitopt) keep
    their study and checkpoints (`search.measured.measured_front`; the service passes its database)."""
    from search import AllocationProblem, Budget, pareto_front
    from search.budgets import canonical_metric
    from search.selection import recommend_with_evidence
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
        # the search's PTQ recipe (GPTQ rounding, MSE clipping, bias correction) under the user's settings
        config = search_quant_config(s.quant, calibration_available=resolved.calibration is not None)
        budgets = [Budget(b.metric, b.limit()) for b in s.budgets]  # validated by the spec
        timings["load"] = time.perf_counter() - t

        t = time.perf_counter()
        options = SensitivityOptions(tuple(s.options.weight_bits), tuple(s.options.activation_bits),
                                     schemes=tuple(s.options.schemes),
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
        if s.options.ties is None:  # fused projections (q/k/v, gate/up) share an option unless told otherwise
            constraints.ties = default_tie_groups(table.layers)
        check_layer_names(constraints, [l.name for l in table.layers])
        problem = AllocationProblem(table, cost, budgets, constraints)
        metric = s.pareto_metric or (budgets[0].metric if budgets else "avg_weight_bits")
        # Solve exactly at the requested budgets on the swept metric too: a grid point just below a budget
        # can be much worse than the optimum at it (ResNet-20 at 2.5 average bits: 27 % against 65 %).
        requested = [b.limit for b in budgets if b.metric == canonical_metric(metric)]
        own_rec = None
        if s.solver.name in MEASURED_SOLVERS:
            front, own_rec, extras = measured_front(
                s.solver.name, dict(s.solver.settings), model=loaded.model,
                model_ref=s.model if isinstance(s.model, str) else None, weights=s.weights,
                data_ref=_train_source(s), problem=problem, metric=metric, n_points=s.pareto_points,
                requested=requested, quant_config=config, budgets=budgets, weight_bits=s.options.weight_bits,
                activation_bits=s.options.activation_bits, train=resolved.train, calibration=resolved.calibration,
                selection=resolved.selection, report=resolved.report, progress=progress,
                context=measured_context)
            front.notes.append(f"{s.solver.name}: " + extras["summary"])
        else:
            front = pareto_front(problem, metric, s.pareto_points, s.solver.name, extra_limits=requested,
                                 **s.solver.settings)
        timings["solve"] = time.perf_counter() - t

        recs: list[Recommendation] = []
        reference_report = None
        costs: dict[str, Any] = {}
        split_notes: list[str] = []
        if own_rec is not None:  # bomp-nas / qbitopt: points measured by their own training, not by PTQ
            i = own_rec["index"]
            recs.append(Recommendation(i, list(budgets), True, front.points[i], own_rec.get("report")))
        elif s.measure and resolved.selection is not None:
            t = time.perf_counter()
            calib = resolved.calibration
            if calib is None and any(not b.activation_bits >= 16 for b in table.options):
                from sensitivity.datafree import distill_inputs

                calib = distill_inputs(loaded.model, loaded.example_input, s.calib_size, seed=s.seed)
            split_notes = honesty_notes(resolved)
            # Refinement at the requested budgets, every candidate measured on the selection data (and the
            # report data), one paired selection per budget with its evidence: search.selection.
            front, selected, costs = recommend_with_evidence(
                front, problem, budgets, loaded.model, calib, resolved.selection, resolved.report, config,
                s.refine, s.confidence, solver="ilp",
                progress=lambda f, m: progress(0.55 + 0.4 * f, f"measuring: {m}"),
                report_points=s.report_points)
            timings["measure"] = time.perf_counter() - t
            points = list(front.points) + list(front.uniform)
            index = {id(p): i for i, p in enumerate(points)}
            for r in selected:
                rep_ = r.point.report or None
                recs.append(Recommendation(index[id(r.point)], r.budgets, r.requested, r.point, rep_,
                                           r.evidence.to_dict()))
            reference_report = front.report_reference
            if s.measure_latency.enabled:
                from quant.profile import measure_front_latency

                t = time.perf_counter()
                ml = s.measure_latency
                progress(0.96, "timing the front in ONNX Runtime")
                measure_front_latency(points, loaded.model, loaded.example_input, calib, config,
                                      batch_size=ml.batch_size, provider=ml.provider, warmup=ml.warmup,
                                      repeats=ml.repeats, threads=ml.threads)
                timings["latency"] = time.perf_counter() - t
                split_notes.append(f"end-to-end latency: each point exported as ONNX QDQ and timed in ONNX "
                                   f"Runtime ({ml.provider}, batch {ml.batch_size}, median of {ml.repeats} runs)")
        elif s.measure_latency.enabled:
            split_notes.append("end-to-end latency was not measured: it is timed on the measured front only "
                               "(measure on, selection data present, a solver that is not a training one)")
        progress(1.0, "done")
        notes = list(loaded.warnings) + resolved.notes + split_notes + list(front.notes)
        return SearchResult(spec=s, model=loaded.spec.ref, table=table, front=front, recommendations=recs,
                            timings=timings, notes=notes, data=resolved.record, reference_report=reference_report,
                            costs=costs)
    finally:
        if module is not None and was_training:
            module.train()


def _train_source(s: SearchSpec) -> str | None:
    """The data reference a trial worker reloads its training data from (bomp-nas workers are other processes)."""
    train = s.roles.train
    if train is not None and train.source is not None:
        return train.source
    return s.data if s.data not in (None, "none") else None


def honesty_notes(resolved) -> list[str]:
    """What the result must say when its data cannot back an out-of-sample claim."""
    from search.selection import MIN_ROLE_ITEMS

    sel, rep = resolved.selection, resolved.report
    if rep is None:
        return [f"no report data: every figure is measured on the {len(sel)} selection items the "
                "recommendation was chosen on, which overstates it (give more data, or a report role)"]
    if min(len(sel), len(rep)) < MIN_ROLE_ITEMS:
        return [f"only {len(sel)} selection and {len(rep)} report items (fewer than {MIN_ROLE_ITEMS}): too few "
                "to choose on one part and report on another honestly; the paired tests will rarely find a "
                "difference and the report figures are not a reliable out-of-sample accuracy (give more data)"]
    return []


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
