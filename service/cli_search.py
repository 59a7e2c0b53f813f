"""`bitsearch sensitivity`, `bitsearch search` and `bitsearch finetune`: the data path from the shell.

They register on the one `bitsearch` app; each calls the same pipeline function the service and the
workers call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from bitsearch.spec import SearchSpec, spec_defaults
from quant.errors import BitsearchError

from .cli_common import app, console, err_console, fmt_bytes, fmt_num, status, write_json


def _bits_list(text: str, what: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("fp", "fp32", "float"):
            out.append(32)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise BitsearchError(f"{what} must be comma-separated bit-widths (e.g. 2,3,4,8), got {text!r}") from None
    if not out:
        raise BitsearchError(f"{what} is empty")
    return out


#: Every default of `bitsearch search` comes from the spec (a test checks the flags against it).
SPEC = spec_defaults()


def _kv(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE options; a VALUE that parses as JSON is taken as such (numbers, true/false, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BitsearchError(f"{what} takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _bits_csv(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _table_of_sensitivity(table) -> Table:
    t = Table(title=f"sensitivity ({table.method}): estimated loss increase per layer and option")
    t.add_column("layer")
    t.add_column("params", justify="right")
    for o in table.options:
        t.add_column(o.label(), justify="right")
    for i, layer in enumerate(table.layers):
        cells = []
        for j in range(len(table.options)):
            v = table.values[i, j]
            cell = "—" if v != v else f"{v:.3g}"
            if table.stderr is not None and table.stderr[i, j] == table.stderr[i, j] and table.stderr[i, j] > 0:
                cell += f" ±{table.stderr[i, j]:.1g}"
            cells.append(cell)
        t.add_row(layer.name, str(layer.params), *cells)
    return t


@app.command()
def sensitivity(
    model: str = typer.Option(..., "--model", help="zoo:NAME."),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    data: Optional[str] = typer.Option(None, "--data", help="zoo:NAME, an .npz file, or 'none' for data-free."),
    method: str = typer.Option(SPEC["sensitivity.method"], "--method", help="hessian, fisher, orthogonality, measured."),
    weight_bits: str = typer.Option(_bits_csv(SPEC["options.weight_bits"]), "--weight-bits"),
    activation_bits: str = typer.Option(_bits_csv(SPEC["options.activation_bits"]), "--activation-bits",
                                        help="e.g. 4,8,32 (32: weights only)."),
    samples: int = typer.Option(SPEC["sensitivity.samples"], "--samples", min=1, help="Data samples the method may use."),
    seed: int = typer.Option(SPEC["seed"], "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the table as JSON."),
) -> None:
    """Per-layer, per-bit-option sensitivity table."""
    from sensitivity import SensitivityOptions, compute_sensitivity
    from service.pipeline import resolve_inputs

    options = SensitivityOptions(tuple(_bits_list(weight_bits, "--weight-bits")),
                                 tuple(_bits_list(activation_bits, "--activation-bits")), samples=samples, seed=seed)
    data_free = data == "none"
    with status("loading model and data") as s:
        inputs = resolve_inputs(model, str(weights) if weights else None, None if data_free else data,
                                calib_size=samples, seed=seed)
        if not data_free and inputs.calibration is None:
            raise BitsearchError(f"{model} has no built-in data set: give --data (or --data none for data-free)")
        table = compute_sensitivity(inputs.loaded.model, None if data_free else inputs.calibration, method, options,
                                    progress=lambda f, m: s.update(f"{method}: {m} ({f * 100:.0f} %)"),
                                    example_input=inputs.loaded.example_input)
    console.print(_table_of_sensitivity(table))
    extra = f", estimator {table.settings.get('estimator')}" if table.settings.get("estimator") else ""
    console.print(
        f"data: {table.data.get('name') or '—'} ({table.data.get('samples')} samples"
        f"{', data-free' if table.data.get('data_free') else ''}); "
        f"{table.cost.get('seconds', 0):.1f} s{extra}"
    )
    write_json(json_path, table.to_dict())


def search_spec_from_flags(
    model: str, weights: Optional[Path], data: Optional[str], calib_data: Optional[str], budget: list[str],
    method: str, method_param: list[str], solver: str, solver_param: list[str], pareto: int,
    metric: Optional[str], weight_bits: str, activation_bits: str, keep_first_last: bool, clip: Optional[str],
    samples: int, calib_size: int, limit: Optional[int], no_measure: bool, seed: int,
    selection_data: Optional[str] = None, report_data: Optional[str] = None, schemes: str = "",
) -> SearchSpec:
    scheme_list = [p.strip() for p in schemes.split(",") if p.strip()]
    roles = {r: {"source": v} for r, v in (("calibration", calib_data), ("selection", selection_data),
                                           ("report", report_data)) if v is not None}
    return SearchSpec.parse({
        "model": model, "weights": str(weights) if weights else None, "data": data, "roles": roles,
        "budgets": list(budget), "pareto_points": pareto, "pareto_metric": metric,
        "sensitivity": {"method": method, "settings": _kv(method_param, "--method-param"), "samples": samples},
        "solver": {"name": solver, "settings": _kv(solver_param, "--solver-param")},
        "options": {"weight_bits": [] if scheme_list and weight_bits.strip().lower() in ("", "none")
                    else _bits_list(weight_bits, "--weight-bits"), "schemes": scheme_list,
                    "activation_bits": _bits_list(activation_bits, "--activation-bits"),
                    "keep_first_last": keep_first_last},
        "quant": {"weight_clip": clip} if clip else {}, "calib_size": calib_size, "eval_limit": limit,
        "measure": not no_measure, "seed": seed,
    })


@app.command()
def search(
    model: str = typer.Option(..., "--model", help="zoo:NAME or an exported .pt2 file."),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    data: Optional[str] = typer.Option(SPEC["data"], "--data", help="zoo:NAME, an .npz file, or 'none' for data-free."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration role's data (zoo:NAME, .npz)."),
    selection_data: Optional[str] = typer.Option(None, "--selection-data", help="Data the recommendation is chosen on."),
    report_data: Optional[str] = typer.Option(None, "--report-data", help="Held-out data the chosen points are reported on."),
    budget: list[str] = typer.Option([], "--budget", help="metric=value, e.g. avg_wbits=3, bops=1.2e9. Repeatable."),
    method: str = typer.Option(SPEC["sensitivity.method"], "--method", help="Sensitivity method."),
    method_param: list[str] = typer.Option([], "--method-param", help="KEY=VALUE setting of the method. Repeatable."),
    solver: str = typer.Option(SPEC["solver.name"], "--solver", help="ilp, knapsack, lp, exhaustive; measured: bayes, bomp-nas, qbitopt."),
    solver_param: list[str] = typer.Option([], "--solver-param", help="KEY=VALUE setting of the solver. Repeatable."),
    pareto: int = typer.Option(SPEC["pareto_points"], "--pareto", min=1, help="Points of the Pareto sweep."),
    metric: Optional[str] = typer.Option(SPEC["pareto_metric"], "--metric", help="Cost axis of the sweep (default: first budget's)."),
    weight_bits: str = typer.Option(_bits_csv(SPEC["options.weight_bits"]), "--weight-bits"),
    activation_bits: str = typer.Option(_bits_csv(SPEC["options.activation_bits"]), "--activation-bits"),
    schemes: str = typer.Option(",".join(SPEC["options.schemes"]), "--schemes",
                                help="Comma-separated weight schemes besides --weight-bits (int4-g128, mxfp4, nvfp4, "
                                     "fp8-e4m3, ...); --weight-bits none for schemes only. Priced by --method measured, fisher or hessian."),
    keep_first_last: bool = typer.Option(SPEC["options.keep_first_last"], "--keep-first-last", help="Pin the first and last layer at W8A8."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Weight clipping used to realise every option (default: QuantConfig's)."),
    samples: int = typer.Option(SPEC["sensitivity.samples"], "--samples", min=1, help="Data items the sensitivity method may use."),
    calib_size: int = typer.Option(SPEC["calib_size"], "--calib-size", min=1, help="Calibration items."),
    limit: Optional[int] = typer.Option(SPEC["eval_limit"], "--limit", min=1, help="Evaluate on at most this many items."),
    no_measure: bool = typer.Option(not SPEC["measure"], "--no-measure", help="Skip measuring the front (predicted only)."),
    seed: int = typer.Option(SPEC["seed"], "--seed"),
    no_refine: bool = typer.Option(not SPEC["refine"], "--no-refine", help="Skip the measured refinement at the budgets."),
    confidence: float = typer.Option(SPEC["confidence"], "--confidence", min=0.5, max=0.999,
                                     help="Confidence level of the paired test mixed vs uniform, and of the intervals."),
    report_points: str = typer.Option(SPEC["report_points"], "--report-points",
                                      help="Points measured on the report data: 'evidence' (the recommendation, "
                                           "its uniform baseline and mixed contender) or 'all'."),
    measure_latency: bool = typer.Option(SPEC["measure_latency.enabled"], "--measure-latency/--no-measure-latency",
                                         help="Time every measured front point end to end in ONNX Runtime."),
    latency_batch: int = typer.Option(SPEC["measure_latency.batch_size"], "--latency-batch", min=1,
                                      help="Batch size of the end-to-end timing."),
    latency_repeats: int = typer.Option(SPEC["measure_latency.repeats"], "--latency-repeats", min=1,
                                        help="Timed runs per point (median and quartiles kept)."),
    latency_provider: str = typer.Option(SPEC["measure_latency.provider"], "--latency-provider",
                                         help="ONNX Runtime execution provider of the timing."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the whole result (SearchResult JSON)."),
    allocation_out: Optional[Path] = typer.Option(None, "--allocation", help="Write the recommended allocation."),
) -> None:
    """Sensitivity, then the Pareto front of the allocation problem, measured, with recommendations."""
    from search.problem import format_value
    from service.pipeline import run_search

    spec = search_spec_from_flags(model, weights, data, calib_data, budget, method, method_param, solver,
                                  solver_param, pareto, metric, weight_bits, activation_bits, keep_first_last, clip,
                                  samples, calib_size, limit, no_measure, seed, selection_data, report_data, schemes)
    spec = SearchSpec.parse({**spec.model_dump(), "refine": not no_refine, "confidence": confidence,
                             "report_points": report_points,
                             "measure_latency": {**spec.measure_latency.model_dump(), "enabled": measure_latency,
                                                 "batch_size": latency_batch, "repeats": latency_repeats,
                                                 "provider": latency_provider}})
    with status("searching") as s:
        result = run_search(spec, lambda f, m: s.update(f"{m} ({f * 100:.0f} %)"))
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    front = result.front
    m = front.metric
    ref = front.reference or {}
    lm = ref.get("perplexity") is not None  # a language model: perplexity where classifiers show top-1
    score, unit = ("perplexity", "") if lm else ("top1", " %")
    t = Table(title=f"Pareto front of {model}: {spec.sensitivity.method} + {spec.solver.name}, cost axis {m}"
                    + (f" (FP32 {score} {ref[score]:.2f}{unit})" if ref.get(score) is not None else ""))
    pct = f"{confidence:.0%}"
    for col in ("#", "kind", "allocation", m, "weights", "GBOPs", "predicted Δloss", f"{score}{unit} selection [{pct}]",
                f"{score}{unit} report [{pct}]", "KL"):
        t.add_column(col, justify="left" if col in ("kind", "allocation") else "right")

    def with_ci(value: Any, role: str, p: Any) -> str:
        ci = (p.intervals.get(role) or {}).get(score)
        return fmt_num(value) + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")

    order = sorted(range(len(result.points)), key=lambda i: (result.points[i].metrics[m], result.points[i].kind))
    for i in order:
        p = result.points[i]
        wbits = sorted({b.weight_bits for b in p.allocation.layers.values()})
        alloc = p.label or "mixed " + "/".join(f"W{w}" for w in wbits)
        t.add_row(str(i), p.kind, alloc, format_value(m, p.metrics[m]), fmt_bytes(p.metrics["weight_memory"] / 8),
                  f"{p.metrics['bops'] / 1e9:.3f}", f"{p.predicted:.4g}",
                  with_ci(p.measured.get(score), "selection", p), with_ci(p.report.get(score), "report", p),
                  fmt_num(p.measured.get("kl"), ".4f"))
    console.print(t)
    rec = result.recommendation
    if rec is not None:
        p = rec.point
        report = rec.report or {}
        console.print(
            f"recommended{' for ' + ', '.join(budget) if rec.requested else ''}: point {rec.index}, {p.kind} "
            f"{p.label or ''} at {format_value(m, p.metrics[m])}, {score} {fmt_num(p.measured.get(score))}{unit} "
            f"(selection data), {fmt_num(report.get(score))}{unit} on the held-out report data"
        )
        ev = rec.evidence or {}
        if ev:
            console.print(f"why: {ev['reason']}")
            d = ev.get("report")
            if d:
                console.print(f"on the report data ({d['n']} items): mixed contender − uniform {ev['baseline']} = "
                              f"{d['delta']:+.2f} points [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] ({pct})")
        if allocation_out is not None:
            rec.allocation.save(allocation_out)
            console.print(f"wrote {allocation_out}")
    elif allocation_out is not None:
        raise BitsearchError("--allocation needs a measured front (drop --no-measure and give data)")
    timed = [(i, p) for i, p in enumerate(list(front.points) + list(front.uniform)) if "latency_s" in p.measured]
    if timed:
        console.print(f"end-to-end latency in ONNX Runtime ({spec.measure_latency.provider}, batch "
                      f"{spec.measure_latency.batch_size}, median [p25, p75]): " + "; ".join(
                          f"#{i} {p.label or p.kind} {p.measured['latency_s'] * 1e3:.3f} ms "
                          f"[{p.measured['latency_p25_s'] * 1e3:.3f}, {p.measured['latency_p75_s'] * 1e3:.3f}]"
                          for i, p in timed))
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    write_json(json_path, result.to_dict())


@app.command()
def finetune(
    model: str = typer.Option(..., "--model", help="zoo:NAME or an exported .pt2 file."),
    allocation: Path = typer.Option(..., "--allocation", help="Allocation JSON (e.g. from bitsearch search)."),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    data: Optional[str] = typer.Option(None, "--data", help="Training data: zoo:NAME (its train split) or an .npz file."),
    steps: int = typer.Option(300, "--steps", min=1),
    lr: float = typer.Option(0.01, "--lr"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    recipe_path: Optional[Path] = typer.Option(None, "--recipe", help="QAT recipe JSON (overrides the flags)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Checkpoint (and resume) here."),
    seed: int = typer.Option(0, "--seed"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
) -> None:
    """Quantization-aware fine-tuning of an allocation, in the foreground."""
    import json as _json

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from quant import Allocation
    from service.finetune import run_finetune
    from service.jobs.kinds import JobContext

    alloc = Allocation.load(allocation)
    if recipe_path is not None:
        try:
            recipe = _json.loads(recipe_path.read_text())
        except (OSError, ValueError) as exc:
            raise BitsearchError(f"cannot read the recipe {recipe_path}: {exc}") from None
    else:
        recipe = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    spec = {"model": model, "weights": str(weights) if weights else None, "data": data,
            "allocation": alloc.to_dict(), "recipe": recipe, "seed": seed}
    ctx = None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ctx = JobContext("cli", 1, checkpoint_dir, lambda f, m: True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f} %"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("fine-tuning", total=1.0)
        out = run_finetune(spec, ctx, progress=lambda f, m: bar.update(task, completed=f, description=m))
    res = out.result
    t = Table(title=f"QAT of {model}")
    for col in ("", "top-1 %", "loss", "steps", "seconds"):
        t.add_column(col, justify="right" if col else "left")
    init = res.get("initial_metrics") or {}
    t.add_row("before (PTQ)", fmt_num(init.get("top1")), fmt_num(init.get("loss"), ".4f"), "", "")
    t.add_row("after", fmt_num(res["metrics"].get("top1")), fmt_num(res["metrics"].get("loss"), ".4f"),
              str(res["steps"]), f"{res['seconds']:.1f}")
    console.print(t)
    if res.get("resumed"):
        console.print("resumed from the checkpoint in", checkpoint_dir)
    write_json(json_path, res)
