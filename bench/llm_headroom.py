"""zoo:tiny-llama, a diagnostic: how much of the perplexity gap at a bpw budget could *any* allocation from the
scheme options of `bench/llm_schemes.py` close?

    python bench/llm_headroom.py --source llm_schemes_gptq [--budgets 4.25,4.5] [--threads 1]

For each budget: start from the best uniform scheme that fits (from the source run's report rows, which is how
the goal defines the gap), and on the *selection* windows measure in context (every other layer at that scheme)
the change in mean per-sequence NLL of moving each unit (a tie group, q/k/v or gate/up, or a single layer) to
each other option. Then solve the exact knapsack on these measured, in-context changes under the budget (the
search's own ILP, `search.solve`, with the tie groups; an additive estimate of the best achievable allocation),
and measure that allocation: on the selection windows
(the additive estimate against the realised change) and on the report windows (the figure, paired with the
source run's uniform rows). Everything is chosen on the selection windows; the report windows only score. The
PTQ recipe is the search's (`search_quant_config(QUANT)`, checked against the source run). This is not the
product's search and is not used by it: it bounds what the option set allows on this model.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, machine  # noqa: E402
from bench.llm import data_roles, save  # noqa: E402
from bench.llm_schemes import QUANT, SCHEMES, boot_indices, gap_stats  # noqa: E402
from quant import Allocation, LayerBits, default_tie_groups, discover_layers  # noqa: E402
from quant.apply import collect_statistics, search_quant_config, set_allocation, wrap_model  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from zoo import load_model  # noqa: E402
from zoo.lm_eval import evaluate_tokens  # noqa: E402


def best_allocation(infos, cost: CostModel, units, opts: list[str], delta: np.ndarray, budget: float,
                    tied: list[list[str]]) -> tuple[Allocation, np.ndarray]:
    """The allocation minimising the summed measured Δ NLL under `bpw <= budget`, one option per unit (a tie
    group or a layer), by the search's own exact ILP (`search.solve`): each unit's Δ stands on its first
    layer, so a tie group's objective is its measured Δ once. Returns it and each unit's option index."""
    from search import AllocationProblem, solve
    from sensitivity.table import SensitivityTable

    row = {u[0]: i for i, u in enumerate(units)}
    values = np.array([delta[row[l.name]] if l.name in row else np.zeros(len(opts)) for l in infos])
    options = [LayerBits.of(s) for s in opts]
    table = SensitivityTable("in-context Δ NLL (selection windows)", list(infos), options, values)
    problem = AllocationProblem(table, cost, [f"bpw<={budget}"], {"ties": tied})
    alloc = solve(problem, "ilp").allocation
    return alloc, np.array([options.index(alloc[u[0]]) for u in units])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:tiny-llama")
    ap.add_argument("--source", default="llm_schemes_gptq", help="result of bench/llm_schemes.py with its uniform rows")
    ap.add_argument("--budgets", default="4.25,4.5")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--selection", type=int, default=192)
    ap.add_argument("--base", default=None, help="start scheme (default: the best uniform that fits)")
    ap.add_argument("--above", default=None, help="upper end of the gap (default: the next better uniform)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="llm_schemes_gptq_headroom")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = search_quant_config(QUANT)
    src = json.loads((RESULTS / f"{args.source}.json").read_text())
    if src.get("quant") != config.to_dict():
        raise SystemExit(f"{args.source} realised its rows with another PTQ recipe")
    with np.load(RESULTS / f"{args.source}_nll.npz") as z:
        src_nll = {k: z[k] for k in z.files}
    uniform = src["uniform"]
    out: dict = {"machine": machine(), "command": " ".join(["python bench/llm_headroom.py", *sys.argv[1:]]),
                 "source": args.source, "quant": config.to_dict(), "budgets": []}

    model = load_model(args.model).model
    cal, selection, report = data_roles(args.calib, args.selection)
    fp = evaluate_tokens(model, report)
    if abs(fp.perplexity - src["fp32"]["perplexity"]) > 1e-9:
        raise SystemExit(f"{args.source} was not measured on these report windows")
    infos = discover_layers(model, cal.x[:2])
    names = [l.name for l in infos]
    cost = CostModel(infos)
    tied = default_tie_groups(infos)
    in_group = {n for g in tied for n in g}
    units = [tuple(g) for g in tied] + [(n,) for n in names if n not in in_group]

    qmodel = copy.deepcopy(model)
    layers = wrap_model(qmodel, config)
    collect_statistics(qmodel, layers, cal, config)
    boot_idx = boot_indices(len(report))
    nlls_out: dict[str, np.ndarray] = {}

    def nll(alloc: Allocation, data) -> np.ndarray:
        set_allocation(qmodel, alloc)
        return evaluate_tokens(qmodel, data).per_sample_loss.numpy()

    def ppl(x: np.ndarray) -> np.ndarray:
        return np.exp(x.mean(-1))

    for budget in [float(b) for b in args.budgets.split(",") if b]:
        t, c = time.perf_counter(), time.process_time()
        fits = [s for s in uniform if uniform[s]["bpw"] <= budget + 1e-9]
        base = args.base or min(fits, key=lambda s: uniform[s]["perplexity"])
        better = [s for s in uniform if s not in fits and uniform[s]["perplexity"] < uniform[base]["perplexity"]]
        if not (args.above or better):
            print(f"{budget}: no uniform scheme above the budget is better than {base}; no gap", flush=True)
            continue
        above = args.above or min(better, key=lambda s: (uniform[s]["bpw"], uniform[s]["perplexity"]))
        base_alloc = Allocation.uniform(names, LayerBits.of(base))
        base_sel = nll(base_alloc, selection)
        opts = [base] + [s for s in SCHEMES if s != base]
        delta = np.full((len(units), len(opts)), np.inf)
        delta[:, 0] = 0.0
        for i, unit in enumerate(units):
            for j, s in enumerate(opts[1:], start=1):
                alloc = Allocation({**base_alloc.layers, **{n: LayerBits.of(s) for n in unit}})
                delta[i, j] = float((nll(alloc, selection) - base_sel).mean())
            print(f"{budget} {unit[0]}: " + " ".join(f"{opts[j]} {delta[i, j]:+.4f}" for j in range(1, len(opts))
                                                     if np.isfinite(delta[i, j])), flush=True)
        alloc, choice = best_allocation(infos, cost, units, opts, delta, budget, tied)
        estimate = float(sum(delta[i, j] for i, j in enumerate(choice)))
        realised_sel = float((nll(alloc, selection) - base_sel).mean())
        rep = nll(alloc, report)
        nlls_out[f"headroom_{budget}"] = rep
        np.savez(RESULTS / f"{args.out}_nll.npz", **nlls_out)
        lo, hi = src_nll[base], src_nll[above]
        # the same gap figures as bench/llm_schemes.py's rows (headline, and to the next significantly better)
        gs = gap_stats({s: u["bpw"] for s, u in uniform.items()}, src_nll, budget, rep, boot_idx)
        top = src_nll[gs["sig_above"] or above]  # 50 % of the gap to the next significantly better uniform
        need = float(np.log(ppl(lo) - 0.5 * (ppl(lo) - ppl(top))) - np.log(ppl(lo)))
        chosen: dict[str, int] = {}
        for n in names:
            chosen[alloc[n].label()] = chosen.get(alloc[n].label(), 0) + 1
        row = {"budget": budget, "base": base, "above": above, "bpw": cost.cost(alloc).bpw,
               "units": [list(u) for u in units], "options": opts, "delta_selection": delta.tolist(),
               "choice": [opts[j] for j in choice], "chosen": chosen,
               "additive_estimate_dnll_selection": estimate, "realised_dnll_selection": realised_sel,
               "needed_dnll_for_50pc": need, "perplexity": float(ppl(rep)), "base_perplexity": float(ppl(lo)),
               "above_perplexity": float(ppl(hi)),
               **{k: gs[k] for k in ("gap_closed", "gap_ci", "gap_width_ci", "sig_above", "sig_gap_closed",
                                     "sig_gap_ci", "vs_best_fit", "vs_best_fit_ci")},
               "evaluations": int(np.isfinite(delta[:, 1:]).sum()) + 3,
               "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
        out["budgets"].append(row)
        print(f"headroom {budget}: {row['chosen']} bpw {row['bpw']:.3f} est {estimate:+.4f} real {realised_sel:+.4f} "
              f"ppl {row['perplexity']:.3f} gap {row['gap_closed']:.0f}% ({row['gap_ci'][0]:.0f}-{row['gap_ci'][1]:.0f}); "
              f"to {row['sig_above']} {row['sig_gap_closed']}", flush=True)
        save(out, args.out, render)
    save(out, args.out, render)
    print(render(out))


def render(o: dict) -> str:
    lines = [f"Command: `{o['command']}` (uniform rows and report NLLs from `{o['source']}`). Machine: {o['machine']}.",
             "", "Knapsack on Δ NLL measured in context on the selection windows; scored on the report windows:", "",
             "| budget | base (best fit) / next better | alloc. bpw | chosen | Δ NLL selection: additive est. / realised "
             "| Δ NLL for 50 % (to the next significantly better) | perplexity (report) | gap closed % (95 % CI) | next significantly better: gap closed % "
             "(95 % CI) | ppl − best fit (95 % CI) | evaluations | wall s / CPU s |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in o["budgets"]:
        sig = "none" if r.get("sig_above") is None else (
            f"{r['sig_above']}: {r['sig_gap_closed']:.0f} ({r['sig_gap_ci'][0]:.0f} – {r['sig_gap_ci'][1]:.0f})")
        lines.append(
            f"| {r['budget']} | {r['base']} {r['base_perplexity']:.3f} / {r['above']} {r['above_perplexity']:.3f} | "
            f"{r['bpw']:.3f} | {r['chosen']} | {r['additive_estimate_dnll_selection']:+.4f} / "
            f"{r['realised_dnll_selection']:+.4f} | {r['needed_dnll_for_50pc']:+.4f} | {r['perplexity']:.3f} | "
            f"{r['gap_closed']:.0f} ({r['gap_ci'][0]:.0f} – {r['gap_ci'][1]:.0f}) | {sig} | {r['vs_best_fit']:+.3f} "
            f"({r['vs_best_fit_ci'][0]:+.3f} – {r['vs_best_fit_ci'][1]:+.3f}) | {r['evaluations']} | "
            f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
