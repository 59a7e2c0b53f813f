"""BOMP-NAS and QBitOpt on the CIFAR-10 ResNet-20 (a small CPU budget): the issue-14 figures the digits bench
(bench/bompnas.py) could not give.

    .venv/bin/python bench/bompnas_resnet.py --parts qbitopt   # -> bench/results/bompnas-resnet-qbitopt.md/.json
    .venv/bin/python bench/bompnas_resnet.py --parts nas       # -> bench/results/bompnas-resnet-nas.md/.json

Data. Everything trains, fine-tunes and calibrates on train.npz (the shared ResNet-20 checkpoint was trained on
all of it). test.npz is split once at random (seed 0): `--selection` images score BOMP-NAS trials and the
bits-only bayes trials (the choosing), the rest is the *report* split, touched only by the final figures.
Both parts report on the same report images.

1. qbitopt — ResNet-20 at avg_wbits ≤ `--budget` (A`--act`), weight bits {2,3,4,5,6,8}: QBitOpt (re-allocation
   every k steps during QAT, frozen at 75 % of the steps) against ILP-then-QAT (a per-sample Fisher table of
   the float model on 256 train images, the ILP optimum at the same budget, then the same QAT recipe). Same
   pretrained checkpoint, recipe (SGD, lr, batch, steps, LSQ) and seed per pair; `--seeds` pairs.
   95 % intervals: Wilson per run; paired bootstrap over report images for the difference (all seeds pooled).
1b. qbitopt-digits — why QBitOpt never moved bits on the digits models (bench/bompnas.py): every re-solve's
   optimum against the best other feasible allocation of the same problem, found by enumeration.
2. nas — at weight-memory budgets given as fractions of ResNet-20's uniform-W4 weight memory (A8 activations,
   per-channel scales counted): BOMP-NAS over the cifar-resnet20 family (per-stage width multipliers and depths,
   per-layer weight bits; weights inherited from the checkpoint, `--train-steps` float Adam steps then
   `--qaft-steps` QAFT steps per trial, scored on the selection split) against two searches on the fixed
   ResNet-20: bits-only `bayes` (PTQ-scored on the selection split, one sweep study) and the ILP on a Fisher
   table. Every fixed-architecture pick then gets QAFT with the same recipe for `--train-steps + --qaft-steps`
   steps (the NAS pick had that many gradient steps in its trial); the NAS pick is its own trial re-run
   (deterministic). All are measured on the report split, with the uniform-W4 ResNet-20 after the same QAFT as
   the reference the budgets are fractions of.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, acc_cell, machine, paired, require_shared, write_result  # noqa: E402

from quant import Allocation, LayerBits, QuantConfig  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import discover_layers  # noqa: E402
from quant.qat import QATRecipe, finetune  # noqa: E402
from search import AllocationProblem, solve  # noqa: E402
from zoo import load_model, load_npz  # noqa: E402
from zoo.data import ArrayDataset  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Data:
    """train.npz (training, calibration) and test.npz split at random into selection and report."""

    def __init__(self, selection: int, tmp: Path, report_max: int | None = None):
        require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
        self.loaded = load_model("zoo:cifar-resnet20", RESNET20)
        norm = self.loaded.normalisation
        self.train = load_npz(CIFAR_TRAIN, norm)
        raw = np.load(CIFAR_TEST)
        x, y = raw["x"], raw["y"]
        perm = np.random.default_rng(0).permutation(len(y))  # test.npz is sorted by class
        sel, rep = perm[:selection], perm[selection:]
        rep = rep if report_max is None else rep[:report_max]
        # the selection split as a file, for BOMP-NAS workers (they load data by reference)
        self.selection_path = tmp / "selection.npz"
        np.savez(self.selection_path, x=x[sel], y=y[sel])
        self.selection = load_npz(self.selection_path, norm)
        report_path = tmp / "report.npz"
        np.savez(report_path, x=x[rep], y=y[rep])
        self.report = load_npz(report_path, norm)

    def correct(self, model: torch.nn.Module, batch: int = 500) -> np.ndarray:
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.report.y), batch):
                out.append((model(self.report.x[i:i + batch]).argmax(1) == self.report.y[i:i + batch]).numpy())
        return np.concatenate(out)


def subset(ds: ArrayDataset, n: int, seed: int = 0) -> ArrayDataset:
    idx = np.random.default_rng(seed).choice(len(ds.y), n, replace=False)
    return ds.subset(sorted(int(i) for i in idx))


def bits_of(alloc: Allocation, names: list[str]) -> list[int]:
    return [alloc[n].weight_bits for n in names]


# --- 1. QBitOpt vs ILP-then-QAT -------------------------------------------------------------------------------


def part_qbitopt(data: Data, args) -> tuple[list[str], dict]:
    from search.solvers.qbitopt import qbitopt_finetune
    from sensitivity import SensitivityOptions, compute_sensitivity

    base = data.loaded.model.eval()
    layers = discover_layers(base, data.loaded.example_input)
    names = [layer.name for layer in layers]
    cost = CostModel(layers)
    wbits = (2, 3, 4, 5, 6, 8)
    fisher_data = subset(data.train, 256, seed=1)
    t = time.perf_counter()
    opts = SensitivityOptions(weight_bits=wbits, activation_bits=(args.act,), samples=256,
                              quant=QuantConfig(weight_clip="mse"))
    table = compute_sensitivity(base, fisher_data, "fisher", opts)
    ilp = solve(AllocationProblem(table, cost).with_budget("avg_weight_bits", args.budget), "ilp").allocation
    log(f"fisher table + ilp: {time.perf_counter() - t:.0f} s, ilp bits {bits_of(ilp, names)}")
    every_k = max(5, args.steps // 10)
    res: dict = {"qbitopt": [], "ilp_qat": [], "layers": names, "every_k": every_k}
    cq, ci = [], []
    for seed in range(args.seeds):
        recipe = QATRecipe(steps=args.steps, lr=args.lr, batch_size=args.batch, seed=seed, device="cpu",
                           calibration_samples=256)
        t = time.perf_counter()
        r, final = qbitopt_finetune(base, data.train, [f"avg_wbits={args.budget}"], recipe, weight_bits=wbits,
                                    activation_bits=(args.act,), every_k=every_k, freeze_at=0.75,
                                    sensitivity_samples=256, printer=log)
        tq = time.perf_counter() - t
        c1 = data.correct(r.model)
        info = final.metadata["qbitopt"]
        hist = [{"step": h["step"], "changed": h["changed"], "objective_before": h["objective_before"],
                 "objective_after": h["objective_after"], "optimum": h["optimum"],
                 "bits": [h["allocation"][n] for n in names]} for h in info["history"]]
        res["qbitopt"].append({"seed": seed, "report_top1": float(c1.mean() * 100), "seconds": tq,
                               "updates": info["updates"], "reallocations": info["changes"],
                               "avg_wbits": cost.cost(final).avg_weight_bits, "bits": bits_of(final, names),
                               "history": hist})
        log(f"qbitopt seed {seed}: {100 * c1.mean():.2f} % ({info['changes']} re-allocations in "
            f"{info['updates']} re-solves, {tq:.0f} s)")
        t = time.perf_counter()
        r2 = finetune(base, ilp, data.train, recipe)
        ti = time.perf_counter() - t
        c2 = data.correct(r2.model)
        log(f"ilp+qat seed {seed}: {100 * c2.mean():.2f} % ({ti:.0f} s)")
        cq.append(c1)
        ci.append(c2)
        res["ilp_qat"].append({"seed": seed, "report_top1": float(c2.mean() * 100), "seconds": ti,
                               "avg_wbits": cost.cost(ilp).avg_weight_bits, "bits": bits_of(ilp, names)})
        _write(args, res, _qbitopt_lines(args, res, cq, ci, names))  # partial results survive an interruption
    return _qbitopt_lines(args, res, cq, ci, names), res


def _qbitopt_lines(args, res: dict, cq: list, ci: list, names: list[str]) -> list[str]:
    rows = []
    for q, i in zip(res["qbitopt"], res["ilp_qat"]):
        rows.append(f"| {q['seed']} | {acc_cell(cq[q['seed']])} | {q['avg_wbits']:.2f} | {q['reallocations']} / "
                    f"{q['updates']} | {acc_cell(ci[i['seed']])} | {i['avg_wbits']:.2f} | "
                    f"{paired(cq[q['seed']], ci[i['seed']])} |")
    hist_rows = []
    for q in res["qbitopt"]:
        for h in q["history"]:
            moves = ", ".join(f"{n}→{h['bits'][names.index(n)]}" for n in h["changed"]) or "—"
            hist_rows.append(f"| {q['seed']} | {h['step']} | {h['objective_before']:.4g} | "
                             f"{h['optimum']:.4g} | {moves} |")
    start = [f"| {q['seed']} | {' '.join(str(b) for b in q['bits'])} |" for q in res["qbitopt"]]
    lines = [
        f"## ResNet-20, avg_wbits ≤ {args.budget}, A{args.act}: QBitOpt vs ILP-then-QAT, same recipe and steps",
        "",
        f"{args.steps} SGD steps (lr {args.lr}, batch {args.batch}, cosine, LSQ, per-channel weights), both from "
        f"the shared checkpoint; QBitOpt re-solves every {res['every_k']} steps until 75 % of the steps "
        f"(knapsack on its running-Fisher table), weight bits {{2,3,4,5,6,8}}. Report split: "
        f"{len(cq[0]) if cq else 0} test images never used for choosing.",
        "",
        "| seed | QBitOpt top-1 % [95 % CI] | avg bits | re-allocations / re-solves | ILP + QAT top-1 % | avg bits | "
        "QBitOpt − ILP+QAT, paired |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if cq:
        a, b = np.concatenate(cq), np.concatenate(ci)
        lines += [f"Pooled over seeds: QBitOpt {100 * a.mean():.2f} %, ILP+QAT {100 * b.mean():.2f} %; paired "
                  f"bootstrap of the difference: {paired(a, b)} points.", ""]
    lines += [
        "ILP allocation (layers in execution order): " + " ".join(str(b) for b in res["ilp_qat"][0]["bits"])
        if res["ilp_qat"] else "", "",
        "QBitOpt final allocations:", "", "| seed | bits per layer |", "|---|---|", *start, "",
        "QBitOpt re-solves (predicted objective ½ΣF̂ΔW² of the current allocation on the running-Fisher table, the "
        "re-solve's optimum on the same table, the layers it moved and their new bits):",
        "",
        "| seed | step | objective of the current allocation | optimum | moves |",
        "|---|---|---|---|---|",
        *hist_rows,
        "",
    ]
    return lines


# --- 1b. why QBitOpt kept its allocation on the digits models ------------------------------------------------


class RunnerUp:
    """QAT callback listed after the QBitOpt callback: at each of its re-solves, enumerate every feasible
    allocation of the same problem (tiny models only) and record the optimum's margin over the best other one."""

    def __init__(self, qbitopt):
        self.qbitopt, self.rows, self._seen = qbitopt, [], 0

    def on_step(self, state) -> None:
        import itertools

        if self.qbitopt.updates == self._seen:
            return
        self._seen = self.qbitopt.updates
        p = self.qbitopt.last_problem
        wb = np.array([o.weight_bits for o in p.options])
        feasible = [np.array(ch) for ch in itertools.product(range(len(p.options)), repeat=len(p.layer_names))
                    if p.feasible(np.array(ch))]
        objs = sorted((p.evaluate(ch)[0], tuple(ch)) for ch in feasible)
        best = np.array(objs[0][1])
        # a real alternative gives some layer more bits than the optimum; allocations that only take bits
        # away from it (fewer bits, more error everywhere) can never win, whatever the sensitivities
        rivals = [o for o, ch in objs[1:] if np.any(wb[np.array(ch)] > wb[best])]
        h = self.qbitopt.history[-1]
        self.rows.append({"step": h["step"], "feasible": len(objs), "rivals": len(rivals), "optimum": objs[0][0],
                          "runner_up": objs[1][0], "best_rival": rivals[0] if rivals else None,
                          "current": h["objective_before"], "moved": bool(h["changed"])})


def part_qbitopt_digits(args) -> tuple[list[str], dict]:
    from search.solvers.qbitopt import QBitOptCallback
    from sensitivity import SensitivityOptions, compute_sensitivity
    from zoo import load_digits_splits

    splits = load_digits_splits(seed=0)
    out: dict = {}
    lines = [
        "## Why QBitOpt kept its starting allocation on the digits models",
        "",
        "The settings of bench/bompnas.py's QBitOpt figures (300 SGD steps, lr 0.01, batch 64, re-solve every 30 "
        "steps until 75 %, weight bits {2,3,4,5,6,8}, seed 0). At every re-solve, all feasible allocations of the "
        "same running-Fisher problem are enumerated: the optimum's margin over the best *other* allocation says how "
        "much the sensitivities would have to change to move it. A *rival* is a feasible allocation that gives "
        "some layer more bits than the optimum (one that only takes bits away can never win).",
        "",
        "| model | budget | layers (weights) | starting bits | feasible allocations (rivals) | re-solves | moved | "
        "best rival / optimum, min–max over re-solves |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wbits = (2, 3, 4, 5, 6, 8)
    for model_name, budget, act in (("digits-cnn", 3.0, 8), ("digits-mlp", 2.5, 4)):
        loaded = load_model(f"zoo:{model_name}")
        base = loaded.model.eval()
        layers = discover_layers(base, loaded.example_input)
        cost = CostModel(layers)
        opts = SensitivityOptions(weight_bits=wbits, activation_bits=(act,), samples=256, seed=0,
                                  quant=QuantConfig(weight_clip="mse"))
        table = compute_sensitivity(base, splits.train, "fisher", opts)

        def factory(t, cost=cost, budget=budget):
            return AllocationProblem(t, cost, [f"avg_wbits={budget}"])

        start = solve(factory(table), "knapsack").allocation
        cb = QBitOptCallback(factory, 30, layers, [LayerBits(b, act) for b in wbits], freeze_at=0.75)
        spy = RunnerUp(cb)
        finetune(base, start, splits.train, QATRecipe(steps=300, lr=0.01, batch_size=64, seed=0, device="cpu"),
                 callbacks=[cb, spy])
        params = [layer.params for layer in layers]
        ratios = [r["best_rival"] / r["optimum"] for r in spy.rows if r["best_rival"] is not None]
        rival = f"{min(ratios):.3f}–{max(ratios):.3f}" if ratios else "none exists"
        out[model_name] = {"budget": budget, "params": params, "rows": spy.rows, "changes": cb.changes,
                           "start": bits_of(start, [layer.name for layer in layers])}
        lines.append(f"| {model_name} | avg_wbits ≤ {budget}, A{act} | {len(layers)} ({', '.join(map(str, params))}) "
                     f"| {' '.join(map(str, out[model_name]['start']))} | {spy.rows[0]['feasible']} "
                     f"({spy.rows[0]['rivals']}) | {len(spy.rows)} | {cb.changes} | {rival} |")
        log(f"{model_name}: {cb.changes} moves in {len(spy.rows)} re-solves, best rival/optimum {rival}")
    lines.append("")
    return lines, out


# --- 2. BOMP-NAS vs bayes vs ILP ---------------------------------------------------------------------------------


def part_nas(data: Data, args, tmp: Path) -> tuple[list[str], dict]:
    from search.problem import InfeasibleBudget
    from search.solvers.bayes import BayesSolver, ptq_scorer
    from search.solvers.bompnas import BompNasConfig, create, front, train_candidate
    from search.trials import load_fanout_study, run_trials
    from sensitivity import SensitivityOptions, compute_sensitivity

    base = data.loaded.model.eval()
    layers = discover_layers(base, data.loaded.example_input)
    names = [layer.name for layer in layers]
    cost = CostModel(layers)
    w4 = cost.cost(Allocation({n: LayerBits(4, 8) for n in names})).weight_memory_bits
    fracs = [float(f) for f in args.fractions.split(",")]
    limits = [f * w4 for f in fracs]
    wbits = [int(b) for b in args.nas_bits.split(",")]
    space = {"width1": [0.5, 0.75, 1.0], "width2": [0.5, 0.75, 1.0], "width3": [0.5, 0.75, 1.0],
             "depth1": [1, 2, 3], "depth2": [1, 2, 3], "depth3": [1, 2, 3]}
    cfg = BompNasConfig(family="zoo:cifar-resnet20", weights=str(RESNET20), data=str(CIFAR_TRAIN),
                        selection_data=str(data.selection_path), space=space, weight_bits=wbits,
                        activation_bits=8, train_steps=args.train_steps, train_lr=args.train_lr,
                        qaft_steps=args.qaft_steps, qaft_lr=args.lr, batch_size=args.nas_batch,
                        budgets=[f"weight_memory={max(limits) / 8:.0f}B"])
    url, name = f"sqlite:///{tmp / 'nas.db'}", "nas"
    create(url, name, cfg, total_trials=args.trials, heartbeat_interval=5)
    t = time.perf_counter()
    run_trials(url, name, worker="w0")
    nas_s = time.perf_counter() - t
    study, _ = load_fanout_study(url, name)
    trials = [tr for tr in study.get_trials(deepcopy=False) if tr.state.name == "COMPLETE"]
    measured = [tr for tr in trials if tr.user_attrs.get("measured")]
    pts = front(url, name)
    log(f"nas: {len(trials)} trials ({len(measured)} trained) in {nas_s:.0f} s, front {len(pts)} points")
    trial_rows = [f"| {tr.number} | {tr.user_attrs['arch']} | {tr.user_attrs['metrics']['weight_memory'] / 8 / 1024:.1f} "
                  f"| {tr.user_attrs['metrics']['weight_memory'] / w4:.2f} | "
                  + (f"{tr.user_attrs.get('float_top1', float('nan')):.2f} | {tr.values[0]:.2f} | "
                     f"{tr.user_attrs['seconds']:.0f} |" if tr.user_attrs.get("measured") else "over budget | — | — |")
                  for tr in trials]

    # fixed architecture: ILP on a Fisher table, bits-only bayes (PTQ on selection)
    calib = subset(data.train, 256, seed=1)
    opts = SensitivityOptions(weight_bits=tuple(wbits), activation_bits=(8,), samples=256,
                              quant=QuantConfig(weight_clip="mse"))
    table = compute_sensitivity(base, calib, "fisher", opts)
    problem = AllocationProblem(table, cost)
    scorer = ptq_scorer(base, calib, data.selection, QuantConfig(weight_clip="mse"))
    t = time.perf_counter()
    bayes_sols = BayesSolver(scorer=scorer, n_trials=args.bayes_trials, seed=0).sweep(problem, "weight_memory", limits)
    bayes_s = time.perf_counter() - t
    log(f"bayes sweep: {args.bayes_trials} trials in {bayes_s:.0f} s")

    steps_fixed = args.train_steps + args.qaft_steps
    recipe = QATRecipe(steps=steps_fixed, lr=args.lr, batch_size=args.nas_batch, seed=0, device="cpu",
                       calibration_samples=256)
    out: dict = {"w4_bytes": w4 / 8, "nas_seconds": nas_s, "bayes_seconds": bayes_s, "trials": len(trials),
                 "trained": len(measured), "budgets": {}}
    ref = finetune(base, Allocation({n: LayerBits(4, 8) for n in names}), data.train, recipe)
    c_ref = data.correct(ref.model)
    out["w4_qaft_report_top1"] = float(100 * c_ref.mean())
    log(f"uniform W4A8 + {steps_fixed} QAFT steps: {100 * c_ref.mean():.2f} %")
    rows, pick_rows = [], []
    for frac, lim in zip(fracs, limits):
        rec: dict = {}
        cells: dict = {}
        ok = [p for p in pts if p.metrics["weight_memory"] <= lim]
        if ok:
            p = max(ok, key=lambda p: (p.score, -p.metrics["weight_memory"]))
            wb = {n: lb["weight_bits"] for n, lb in p.allocation["layers"].items()}
            again = train_candidate(cfg, p.arch, wb)
            cells["nas"] = data.correct(again.model)
            rec["nas"] = {"trial": p.trial, "arch": p.arch, "bits": wb, "bytes": p.metrics["weight_memory"] / 8,
                          "selection": p.score, "selection_rerun": again.score,
                          "report_top1": float(100 * cells["nas"].mean())}
            pick_rows.append(f"| {frac:.2f} | {p.trial} | {p.arch} | {' '.join(str(b) for b in wb.values())} | "
                             f"{p.score:.2f} / {again.score:.2f} |")
        for label in ("bayes", "ilp"):
            if label == "bayes":
                sol = bayes_sols[limits.index(lim)]
            else:
                try:
                    sol = solve(problem.with_budget("weight_memory", lim), "ilp")
                except InfeasibleBudget:
                    sol = None
            if sol is None:
                continue
            r = finetune(base, sol.allocation, data.train, recipe)
            cells[label] = data.correct(r.model)
            rec[label] = {"bits": bits_of(sol.allocation, names), "bytes": sol.metrics["weight_memory"] / 8,
                          "report_top1": float(100 * cells[label].mean())}
        diffs = " / ".join(paired(cells["nas"], cells[k]) if "nas" in cells and k in cells else "—"
                           for k in ("ilp", "bayes"))
        vs_w4 = paired(cells["nas"], c_ref) if "nas" in cells else "—"
        rows.append(f"| ≤ {frac:.2f} × W4 ({lim / 8 / 1024:.1f} KiB) | " + " | ".join(
            (acc_cell(cells[k]) + f" ({rec[k]['bytes'] / 1024:.1f} KiB)") if k in cells else "infeasible"
            for k in ("nas", "bayes", "ilp")) + f" | {diffs} | {vs_w4} |")
        out["budgets"][f"{frac:.2f}"] = rec
        log(f"budget {frac:.2f} x W4: " + ", ".join(f"{k} {rec[k]['report_top1']:.2f}" for k in rec))
    lines = [
        "## ResNet-20 family: BOMP-NAS vs bits-only bayes and ILP on the fixed ResNet-20, weight memory as a "
        "fraction of uniform W4",
        "",
        f"Uniform W4 (per-channel scales counted): {w4 / 8 / 1024:.1f} KiB. Weight bits {wbits}, A8 everywhere. "
        f"**Budget used (far below the paper's hundreds of trials with full training):** BOMP-NAS {len(trials)} "
        f"trials ({len(measured)} trained; TPE with 8 random start-up trials, so most of them are random), each "
        f"inheriting the checkpoint's weights (leading channel slices, first blocks), then {args.train_steps} "
        f"float Adam steps (lr {args.train_lr}) and {args.qaft_steps} QAFT steps (SGD lr {args.lr}, batch "
        f"{args.nas_batch}), scored on {len(data.selection.y)} selection images; {nas_s:.0f} s in one process. "
        f"bayes: {args.bayes_trials} PTQ-scored trials on the selection images ({bayes_s:.0f} s). ILP: Fisher table "
        f"(256 train images). Space: widths {{0.5, 0.75, 1}} × 3 stages, depths {{1, 2, 3}} × 3 stages. Every "
        f"fixed-architecture pick gets {steps_fixed} QAFT steps with the same recipe; the NAS pick is its trial "
        f"re-run. Report split: {len(c_ref)} test images. Reference: uniform W4A8 ResNet-20 after the same "
        f"{steps_fixed} QAFT steps: {acc_cell(c_ref)} %.",
        "",
        "| weight memory | BOMP-NAS top-1 % [95 % CI] (size) | bayes, fixed arch | ILP, fixed arch | "
        "NAS − ILP / NAS − bayes, paired | NAS − uniform W4, paired |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "BOMP-NAS picks (best selection score within the budget; selection top-1 in the study / in the re-run):",
        "",
        "| budget (× W4) | trial | architecture | bits per layer | selection % |",
        "|---|---|---|---|---|",
        *pick_rows,
        "",
        "All trials of the study:",
        "",
        "| trial | architecture | KiB | × W4 | selection % after float steps | after QAFT | s |",
        "|---|---|---|---|---|---|---|",
        *trial_rows,
        "",
    ]
    out["trial_table"] = [{"trial": tr.number, "arch": tr.user_attrs["arch"], "metrics": tr.user_attrs["metrics"],
                           "measured": tr.user_attrs.get("measured"), "values": list(tr.values),
                           "float_top1": tr.user_attrs.get("float_top1"), "seconds": tr.user_attrs.get("seconds")}
                          for tr in trials]
    return lines, out


def _header(args) -> list[str]:
    return [
        "# BOMP-NAS and QBitOpt on ResNet-20 / CIFAR-10 (small CPU budget)",
        "",
        f"Machine: {machine()}; loaded (other jobs shared the two cores), so seconds are upper bounds.",
        f"Command: `python bench/bompnas_resnet.py {' '.join(sys.argv[1:])}`",
        "",
    ]


def _write(args, res: dict, lines: list[str]) -> None:
    stem = args.out or f"bompnas-resnet-{args.parts}"
    write_result(f"{stem}.md", "\n".join(_header(args) + lines))
    write_result(f"{stem}.json", json.dumps(res, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", choices=("qbitopt", "nas", "qbitopt-digits"), required=True)
    ap.add_argument("--selection", type=int, default=2000, help="test images held out for choosing")
    ap.add_argument("--steps", type=int, default=150, help="QAT steps (qbitopt part)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--budget", type=float, default=3.0, help="average weight bits (qbitopt part)")
    ap.add_argument("--act", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--trials", type=int, default=10, help="BOMP-NAS trials")
    ap.add_argument("--bayes-trials", type=int, default=30)
    ap.add_argument("--fractions", default="0.5,0.75", help="weight-memory budgets, fractions of uniform W4")
    ap.add_argument("--nas-bits", default="2,3,4")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--train-lr", type=float, default=1e-3)
    ap.add_argument("--qaft-steps", type=int, default=50)
    ap.add_argument("--nas-batch", type=int, default=64)
    ap.add_argument("--report-max", type=int, default=None, help="cap the report split (smoke runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.parts == "qbitopt-digits":
        lines, res = part_qbitopt_digits(args)
        _write(args, res, lines)
        log("done")
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = Data(args.selection, tmp, args.report_max)
        log(f"data: {len(data.train.y)} train, {len(data.selection.y)} selection, {len(data.report.y)} report")
        if args.parts == "qbitopt":
            lines, res = part_qbitopt(data, args)
        else:
            lines, res = part_nas(data, args, tmp)
    _write(args, res, lines)
    log("done")


if __name__ == "__main__":
    main()
