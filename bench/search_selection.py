"""Recommendations against uniform precision out of sample: paired selection and measured refinement on
ResNet-20 (CIFAR-10 JPEG).

    .venv/bin/python bench/search_selection.py                       # -> bench/results/search_selection.md
    .venv/bin/python bench/search_selection.py --budgets 3.0 --wa W4A4   # a part

Data roles (disjoint by construction, checked): **calibration** = a seeded random 256 images of train.npz
(quantizer statistics and the sensitivity table) and a seeded random `--tune` images of train.npz (the
refinement's KL measurements; label-free, calibration role); **selection** = a random 2,000 of test.npz
(`search.selection.split_roles`, seed 0): every candidate is measured there and the recommendation is
chosen there (refinement may only *reject* a move there); **report** = the other 8,000 test images, on
which nothing is chosen. PTQ with the search's default recipe (`quant.apply.SEARCH_PTQ_DEFAULTS`:
per-channel weights with output-MSE clipping and GPTQ rounding, bias correction; per-tensor activations
with MSE clipping), the uniform baselines realised exactly like the mixed points; `--recipe rtn` gives the
previous one (`QuantConfig(weight_clip="auto")`: round to nearest, min-max activations).

Weight-only: options W{2,3,4,5,6,8}, activations float; budgets in average weight bits. W/A: options
W{2,3,4,5,6,8} x A{4,6,8} (first and last layers free like every other), budgets = size *and* BOPs of
uniform W4A4 / W3A4. Per budget: the best uniform allocation that fits (by selection top-1), the ILP
solution at the budget ("solver"), the same after `search.refine` ("+refine"), the old arg-max
`recommend` ("arg-max"), and `search.selection.select`'s recommendation, each on the report images with a
95 % interval; the recommendation's paired Δ against the uniform baseline on selection and on report.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, require_shared, run_footer, write_result, write_results

from quant import Allocation, LayerBits, QuantConfig
from quant.apply import collect_statistics, search_quant_config, set_allocation, wrap_model
from quant.cost import CostModel
from quant.layers import discover_layers
from search import AllocationProblem, Budget, pareto_front, recommend, solve
from search.pareto import ParetoFront, ParetoPoint
from search.refine import RefineConfig, refine, refined_point
from search.selection import check_disjoint, mean_interval, paired_test, select, split_roles
from sensitivity import SensitivityOptions, compute_sensitivity
from zoo import evaluate, load_model, load_npz

T0 = time.perf_counter()
CONFIG = search_quant_config({})  # the search's default recipe; main() may replace it (--recipe)
WBITS = (2, 3, 4, 5, 6, 8)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Clock:
    """Wall and CPU seconds of a stage (CPU: this process, all threads)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict[str, float]:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


class Measurer:
    """Wrap and calibrate once; per allocation and role, per-item values against FP32 (cached)."""

    def __init__(self, model, calibration, roles: dict):
        self.q = copy.deepcopy(model).eval()
        collect_statistics(self.q, wrap_model(self.q, CONFIG), calibration, CONFIG)
        self.roles = roles
        self.ref = {r: evaluate(model, d) for r, d in roles.items()}
        self.cache: dict[tuple, dict] = {}
        self.evaluations = {r: 0 for r in roles}
        self.clock = {r: {"wall": 0.0, "cpu": 0.0} for r in roles}

    def fill(self, p: ParetoPoint, role: str) -> None:
        key = (role, tuple(sorted((n, b.label()) for n, b in p.allocation.layers.items())))
        if key not in self.cache:
            c = Clock()
            set_allocation(self.q, p.allocation)
            r = evaluate(self.q, self.roles[role], reference_logits=self.ref[role].logits)
            self.cache[key] = {k: v.numpy() for k, v in r.per_sample.items()}
            self.evaluations[role] += 1
            for k, v in c.stop().items():
                self.clock[role][k] += v
        p.samples[role] = self.cache[key]
        p.measured = (
            p.measured
            if role != "selection"
            else {
                "top1": float(p.samples[role]["correct"].mean() * 100),
                "loss": float(p.samples[role]["ce"].mean()),
                "kl": float(p.samples[role]["kl"].mean()),
                "agreement": float(p.samples[role]["agree"].mean() * 100),
            }
        )


def key_of(p: ParetoPoint) -> tuple:
    return tuple(sorted((n, b.label()) for n, b in p.allocation.layers.items()))


def report_figure(p: ParetoPoint) -> str:
    v = p.samples["report"]["correct"]
    lo, hi = mean_interval(v, 0.95, 100.0)
    return f"{v.mean() * 100:.2f} [{lo:.2f}, {hi:.2f}]"


def run_setting(name, model, layers, calib, tune, sel_data, meas, wbits, abits, budget_sets, args, costs):
    """One option set: table, front, per budget solver point + refinement, selection, report figures."""
    cost = CostModel(layers)
    c = Clock()
    opts = SensitivityOptions(weight_bits=wbits, activation_bits=abits, samples=256, quant=CONFIG)
    table = compute_sensitivity(model, calib, args.method, opts)
    costs.append(
        (
            f"{name}: sensitivity ({args.method}, 256 images)",
            c.stop(),
            f"{table.cost.get('passes')} passes over 256 images",
        )
    )
    log(f"{name}: table {costs[-1][1]['wall']:.1f} s")
    rows = []
    for label, budgets, sweep in budget_sets:
        fixed = [b for b in budgets if b.metric != sweep.metric]
        problem = AllocationProblem(table, cost, fixed)
        c = Clock()
        front = pareto_front(problem, sweep.metric, args.front_points, "ilp", extra_limits=[sweep.limit])
        at_budget = problem.with_budgets(budgets)
        sol = solve(at_budget, "ilp")
        solve_clock = c.stop()
        solver_pt = ParetoPoint(
            sol.allocation, sol.objective, sol.metrics, kind="mixed", budget=sweep.limit, label="solver"
        )
        c = Clock()
        ref = refine(
            at_budget,
            sol.allocation,
            model,
            calib,
            tune,
            sel_data,
            CONFIG,
            RefineConfig() if args.max_passes is None else RefineConfig(max_passes=args.max_passes),
        )
        ref_clock = c.stop()
        refined = refined_point(at_budget, ref, sweep.limit)
        log(
            f"{name} {label}: refine kept {len(ref.steps)} move(s), KL {ref.kl_start:.4f} -> {ref.kl_end:.4f}, "
            f"guard {ref.guard_start:.2f} -> {ref.guard_end:.2f}, {ref.cost['passes']} passes, "
            f"{ref_clock['wall']:.0f} s ({ref.stopped})"
        )
        # candidates: the front's points and uniform baselines that fit, the solver point, the refined point
        seen, points = set(), []
        for p in [solver_pt, refined] + list(front.points):
            k = key_of(p)
            if k not in seen:
                seen.add(k)
                points.append(p)
        every = budgets
        fits = lambda p: all(b.holds(p.metrics[b.metric]) for b in every)
        points = [p for p in points if fits(p)]
        uniform = [u for u in front.uniform if fits(u)]
        cand = ParetoFront(front.metric, points, uniform, "ilp", table.method, budgets=[])
        c = Clock()
        for p in cand.candidates() + [solver_pt, refined]:
            meas.fill(p, "selection")
        measure_clock = c.stop()
        c = Clock()
        rec, ev = select(cand, budgets)
        select_clock = c.stop()
        argmax = recommend(cand, budgets)
        base = ev.baseline_point
        for p in {id(p): p for p in [rec, argmax, solver_pt, refined] + ([base] if base else [])}.values():
            meas.fill(p, "report")
        if ev.contender_point is not None:
            meas.fill(ev.contender_point, "report")
        rec, ev = select(cand, budgets)  # again, now with report values for the evidence
        d_argmax = (
            paired_test(argmax.samples["report"]["correct"], base.samples["report"]["correct"])
            if base
            else None
        )
        row = {
            "setting": name,
            "budget": label,
            "uniform": base.label if base else None,
            "uniform_report": report_figure(base) if base else "—",
            "solver_report": report_figure(solver_pt),
            "solver_sel": solver_pt.measured["top1"],
            "refined_report": report_figure(refined),
            "refined_sel": refined.measured["top1"],
            "refine": {**ref.summary(), "cost": ref.cost},
            "argmax_kind": argmax.label or argmax.kind,
            "argmax_sel": argmax.measured["top1"],
            "argmax_report": report_figure(argmax),
            "argmax_delta_report": d_argmax.to_dict() if d_argmax else None,
            "rec_kind": ev.recommended,
            "rec_label": rec.label or rec.kind,
            "rec_report": report_figure(rec),
            "rec_report_top1": float(rec.samples["report"]["correct"].mean() * 100),
            "uniform_report_top1": float(base.samples["report"]["correct"].mean() * 100) if base else None,
            "evidence": ev.to_dict(),
            "bits": "/".join(rec.allocation[n].label() for n in [l.name for l in layers]),
            "refined_bits": "/".join(refined.allocation[n].label() for n in [l.name for l in layers]),
            "contender_bits": "/".join(
                ev.contender_point.allocation[n].label() for n in [l.name for l in layers]
            )
            if ev.contender_point is not None
            else None,
            "candidates": len(cand.candidates()),
            "clock": {
                "solve": solve_clock,
                "refine": ref_clock,
                "measure_selection": measure_clock,
                "select": select_clock,
            },
        }
        rows.append(row)
        costs.append(
            (
                f"{name} {label}: front ({args.front_points} points + the budget) and ILP at the budget",
                solve_clock,
                "",
            )
        )
        costs.append(
            (
                f"{name} {label}: refinement ({args.tune} tuning images, guard on 2,000 selection)",
                ref_clock,
                f"{ref.cost['passes']} passes over {args.tune} images"
                f" ({ref.cost['rounds']} rounds, {ref.cost['moves_measured']} moves measured, "
                f"{ref.cost['moves_verified']} verified)",
            )
        )
        costs.append(
            (
                f"{name} {label}: measuring {len(cand.candidates())} candidates on selection",
                measure_clock,
                f"≤ {len(cand.candidates())} passes over 2,000 images (cached repeats free)",
            )
        )
        costs.append((f"{name} {label}: paired selection", select_clock, "no model pass"))
        e = ev.to_dict()
        log(
            f"{name} {label}: uniform {row['uniform']} {row['uniform_report']}; solver {row['solver_report']}; "
            f"refined {row['refined_report']}; argmax {row['argmax_report']}; rec {ev.recommended} "
            f"{row['rec_report']}; {ev.reason}"
        )
        if e["report"]:
            log(f"   report Δ rec-contender vs uniform: {e['report']['delta']:+.2f} {e['report']['ci']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="4.0,3.5,3.0,2.75,2.5", help="average weight bits ('' to skip)")
    ap.add_argument(
        "--wa", default="W4A4,W3A4", help="uniform W/A allocations whose size and BOPs are budgets"
    )
    ap.add_argument(
        "--method", default="fisher", help="sensitivity method (it must cover activations for W/A)"
    )
    ap.add_argument("--tune", type=int, default=512, help="train images for the refinement's KL")
    ap.add_argument("--max-passes", type=float, default=None,
                    help="refinement budget, passes over --tune (default: sized to the model, RefineConfig)")
    ap.add_argument("--recipe", choices=("search", "rtn"), default="search",
                    help="PTQ recipe: the search's default, or the earlier RTN + min-max activations")
    ap.add_argument("--front-points", type=int, default=8)
    ap.add_argument("--out", default="search_selection.md")
    args = ap.parse_args()
    global CONFIG
    if args.recipe == "rtn":
        CONFIG = QuantConfig(weight_clip="auto")
    torch.manual_seed(0)
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    model = loaded.model.eval()
    train = load_npz(CIFAR_TRAIN, loaded.normalisation)
    calib = train.take(256, seed=0)
    tune = train.take(args.tune, seed=1)
    del train
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    split = split_roles(len(test), 2000, seed=0)
    check_disjoint(selection=split.selection, report=split.report)
    sel_data, rep_data = test.subset(split.selection), test.subset(split.report)
    layers = discover_layers(model, calib.x[:2])
    names = [l.name for l in layers]
    meas = Measurer(model, calib, {"selection": sel_data, "report": rep_data})
    fp = {r: meas.ref[r].top1 for r in meas.ref}
    log(f"FP32: selection {fp['selection']:.2f} %, report {fp['report']:.2f} %")
    costs: list = []
    rows = []
    cost = CostModel(layers)
    wa = [w for w in args.wa.split(",") if w.strip()]
    if wa:
        sets = []
        for u in wa:
            ub = LayerBits.parse(u.upper().replace("W", "").replace("A", "/"))
            rep = cost.cost(Allocation.uniform(names, ub))
            sets.append(
                (
                    f"size+BOPs of {u}",
                    [Budget("avg_weight_bits", rep.avg_weight_bits), Budget("bops", float(rep.bops))],
                    Budget("bops", float(rep.bops)),
                )
            )
        rows += run_setting(
            "W/A", model, layers, calib, tune, sel_data, meas, WBITS, (4, 6, 8), sets, args, costs
        )
        write_result(args.out.replace(".md", ".partial.json"), json.dumps(rows, indent=1, default=str) + "\n")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if budgets:
        sets = [
            (f"{b:g} avg bits", [Budget("avg_weight_bits", b)], Budget("avg_weight_bits", b)) for b in budgets
        ]
        rows += run_setting(
            "weight-only", model, layers, calib, tune, sel_data, meas, WBITS, (32,), sets, args, costs
        )


    lines = [
        "# Recommendations against uniform precision, out of sample (ResNet-20, CIFAR-10 JPEG)",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"FP32: selection {fp['selection']:.2f} %, report {fp['report']:.2f} %. Sensitivity: `{args.method}` "
        f"on the 256 calibration images. PTQ recipe: `{args.recipe}` ({CONFIG.to_dict()['weight_clip']} weight "
        f"clipping, {CONFIG.weight_rounding} rounding, {CONFIG.activation_clip} activation clipping, bias "
        f"correction {'on' if CONFIG.bias_correction else 'off'}). Refinement: KL on {args.tune} other train "
        f"images, budget {budget_text(args)}. Front: {args.front_points} ILP points plus the budget. "
        "Figures: top-1 on the 8,000 report images [95 % Wilson interval]; Δ: paired, points, 95 % "
        "interval (bootstrap) and exact McNemar p.",
        "",
        "| setting | budget | uniform baseline (report) | solver (report) | + refine (report) | arg-max of "
        "selection top-1 (report) | **recommendation** | kind | Δ rec − uniform, selection | Δ rec − uniform, "
        "report | Δ arg-max − uniform, report |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def delta(d):
        return (
            "—"
            if not d
            else f"{d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}], p={d['p_value']:.3g}"
        )

    for r in rows:
        e = r["evidence"]
        rec_is_uniform = r["rec_kind"] == "uniform"
        lines.append(
            f"| {r['setting']} | {r['budget']} | {r['uniform']} {r['uniform_report']} | {r['solver_report']} | "
            f"{r['refined_report']} | {r['argmax_report']} ({r['argmax_kind']}) | **{r['rec_report']}** | "
            f"{r['rec_kind']} | {delta(e['selection'])} (contender) | "
            f"{'0 (is the baseline); contender ' if rec_is_uniform else ''}{delta(e['report'])} | "
            f"{delta(r['argmax_delta_report'])} |"
        )
    lines += ["", "Reasons, refinement and surrogate disagreement:", ""]
    for r in rows:
        e, rf = r["evidence"], r["refine"]
        dis = e["disagreement"]
        lines.append(
            f"- {r['setting']} @ {r['budget']}: {e['reason']}. Refinement: {len(rf['steps'])} move(s) kept, KL "
            f"{rf['kl_start']:.4f} → {rf['kl_end']:.4f} (tuning images), selection top-1 {rf['guard_start']:.2f} → "
            f"{rf['guard_end']:.2f}; {rf['cost']['passes']} passes; stopped: {rf['stopped']}. Surrogate (KL) and "
            f"top-1 order {dis['disagree']} of {dis['pairs']} candidate pairs differently on selection "
            f"({r['candidates']} candidates)."
        )
    lines += ["", "Recommended / refined allocations (" + ", ".join(names) + "):", ""]
    for r in rows:
        lines.append(f"- {r['setting']} @ {r['budget']}: rec `{r['bits']}`; refined `{r['refined_bits']}`")
    lines += [
        "",
        "## Search cost",
        "",
        "Wall and CPU seconds (this process; CPU counts every thread) on a "
        "**loaded** shared machine (other jobs running), so wall-clock figures overstate an idle machine.",
        "",
        "| stage | wall s | CPU s | model passes |",
        "| --- | ---: | ---: | --- |",
    ]
    for stage, clk, passes in costs:
        lines.append(f"| {stage} | {clk['wall']:.1f} | {clk['cpu']:.1f} | {passes} |")
    lines.append(
        f"| report figures (not part of the search) | {meas.clock['report']['wall']:.1f} | "
        f"{meas.clock['report']['cpu']:.1f} | {meas.evaluations['report']} passes over 8,000 images |"
    )
    lines += ["", "## Goals", ""]
    lines += goals(rows)
    lines += ["", *run_footer("search_selection.py", time.perf_counter() - T0)]
    text = "\n".join(lines) + "\n"
    path = write_results(args.out, text, rows)
    print(text)
    log(f"wrote {path}")


def budget_text(args) -> str:
    if args.max_passes is not None:
        return f"{args.max_passes:g} passes over them"
    d = RefineConfig()
    return (f"{d.passes_per_variable:g} passes over them per decision variable (the default), moves ranked on "
            f"the first {d.measure_samples} of them")


def goals(rows) -> list[str]:
    """Each goal of the issue against the measured figures (computed, so the text cannot drift)."""
    out = []
    below = [
        r
        for r in rows
        if r["evidence"]["report"] and r["rec_kind"] == "mixed" and r["evidence"]["report"]["ci"][1] < 0
    ]
    out.append(
        f"- Never significantly below the best uniform allocation that fits, on report: "
        f"{'met' if not below else 'NOT met'} ({len(rows) - len(below)} of {len(rows)} budgets; a uniform "
        "recommendation is that baseline itself)."
    )
    targets = {
        ("weight-only", "3 avg bits"): 78.5,
        ("weight-only", "2.5 avg bits"): 73.0,
        ("W/A", "size+BOPs of W4A4"): 78.0,
    }
    for (setting, budget), goal in targets.items():
        r = next((x for x in rows if x["setting"] == setting and x["budget"] == budget), None)
        if r is None:
            continue
        v = r["rec_report_top1"]
        out.append(
            f"- {setting} at {budget}, PTQ ≥ {goal} %: {'met' if v >= goal else '**not met**'} "
            f"(recommendation {v:.2f} % on report; uniform baseline {r['uniform_report_top1']:.2f} %)."
        )
    return out


if __name__ == "__main__":
    main()
