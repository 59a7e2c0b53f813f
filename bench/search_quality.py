"""How good are the searched allocations? (1) regret against an exhaustive ground truth on the digits CNN,
(2) mixed against uniform precision on the shared ResNet-20.

    .venv/bin/python bench/search_quality.py                  # both parts -> bench/results/search_quality.md
    .venv/bin/python bench/search_quality.py --skip-resnet    # part 1 only (a minute)

Part 1 — digits-cnn (4 layers), weight bits {2,3,4,8}, PTQ with QuantConfig(weight_clip="auto").
  Splits of the bundled digits (seed 0): calibration (240 images) calibrates the quantizers, feeds every
  sensitivity method *and* is the held-out split on which candidates are measured for the recommendation
  (and the bayes solver's scorer); test (360 images) is touched only by the ground truth. The model was
  trained on the train split (1197), used by nothing here.
  Ground truth: all 4^4 = 256 allocations measured on test. For 10 budgets between 2 and 8 average weight
  bits, regret = (best true test top-1 within the budget) − (true test top-1 of the method's allocation).
  "own": the solver's allocation at that budget (ilp/knapsack/lp/exhaustive: solved on the table; bayes: its
  best measured trial on the calibration split). "rec": pipeline flow — pareto_front (20 points) →
  measure_front on calibration → recommend(budget).
Part 2 — ResNet-20 (bench/_common.RESNET20) on CIFAR-10 JPEG. Calibration and sensitivity: 256 images of
  train.npz (seed 0, as bench/ptq_resnet20.py). Selection: a seeded random 2,000 images of test.npz on which
  every candidate is measured; score: the other 8,000 test images, used only for the final figures.
  Weight-only (fisher and measured tables) and with A8 activations (fisher table), ILP fronts plus the ILP
  solutions at 4 / 3.5 / 3 / 2.5 average weight bits, measured selection, against uniform W4/W3/W2.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, require_shared, run_footer, write_result  # noqa: E402

from quant import Allocation, LayerBits, QuantConfig  # noqa: E402
from quant.apply import collect_statistics, set_allocation, wrap_model  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import discover_layers  # noqa: E402
from search import AllocationProblem, measure_front, pareto_front, recommend, solve  # noqa: E402
from search.pareto import ParetoFront, ParetoPoint  # noqa: E402
from search.solvers.bayes import BayesSolver, ptq_scorer  # noqa: E402
from sensitivity import SensitivityOptions, compute_sensitivity  # noqa: E402
from zoo import evaluate, load_digits_splits, load_model, load_npz  # noqa: E402

T0 = time.perf_counter()
CONFIG = QuantConfig(weight_clip="auto")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Measurer:
    """Wrap once, calibrate once, then `set_allocation` + evaluate per allocation."""

    def __init__(self, model, calibration, config=CONFIG):
        self.q = copy.deepcopy(model).eval()
        layers = wrap_model(self.q, config)
        collect_statistics(self.q, layers, calibration, config)

    def result(self, alloc: Allocation, data):
        set_allocation(self.q, alloc)
        return evaluate(self.q, data)

    def top1(self, alloc: Allocation, data) -> float:
        return float(self.result(alloc, data).top1)


def with_points(front: ParetoFront, problem: AllocationProblem, allocs: list[Allocation]) -> ParetoFront:
    """`front` plus the given allocations as extra mixed points (label "target"), skipping repeats."""
    out = copy.deepcopy(front)
    seen = {tuple(sorted((n, b.label()) for n, b in p.allocation.layers.items())) for p in out.candidates()}
    for alloc in allocs:
        key = tuple(sorted((n, b.label()) for n, b in alloc.layers.items()))
        if key in seen:
            continue
        seen.add(key)
        predicted, metrics = problem.evaluate(problem.choice_of(alloc))
        out.points.append(ParetoPoint(allocation=alloc, predicted=predicted, metrics=metrics, kind="mixed",
                                      label="target"))
    out.points.sort(key=lambda p: (p.metrics[out.metric], p.predicted))
    return out


def grid_only(front: ParetoFront) -> ParetoFront:
    return dataclasses.replace(front, points=[p for p in front.points if p.label != "target"])


# --- part 1 --------------------------------------------------------------------------------------------------

METHODS = ["hessian", "fisher", "orthogonality", "measured"]
SOLVERS = ["ilp", "knapsack", "lp", "exhaustive"]
BITS = (2, 3, 4, 8)


def part1(bayes_trials: int) -> tuple[list[str], dict]:
    log("part 1: digits-cnn")
    loaded = load_model("zoo:digits-cnn")
    splits = load_digits_splits(seed=0)
    calib, test = splits.calibration, splits.test
    model = loaded.model.eval()
    layers = discover_layers(model, loaded.example_input)
    names = [layer.name for layer in layers]
    cost = CostModel(layers)
    meas = Measurer(model, calib)

    # ground truth: every allocation on test (and on calibration, for the split-noise reference)
    t = time.perf_counter()
    gt, sel, avg = {}, {}, {}
    for combo in itertools.product(BITS, repeat=len(names)):
        alloc = Allocation({n: LayerBits(b) for n, b in zip(names, combo)})
        gt[combo] = meas.top1(alloc, test)
        r = meas.result(alloc, calib)
        sel[combo] = (r.top1, r.loss)
        avg[combo] = cost.cost(alloc).avg_weight_bits
    fp = evaluate(model, test).top1
    log(f"ground truth: {len(gt)} allocations x 2 splits in {time.perf_counter() - t:.1f} s; FP32 test {fp:.2f} %")
    budgets = [float(b) for b in np.linspace(2, 8, 10)]

    def key(alloc: Allocation) -> tuple[int, ...]:
        return tuple(alloc[n].weight_bits for n in names)

    def within(k, b: float) -> bool:
        return avg[k] <= b * (1 + 1e-6)

    truth = {b: max(v for k, v in gt.items() if within(k, b)) for b in budgets}

    def regrets(allocs: list[Allocation]) -> list[float]:
        return [truth[b] - gt[key(a)] for b, a in zip(budgets, allocs)]

    rows: list[tuple[str, str, list[float], list[float], list[float]]] = []
    per_budget: dict[str, list[float]] = {}
    # reference: every allocation measured on the selection split, ranked as `recommend` ranks
    oracle = []
    for b in budgets:
        kbest = min((k for k in gt if within(k, b)), key=lambda k: (-sel[k][0], sel[k][1], avg[k]))
        oracle.append(truth[b] - gt[kbest])
    per_budget["reference: all 256 measured on calibration"] = oracle

    def evaluate_solver(method: str, label: str, problem, front, own: list[Allocation]) -> None:
        mf = measure_front(with_points(front, problem, own), model, calib, calib, CONFIG)
        rec_grid = [recommend(grid_only(mf), f"avg_wbits={b}").allocation for b in budgets]
        rec = [recommend(mf, f"avg_wbits={b}").allocation for b in budgets]
        r_own, r_grid, r_rec = regrets(own), regrets(rec_grid), regrets(rec)
        rows.append((method, label, r_own, r_grid, r_rec))
        per_budget[f"{method} + {label}, rec (grid + targets)"] = r_rec
        log(f"{method}+{label}: own {np.mean(r_own):.2f}/{np.max(r_own):.2f}; rec grid {np.mean(r_grid):.2f}/"
            f"{np.max(r_grid):.2f}; rec+targets {np.mean(r_rec):.2f}/{np.max(r_rec):.2f}")

    for method in METHODS:
        t = time.perf_counter()
        opts = SensitivityOptions(weight_bits=BITS, samples=len(calib), quant=CONFIG)
        table = compute_sensitivity(model, calib, method, opts)
        log(f"{method}: table in {time.perf_counter() - t:.1f} s")
        problem = AllocationProblem(table, cost)
        for solver in SOLVERS:
            own = [solve(problem.with_budget("avg_weight_bits", b), solver).allocation for b in budgets]
            evaluate_solver(method, solver, problem, pareto_front(problem, "avg_weight_bits", 20, solver), own)
        # bayes: one sweep study per method (the table only seeds the warm start); scorer: calibration loss
        t = time.perf_counter()
        scorer = ptq_scorer(model, calib, calib, CONFIG, metric="loss")
        impl = BayesSolver(scorer=scorer, n_trials=bayes_trials, seed=0)
        front = pareto_front(problem, "avg_weight_bits", 20, impl)
        sols = impl.pareto_solutions(problem)
        own = []
        for b in budgets:
            ok = [s_ for s_ in sols if s_.metrics["avg_weight_bits"] <= b * (1 + 1e-6)]
            own.append(min(ok, key=lambda s_: (s_.objective, s_.metrics["avg_weight_bits"])).allocation)
        evaluate_solver(method, f"bayes ({bayes_trials} trials)", problem, front, own)
        log(f"  bayes: {scorer.calls} PTQ measurements ({time.perf_counter() - t:.1f} s)")

    lines = [
        "## 1. Regret against the exhaustive ground truth (digits-cnn)",
        "",
        f"digits-cnn: 4 layers ({', '.join(names)}), weight bits {{2,3,4,8}} (activations float), PTQ with "
        "`QuantConfig(weight_clip=\"auto\")` (per-channel symmetric weights, output-MSE clipping).",
        "Splits (bundled digits, seed 0): **calibration** (240 images) calibrates the quantizers, feeds every "
        "sensitivity method, and is the held-out split on which `measure_front` measures the candidates for "
        "the recommendation (and on which the bayes solver's scorer measures its trials, by cross-entropy); "
        "**test** (360 images) is used only for the ground truth. The train split (the model's training data) "
        "is not used.",
        f"Ground truth: all 256 allocations measured on test (FP32 test top-1 {fp:.2f} %; one image = 0.28 "
        "points). Budgets: " + ", ".join(f"{b:.2f}" for b in budgets) + " average weight bits. Regret (points "
        "of test top-1) = best true accuracy within the budget − true accuracy of the method's allocation; "
        "mean / max over the 10 budgets.",
        "**own**: the solver's own allocation at the budget, without measured selection (table solvers: the "
        "table's predicted best; bayes: its trial with the lowest calibration loss). **rec, grid**: the "
        "`service.pipeline` flow (table → `pareto_front`, 20 evenly spaced budgets → `measure_front` on "
        "calibration → `recommend(budget)`). **rec, grid + targets**: the same with the solver's own "
        "allocations at the 10 budgets added to the candidates.",
        "",
        "| method | solver | own: mean | own: max | rec, grid: mean | rec, grid: max | rec, grid + targets: "
        "mean | rec, grid + targets: max |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, solver, r_own, r_grid, r_rec in rows:
        lines.append(f"| {method} | {solver} | {np.mean(r_own):.2f} | {np.max(r_own):.2f} | {np.mean(r_grid):.2f} | "
                     f"{np.max(r_grid):.2f} | {np.mean(r_rec):.2f} | {np.max(r_rec):.2f} |")
    lines.append(f"| (reference) | all 256 measured on calibration, ranked as `recommend` ranks | — | — | — | — | "
                 f"{np.mean(oracle):.2f} | {np.max(oracle):.2f} |")
    lines += ["", "True front (best test top-1 within each budget) and per-budget regret of the recommendations "
              "(grid + targets):", "", "| | " + " | ".join(f"{b:.2f}" for b in budgets) + " |",
              "| --- |" + " ---: |" * len(budgets),
              "| best true top-1 | " + " | ".join(f"{truth[b]:.2f}" for b in budgets) + " |"]
    for label, r in per_budget.items():
        if "+ ilp" in label or "bayes" in label or "reference" in label:
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
    return lines, {"rows": rows, "oracle": oracle}


# --- part 2 --------------------------------------------------------------------------------------------------

TARGETS = [4.0, 3.5, 3.0, 2.5]
RES_BITS = (2, 3, 4, 5, 6, 8)


def part2(settings: dict[int, list[str]], n_points: int) -> tuple[list[str], dict]:
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    log("part 2: ResNet-20")
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    model = loaded.model.eval()
    train = load_npz(CIFAR_TRAIN, loaded.normalisation)
    calib = train.take(256, seed=0)
    del train
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    select, score = test.subset(torch.sort(order[:2000]).values), test.subset(torch.sort(order[2000:]).values)
    layers = discover_layers(model, calib.x[:2])
    names = [layer.name for layer in layers]
    cost = CostModel(layers)
    fp_score = evaluate(model, score).top1
    log(f"loaded; FP32 on the 8,000 score images {fp_score:.2f} %")
    meas = Measurer(model, calib)
    cache: dict[tuple, float] = {}

    def final(alloc: Allocation) -> float:  # top-1 on the 8,000 score images, once per allocation
        k = tuple(alloc[n].label() for n in names)
        if k not in cache:
            cache[k] = meas.top1(alloc, score)
        return cache[k]

    results: dict = {"fp": fp_score, "settings": {}}
    lines = [
        "## 2. Mixed against uniform precision on ResNet-20 (CIFAR-10 JPEG)",
        "",
        "Calibration and sensitivity: 256 images of train.npz (seed 0). Candidates are measured on a seeded "
        "random **2,000-image selection slice of test.npz**; every accuracy below is top-1 on the **other 8,000 "
        f"test images** (FP32 there: {fp_score:.2f} %), which nothing else touches. PTQ: "
        "`QuantConfig(weight_clip=\"auto\")` (with A8: every layer's input activation per-tensor 8-bit, min-max). "
        f"Options: weight bits {{2,3,4,5,6,8}}, no pins. Candidates: the ILP front ({n_points} evenly spaced "
        "budgets), the ILP solutions at the four target budgets, and the uniform allocations; `recommend` "
        "picks the best measured (selection slice) within each budget. \"rec, grid\": the recommendation "
        "from the evenly spaced front alone (what `service.pipeline.run_search` does); \"ILP own\": the "
        "table's predicted best at the budget, no measured selection.",
        "",
    ]
    for abits, methods in settings.items():
        tag = "weight-only" if abits == 32 else f"A{abits}"
        uni = {f"W{w}": final(Allocation({n: LayerBits(w, abits) for n in names})) for w in (4, 3, 2)}
        log(f"{tag}: uniform " + ", ".join(f"{k} {v:.2f}" for k, v in uni.items()))
        per_method = {}
        for method in methods:
            t = time.perf_counter()
            opts = SensitivityOptions(weight_bits=RES_BITS, activation_bits=(abits,), samples=256, quant=CONFIG)
            table = compute_sensitivity(model, calib, method, opts)
            log(f"{tag} {method}: table in {time.perf_counter() - t:.1f} s")
            problem = AllocationProblem(table, cost)
            t = time.perf_counter()
            own = {b: solve(problem.with_budget("avg_weight_bits", b), "ilp").allocation for b in TARGETS}
            front = with_points(pareto_front(problem, "avg_weight_bits", n_points, "ilp"), problem,
                                list(own.values()))
            mf = measure_front(front, model, calib, select, CONFIG)
            log(f"{tag} {method}: {len(mf.candidates())} candidates measured on selection in "
                f"{time.perf_counter() - t:.1f} s")
            rows = {}
            for b in TARGETS:
                rec = recommend(mf, f"avg_wbits={b}")
                grid = recommend(grid_only(mf), f"avg_wbits={b}")
                rows[b] = {"rec": final(rec.allocation), "grid": final(grid.allocation), "own": final(own[b]),
                           "kind": rec.kind if rec.label != "target" else "mixed (target)",
                           "avg": rec.metrics["avg_weight_bits"], "sel": rec.measured.get("top1"),
                           "bits": "/".join(str(rec.allocation[n].weight_bits) for n in names)}
                r = rows[b]
                log(f"{tag} {method} @ {b}: rec {r['rec']:.2f} ({r['kind']}, {r['avg']:.3f} bits, selection "
                    f"{r['sel']:.2f}); grid {r['grid']:.2f}; ILP own {r['own']:.2f}")
            per_method[method] = rows
        results["settings"][tag] = {"uniform": uni, "methods": per_method}
        u = "A8" if abits == 8 else ""
        lines += [f"### {tag}", "",
                  "Uniform (8k test): " + "; ".join(f"{k}{u} **{v:.2f} %**" for k, v in uni.items()) + ".", "",
                  "| sensitivity | avg weight bits ≤ | rec (8k test) | rec − uniform W3 | rec − uniform W4 | kind "
                  "| its avg bits | its top-1 on selection | rec, grid (8k) | ILP own (8k) |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for method, rows in per_method.items():
            for b, r in rows.items():
                lines.append(f"| {method} | {b} | **{r['rec']:.2f}** | {r['rec'] - uni['W3']:+.2f} | "
                             f"{r['rec'] - uni['W4']:+.2f} | {r['kind']} | {r['avg']:.3f} | {r['sel']:.2f} | "
                             f"{r['grid']:.2f} | {r['own']:.2f} |")
        lines += ["", "Recommended weight bits per layer (" + ", ".join(names) + "):", ""]
        for method, rows in per_method.items():
            for b, r in rows.items():
                lines.append(f"- {method} @ {b}: `{r['bits']}`")
        lines.append("")
    return lines, results


def findings(summary: dict) -> list[str]:
    """What the figures say, computed from them (so the text cannot drift from the tables)."""
    out = ["## Findings", ""]
    d = summary.get("digits")
    if d:
        table_rows = [r for r in d["rows"] if not r[1].startswith("bayes")]
        best = min(table_rows, key=lambda r: (np.mean(r[4]), np.max(r[4])))
        worst_own = max(table_rows, key=lambda r: np.mean(r[2]))
        out.append(
            f"- digits-cnn is an easy case: every exact solver returns the same allocation for a given table, "
            f"and the largest mean regret of a table solver's own point is {np.mean(worst_own[2]):.2f} points "
            f"({worst_own[0]} + {worst_own[1]}); best with measured selection: {best[0]} + {best[1]} "
            f"(mean {np.mean(best[4]):.2f}, max {np.max(best[4]):.2f}). One test image is 0.28 points, so most "
            "differences here are one or two images.")
        grid_gap = max(np.mean(r[3]) - np.mean(r[4]) for r in d["rows"])
        out.append(
            f"- Measured selection only helps when a candidate exists at the budget: with the evenly spaced front "
            f"alone (`run_search`'s flow) mean regret is up to {grid_gap:.2f} points higher than with the "
            "solver's own points at the budgets added.")
    r = summary.get("resnet")
    if r:
        for tag, st in r["settings"].items():
            uni = st["uniform"]
            for method, rows in st["methods"].items():
                if 3.0 in rows:
                    x = rows[3.0]
                    out.append(
                        f"- ResNet-20 {tag}, {method}: at 3.0 average weight bits the recommendation scores "
                        f"{x['rec']:.2f} % against uniform W3 {uni['W3']:.2f} % ({x['rec'] - uni['W3']:+.2f}); "
                        f"the evenly spaced front alone gives {x['grid']:.2f} %. At 2.5 bits: "
                        f"{rows[2.5]['rec']:.2f} % (grid alone {rows[2.5]['grid']:.2f} %, uniform W2 "
                        f"{uni['W2']:.2f} %).")
        wo = r["settings"].get("weight-only")
        if wo:
            gain = max(rows[3.0]["rec"] for rows in wo["methods"].values()) - wo["uniform"]["W3"]
            out.append(
                f"- The goal (mixed ≥ uniform + 5 points at 3 bits) is **not met**: best gain {gain:+.2f} points. "
                f"With output-MSE clipping uniform W3 is already {wo['uniform']['W3']:.2f} % on these images "
                f"(76.04 % on all 10,000 in bench/results/ptq_resnet20.md; the 70.5 % quoted in the task does "
                f"not reproduce), only {r['fp'] - wo['uniform']['W3']:.2f} points below FP32 ({r['fp']:.2f} %): +5 would "
                "mean PTQ at 3 average bits matching FP32.")
            out.append(
                "- What would close it: training. In bench/results/qat.md, 200 LSQ steps on train.npz take uniform "
                "W3A4 to 84.1 % (fine-tuning also adapts the model to the JPEG images: FP32 goes 81.0 → 86.8 %), so "
                "+5 at 3 bits is a QAT result: fine-tune the recommended allocation, or let `qbitopt_finetune` "
                "re-allocate during QAT. Within PTQ the proxy is the limit: single-layer loss increases at ≥ 3 bits "
                "are of the order of their noise on 256 calibration images (the measured table did worse than "
                "Fisher here at 3–4 bits), and at 2.5 bits several layers at 2 bits interact non-additively. "
                "Cheaper steps: more sensitivity samples (or KL against FP32 instead of labelled loss), and a "
                "measured local search (the `bayes` solver warm-started from the ILP point) on the selection slice.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--bayes-trials", type=int, default=40)
    ap.add_argument("--weight-only-methods", default="fisher,measured")
    ap.add_argument("--a8-methods", default="fisher")
    ap.add_argument("--front-points", type=int, default=12)
    ap.add_argument("--out", default="search_quality.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = ["# Search quality: regret against ground truth, and mixed against uniform precision", ""]
    summary: dict = {}
    if not args.skip_digits:
        l1, summary["digits"] = part1(args.bayes_trials)
        lines += l1 + [""]
    if not args.skip_resnet:
        settings = {32: [m for m in args.weight_only_methods.split(",") if m],
                    8: [m for m in args.a8_methods.split(",") if m]}
        l2, summary["resnet"] = part2({a: m for a, m in settings.items() if m}, args.front_points)
        lines += l2
    lines += findings(summary)
    lines += ["", *run_footer("search_quality.py", time.perf_counter() - T0)]
    text = "\n".join(lines) + "\n"
    path = write_result(args.out, text)
    print(text)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
