"""BOMP-NAS and QBitOpt on digits: trial throughput, fronts at equal weight memory, QBitOpt vs search-then-QAT.

    .venv/bin/python bench/bompnas.py                      # all parts -> bench/results/bompnas.md (+ .json)
    .venv/bin/python bench/bompnas.py --parts throughput   # one part

Data (the bundled digits, seed-0 splits): train (1197 images) trains and fine-tunes everything; selection
(the zoo's calibration split, 240 images; the zoo's digits-cnn never trained on it) scores BOMP-NAS trials,
the bayes scorer and QBitOpt's evaluations; test (360 images) is touched only by the final figures. Every
figure on test is compared with the FP32 digits-cnn measured on the same 360 images.

1. throughput — trials per minute of one BOMP-NAS study (digits-cnn family, 60 float + 60 QAFT steps per trial,
   no budget so every trial trains) run by 1 and by 2 local worker processes (`search.trials.run_trials`,
   SQLite storage). Wall time includes the workers' start-up.
2. fronts — at equal weight-memory budgets (bytes, A8 activations, per-channel scales counted): BOMP-NAS (one
   study over the digits-cnn family's widths/depth and per-layer weight bits {2,3,4,6,8}, init "inherit",
   float training + QAFT per trial, best selection score within each budget) against two searches on the fixed
   digits-cnn: bits-only `bayes` (PTQ scorer on selection, one sweep study) and ILP (Fisher table on 256 train
   images). Every chosen allocation then gets the *same* QAFT recipe (steps, lr, batch, seed) from the
   pretrained weights (the NAS pick: its own trial re-run, deterministic) and is measured on test.
   95 % intervals: Wilson per accuracy; paired bootstrap (2000 resamples of the test images) for NAS − ILP.
3. qbitopt — digits-cnn at avg_wbits=3 (A8): QBitOpt (re-allocation every k steps during QAT, frozen at 75 %)
   against ILP-then-QAT (Fisher table, then the same QAT recipe at the ILP allocation), same steps, 3 seeds.
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

from _common import acc_cell, machine, paired, write_result  # noqa: E402

from quant import Allocation, QuantConfig  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import discover_layers  # noqa: E402
from quant.qat import QATRecipe, finetune  # noqa: E402
from search import AllocationProblem, solve  # noqa: E402
from search.solvers.bayes import BayesSolver, ptq_scorer  # noqa: E402
from search.solvers.bompnas import BompNasConfig, create, front, train_candidate  # noqa: E402
from search.solvers.qbitopt import qbitopt_finetune  # noqa: E402
from search.trials import load_fanout_study, run_trials  # noqa: E402
from sensitivity import SensitivityOptions, compute_sensitivity  # noqa: E402
from zoo import load_digits_splits, load_model  # noqa: E402

T0 = time.perf_counter()
SPLITS = load_digits_splits(seed=0)
TRAIN, SELECTION, TEST = SPLITS.train, SPLITS.calibration, SPLITS.test
ACT = 8


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def correct(model: torch.nn.Module) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return (model(TEST.x).argmax(1) == TEST.y).numpy()


# --- 1. throughput ---------------------------------------------------------------------------------------------


def _worker(url: str, name: str, wid: str) -> int:
    return run_trials(url, name, worker=wid).ran


def throughput(trials: int, worker_counts: list[int], tmp: Path) -> tuple[list[str], dict]:
    import multiprocessing as mp

    cfg = BompNasConfig(train_steps=60, qaft_steps=60, batch_size=64)
    rows, out = [], {}
    for workers in worker_counts:
        url, name = f"sqlite:///{tmp / f'tp{workers}.db'}", f"tp{workers}"
        create(url, name, cfg, total_trials=trials, heartbeat_interval=5)
        t = time.perf_counter()
        with mp.get_context("spawn").Pool(workers) as pool:
            ran = pool.starmap(_worker, [(url, name, f"w{i}") for i in range(workers)])
        sec = time.perf_counter() - t
        study, _ = load_fanout_study(url, name)
        states = [tr.state.name for tr in study.get_trials(deepcopy=False)]
        per_trial = np.mean([tr.user_attrs["seconds"] for tr in study.get_trials(deepcopy=False)
                             if tr.state.name == "COMPLETE"])
        rate = 60 * states.count("COMPLETE") / sec
        done = [tr for tr in study.get_trials(deepcopy=False) if tr.state.name == "COMPLETE"]
        span = (max(tr.datetime_complete for tr in done) - min(tr.datetime_start for tr in done)).total_seconds()
        steady = 60 * len(done) / span
        out[workers] = {"trials": len(states), "complete": states.count("COMPLETE"), "seconds": sec,
                        "per_worker": ran, "trials_per_min": rate, "mean_trial_s": float(per_trial),
                        "first_start_to_last_end_s": span, "trials_per_min_after_startup": steady}
        rows.append(f"| {workers} | {states.count('COMPLETE')}/{len(states)} | {ran} | {sec:.1f} | "
                    f"{per_trial:.2f} | **{rate:.1f}** | {steady:.1f} |")
        log(f"throughput {workers} worker(s): {rate:.1f} trials/min ({sec:.1f} s, per worker {ran})")
    lines = [
        "## 1. Trials per minute, one study, local worker processes",
        "",
        f"BOMP-NAS digits-cnn family, {cfg.train_steps} float + {cfg.qaft_steps} QAFT steps per trial, "
        f"{trials} trials, SQLite storage, heartbeats every 5 s. Wall time from pool start to the last trial.",
        "",
        "| workers | complete/rows | trials per worker | wall s | mean trial s (in worker) | trials/min | "
        "trials/min, first trial start to last end |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Speed-up over 1 worker: " + ", ".join(
            f"{w} workers {out[w]['trials_per_min'] / out[1]['trials_per_min']:.2f}x (wall), "
            f"{out[w]['trials_per_min_after_startup'] / out[1]['trials_per_min_after_startup']:.2f}x (after "
            "start-up)" for w in worker_counts if w != 1 and 1 in out) + ". Start-up = process spawn, imports and "
        f"loading data and pretrained weights in each worker. The machine has {os.cpu_count()} cores shared "
        f"with other jobs (load average {os.getloadavg()[0]:.1f} at the end of this part): each worker trains "
        "with one intra-op thread, so free cores, not the study storage, bound the speed-up.",
        "",
    ]
    return lines, out


# --- 2. fronts at equal weight memory --------------------------------------------------------------------------


def qaft(model, alloc: Allocation, cfg: BompNasConfig):
    recipe = QATRecipe(steps=cfg.qaft_steps, lr=cfg.qaft_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                       device="cpu", calibration_samples=256)
    return finetune(model, alloc, TRAIN, recipe, eval_data=SELECTION)


def fronts(trials: int, bayes_trials: int, budgets_b: list[int], tmp: Path) -> tuple[list[str], dict]:
    cfg = BompNasConfig(train_steps=100, qaft_steps=150, batch_size=64,
                        budgets=[f"weight_memory={max(budgets_b)}B"])
    url, name = f"sqlite:///{tmp / 'nas.db'}", "nas"
    create(url, name, cfg, total_trials=trials, heartbeat_interval=5)
    t = time.perf_counter()
    run_trials(url, name, worker="w0")
    nas_s = time.perf_counter() - t
    pts = front(url, name)
    study, _ = load_fanout_study(url, name)
    n_measured = sum(1 for tr in study.get_trials(deepcopy=False) if tr.user_attrs.get("measured"))
    log(f"nas: {trials} trials ({n_measured} trained) in {nas_s:.0f} s, front {len(pts)} points")

    loaded = load_model("zoo:digits-cnn")
    base = loaded.model.eval()
    layers = discover_layers(base, loaded.example_input)
    names = [layer.name for layer in layers]
    cost = CostModel(layers)
    fp32 = correct(base)
    wbits = tuple(cfg.weight_bits)
    opts = SensitivityOptions(weight_bits=wbits, activation_bits=(ACT,), samples=256,
                              quant=QuantConfig(weight_clip="auto"))
    table = compute_sensitivity(base, TRAIN.subset(range(256)), "fisher", opts)
    problem = AllocationProblem(table, cost)
    scorer = ptq_scorer(base, TRAIN.subset(range(256)), SELECTION, QuantConfig(weight_clip="auto"))
    limits = [8.0 * b for b in budgets_b]
    t = time.perf_counter()
    bayes = BayesSolver(scorer=scorer, n_trials=bayes_trials, seed=0)
    bayes_sols = bayes.sweep(problem, "weight_memory", limits)
    bayes_s = time.perf_counter() - t
    log(f"bayes sweep: {bayes_trials} trials in {bayes_s:.0f} s")

    rows, out = [], {"fp32_test": float(fp32.mean() * 100), "nas_seconds": nas_s, "bayes_seconds": bayes_s}
    for b, lim in zip(budgets_b, limits):
        rec: dict = {}
        nas_ok = [p for p in pts if p.metrics["weight_memory"] <= lim]
        cells = {}
        if nas_ok:
            p = max(nas_ok, key=lambda p: (p.score, -p.metrics["weight_memory"]))
            wb = {n: lb["weight_bits"] for n, lb in p.allocation["layers"].items()}
            again = train_candidate(cfg, p.arch, wb)
            c = correct(again.model)
            cells["nas"] = c
            rec["nas"] = {"arch": p.arch, "bits": wb, "bytes": p.metrics["weight_memory"] / 8,
                          "selection": p.score, "selection_rerun": again.score, "test": float(c.mean() * 100)}
        for label, sol_fn in (("bayes", lambda: bayes_sols[limits.index(lim)]),
                              ("ilp", lambda: _ilp(problem, lim))):
            sol = sol_fn()
            if sol is None:
                continue
            alloc = sol.allocation
            res = qaft(base, alloc, cfg)
            c = correct(res.model)
            cells[label] = c
            rec[label] = {"bits": {n: alloc[n].weight_bits for n in names}, "bytes": sol.metrics["weight_memory"] / 8,
                          "selection_after_qaft": res.metrics["top1"], "test": float(c.mean() * 100)}
        diff = paired(cells["nas"], cells["ilp"]) if "nas" in cells and "ilp" in cells else "—"
        rows.append(f"| ≤ {b} B | " + " | ".join(
            (acc_cell(cells[k]) + f" ({rec[k]['bytes']:.0f} B)") if k in cells else "infeasible"
            for k in ("nas", "bayes", "ilp")) + f" | {diff} |")
        out[str(b)] = rec
        log(f"budget {b} B: " + ", ".join(f"{k} {rec[k]['test']:.2f}" for k in rec))
    arch_rows = [f"| ≤ {b} B | {out[str(b)]['nas']['arch']} | {out[str(b)]['nas']['bits']} | "
                 f"{out[str(b)]['nas']['selection']:.2f} / {out[str(b)]['nas']['selection_rerun']:.2f} |"
                 for b in budgets_b if "nas" in out[str(b)]]
    lines = [
        "## 2. digits: BOMP-NAS front vs bits-only bayes and ILP on the fixed digits-cnn, equal weight memory",
        "",
        f"BOMP-NAS: {trials} trials ({n_measured} within the largest budget, trained: {cfg.train_steps} float "
        f"Adam steps from inherited weights, then {cfg.qaft_steps} QAFT steps), {nas_s:.0f} s in one worker. "
        f"bayes: {bayes_trials} PTQ-scored trials, one sweep study ({bayes_s:.0f} s). ILP: Fisher table. "
        f"A{ACT}, weight bits {list(wbits)}. Every pick then gets the same {cfg.qaft_steps}-step QAFT and is "
        f"measured on the 360 test images; FP32 digits-cnn on the same images: "
        f"{acc_cell(fp32)} %.",
        "",
        "| weight memory | BOMP-NAS test top-1 % (bytes) | bayes (fixed arch) | ILP (fixed arch) | NAS − ILP, paired |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "BOMP-NAS picks (architecture, weight bits, selection top-1 in the study / re-run):",
        "",
        "| budget | architecture | bits | selection % |",
        "|---|---|---|---|",
        *arch_rows,
        "",
    ]
    return lines, out


def _ilp(problem: AllocationProblem, limit: float):
    from search.problem import InfeasibleBudget

    try:
        return solve(problem.with_budget("weight_memory", limit), "ilp")
    except InfeasibleBudget:
        return None


# --- 3. QBitOpt vs search-then-QAT -------------------------------------------------------------------------


def qbitopt_vs_search(steps: int, seeds: int, model_name: str, budget: float, act: int) -> tuple[list[str], dict]:
    loaded = load_model(f"zoo:{model_name}")
    base = loaded.model.eval()
    layers = discover_layers(base, loaded.example_input)
    cost = CostModel(layers)
    wbits = (2, 3, 4, 5, 6, 8)
    opts = SensitivityOptions(weight_bits=wbits, activation_bits=(act,), samples=256,
                              quant=QuantConfig(weight_clip="mse"))
    table = compute_sensitivity(base, TRAIN.subset(range(256)), "fisher", opts)
    ilp = solve(AllocationProblem(table, cost).with_budget("avg_weight_bits", budget), "ilp").allocation
    fp32 = correct(base)
    res: dict = {"qbitopt": [], "ilp_qat": [], "fp32_test": float(fp32.mean() * 100)}
    cq, ci = [], []
    for seed in range(seeds):
        recipe = QATRecipe(steps=steps, lr=0.01, batch_size=64, seed=seed, device="cpu")
        t = time.perf_counter()
        r, final = qbitopt_finetune(base, TRAIN, [f"avg_wbits={budget}"], recipe, weight_bits=wbits,
                                    activation_bits=(act,),
                                    every_k=max(10, steps // 10), freeze_at=0.75, eval_data=SELECTION)
        tq = time.perf_counter() - t
        c1 = correct(r.model)
        t = time.perf_counter()
        r2 = finetune(base, ilp, TRAIN, recipe, eval_data=SELECTION)
        ti = time.perf_counter() - t
        c2 = correct(r2.model)
        cq.append(c1)
        ci.append(c2)
        res["qbitopt"].append({"seed": seed, "test": float(c1.mean() * 100), "seconds": tq,
                               "reallocations": final.metadata["qbitopt"]["changes"],
                               "avg_wbits": cost.cost(final).avg_weight_bits,
                               "bits": {n: final[n].weight_bits for n in final.layers}})
        res["ilp_qat"].append({"seed": seed, "test": float(c2.mean() * 100), "seconds": ti,
                               "avg_wbits": cost.cost(ilp).avg_weight_bits,
                               "bits": {n: ilp[n].weight_bits for n in ilp.layers}})
        log(f"qbitopt seed {seed}: {c1.mean() * 100:.2f} vs ilp+qat {c2.mean() * 100:.2f}")
    a, b = np.concatenate(cq), np.concatenate(ci)
    rows = [f"| {s} | {res['qbitopt'][s]['test']:.2f} ({res['qbitopt'][s]['avg_wbits']:.2f} b, "
            f"{res['qbitopt'][s]['reallocations']} re-allocations) | "
            f"{res['ilp_qat'][s]['test']:.2f} ({res['ilp_qat'][s]['avg_wbits']:.2f} b) |" for s in range(seeds)]
    lines = [
        f"## 3. {model_name}, avg_wbits ≤ {budget}, A{act}: QBitOpt vs ILP-then-QAT, same recipe and steps",
        "",
        f"{steps} SGD steps (lr 0.01, batch 64, LSQ), QBitOpt re-allocating every {max(10, steps // 10)} steps "
        f"until 75 %, weight bits {list(wbits)}. Test = 360 images; FP32 on them: {acc_cell(fp32)} %.",
        "",
        "| seed | QBitOpt test top-1 % (avg bits) | ILP + QAT |",
        "|---|---|---|",
        *rows,
        "",
        f"Mean over seeds: QBitOpt {100 * a.mean():.2f} %, ILP+QAT {100 * b.mean():.2f} %; paired bootstrap over "
        f"the test images (all seeds) of QBitOpt − ILP+QAT: {paired(a, b)} points.",
        "",
    ]
    return lines, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="throughput,fronts,qbitopt")
    ap.add_argument("--tp-trials", type=int, default=12)
    ap.add_argument("--nas-trials", type=int, default=60)
    ap.add_argument("--bayes-trials", type=int, default=40)
    ap.add_argument("--budgets", default="2500,4500,6000,8000", help="weight-memory budgets in bytes")
    ap.add_argument("--qbitopt-steps", type=int, default=300)
    ap.add_argument("--qbitopt-model", default="digits-cnn")
    ap.add_argument("--qbitopt-budget", type=float, default=3.0, help="average weight bits")
    ap.add_argument("--qbitopt-act", type=int, default=8, help="activation bits")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=None, help="result file stem (default: bompnas[-parts])")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.set_num_threads(1)
    text = [
        "# BOMP-NAS and QBitOpt on digits",
        "",
        f"Machine: {machine()}; a loaded machine (other jobs were running), so wall-clock figures are upper "
        "bounds.",
        f"Command: `python bench/bompnas.py --parts {args.parts} --tp-trials {args.tp_trials} --nas-trials "
        f"{args.nas_trials} --bayes-trials {args.bayes_trials} --budgets {args.budgets} --qbitopt-steps "
        f"{args.qbitopt_steps} --qbitopt-model {args.qbitopt_model} --qbitopt-budget {args.qbitopt_budget} "
        f"--qbitopt-act {args.qbitopt_act} --workers {args.workers} --seeds {args.seeds}`",
        "",
    ]
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "throughput" in parts:
            lines, results["throughput"] = throughput(args.tp_trials, [int(w) for w in args.workers.split(",")], tmp)
            text += lines
        if "fronts" in parts:
            budgets = [int(b) for b in args.budgets.split(",")]
            lines, results["fronts"] = fronts(args.nas_trials, args.bayes_trials, budgets, tmp)
            text += lines
        if "qbitopt" in parts:
            lines, results["qbitopt"] = qbitopt_vs_search(args.qbitopt_steps, args.seeds, args.qbitopt_model,
                                                          args.qbitopt_budget, args.qbitopt_act)
            text += lines
    stem = args.out or ("bompnas" + ("" if len(parts) == 3 else "-" + "-".join(parts)))
    write_result(f"{stem}.md", "\n".join(text))
    write_result(f"{stem}.json", json.dumps(results, indent=1, default=str))
    log("done")


if __name__ == "__main__":
    main()
