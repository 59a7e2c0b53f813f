"""zoo:tiny-llama with weight *schemes*: uniform group-wise INT, MXFP4, NVFP4, FP8 and mixed at bpw budgets.

    python bench/llm_schemes.py [--methods measured,fisher,hessian] [--sens-samples 16] [--selection 128]
                                [--calib 64] [--pareto 4] [--refine-passes 60] [--threads 1]

Data: the same as `bench/llm.py` (`zoo:stdlib-text`, seed 0): calibration/sensitivity = windows of the training
modules; the 384 held-out windows (modules never trained on) are split at random into a *selection* half (the
search measures its candidates and makes its paired choice there) and a *report* half (every figure below).
Nothing is tuned on the report windows.

* PTQ recipe: every row, uniform and mixed, is realised with the QuantConfig the search itself uses,
  `quant.apply.search_quant_config(QUANT)` (the search's recipe: GPTQ rounding except on the tied lm_head
  (`gptq_applies`), MSE activation clipping, bias correction where `bias_correction_applies`, i.e. on none of
  this model's bias-less projections; `QUANT` asks for per-group MSE weight clipping), and each search's own config is checked to be that one, so the
  figures are those of the models the search measured and a user deploys.
* Uniform: every layer (q/k/v/o, gate/up/down, the tied lm_head) in one scheme, activations float; bpw = the
  cost model's bits per weight including scales/zero points.
* Mixed: the product's own path, `bitsearch.search(model, roles=..., method=METHOD, solver="ilp",
  budgets=["bpw<=B"], options={"schemes": SCHEMES})`, one search per sensitivity method and budget (its
  refinement on the calibration windows — per-token KL, guarded by per-sequence NLL on the selection windows —
  and its paired test against the best uniform that fits, on the selection windows). Its recommendation is then
  scored here on the report windows with the same code as the uniform rows, so the per-sequence NLLs are paired.
  The mixed contender the search tested (kept or not) is scored the same way, as a diagnostic.
* Gap closed at B = (ppl(below) − ppl(rec)) / (ppl(below) − ppl(above)), two ways:
  - on the uniform front (the headline): "below" = the best uniform scheme that fits (lowest perplexity with
    bpw ≤ B, what a user would take without mixing), "above" = the cheapest uniform scheme with bpw > B that
    is better than it;
  - by bpw alone: "below" = the uniform scheme with the largest bpw ≤ B, "above" = the one with the smallest
    bpw > B; undefined (n/a) when the scheme above is not better than the one below.
  "vs best fit" = ppl(rec) − ppl(best uniform that fits); 95 % intervals by a paired bootstrap over report
  sequences; significantly worse when the whole interval is above 0. Per-sequence NLLs of every row are kept
  in bench/results/llm_schemes_nll.npz.
* Multi-budget: bpw ≤ 4.25 and peak activation memory ≤ half that of float activations, activation options
  A8 and float (A32).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitsearch  # noqa: E402
from bench._common import RESULTS, machine  # noqa: E402
from bench.llm import data_roles, save  # noqa: E402
from quant import Allocation, LayerBits, QuantConfig, apply_allocation, discover_layers  # noqa: E402
from quant.apply import search_quant_config  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from search.selection import _label  # noqa: E402
from zoo import load_model  # noqa: E402
from zoo.lm_eval import evaluate_tokens  # noqa: E402

SCHEMES = ("int2-g64", "int2-g128", "int3-g64", "int3-g128", "int4-g64", "int4-g128", "int8-g64", "int8-g128",
           "mxfp4", "nvfp4", "fp8-e4m3")
BUDGETS = (3.25, 3.5, 4.25, 4.5)
BOOT = 2000
#: The `quant` settings every search of this bench gets; the rows are realised with `search_quant_config(QUANT)`.
QUANT = {"weight_clip": "mse"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:tiny-llama")
    ap.add_argument("--methods", default="measured,fisher,hessian")
    ap.add_argument("--multi-methods", default=None, help="methods of the multi-budget case (default: --methods)")
    ap.add_argument("--refine-passes", type=float, default=None, help="refine max_passes (default: the product's)")
    ap.add_argument("--hutch-probes", type=int, default=64, help="max_probes of the hessian method")
    ap.add_argument("--sens-samples", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--selection", type=int, default=128)
    ap.add_argument("--pareto", type=int, default=4)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--no-multi", action="store_true", help="skip the bpw + activation-memory case")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", default="llm_schemes")
    ap.add_argument("--uniform-from", default=None, help="reuse the uniform rows of an earlier run (result name)")
    ap.add_argument("--merge", default=None,
                    help="comma-separated result names (runs of this script, e.g. one per method run side by side) to "
                         "merge into --out instead of running")
    args = ap.parse_args()
    if args.merge:
        merge([n for n in args.merge.split(",") if n], args.out)
        return
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = search_quant_config(QUANT)  # calibration windows are always given to the search
    out: dict = {"machine": machine(), "command": " ".join(["python bench/llm_schemes.py", *sys.argv[1:]]),
                 "quant": config.to_dict()}

    model = load_model(args.model).model
    cal, selection, report = data_roles(args.calib, args.selection)
    n_rep = len(report)
    boot_idx = boot_indices(n_rep)
    layers = discover_layers(model, cal.x[:2])
    names = [l.name for l in layers]
    cost = CostModel(layers)

    fp = evaluate_tokens(model, report)
    out["fp32"] = {"perplexity": fp.perplexity, "tokens": fp.tokens}
    print(f"fp32 ppl {fp.perplexity:.3f}", flush=True)

    def measure(alloc: Allocation) -> dict:
        q = apply_allocation(model, alloc, cal, config)
        r = evaluate_tokens(q, report, reference_logits=fp.logits)
        return {"perplexity": r.perplexity, "kl": r.kl, "agreement": r.agreement, "nll": r.per_sample_loss.numpy()}

    # --- uniform schemes ------------------------------------------------------------------------------------
    uniform: dict[str, dict] = {}
    if args.uniform_from:  # the same uniform rows from an earlier run on the same data (checked: FP32 figures)
        import json

        prev = json.loads((RESULTS / f"{args.uniform_from}.json").read_text())
        if abs(prev["fp32"]["perplexity"] - fp.perplexity) > 1e-9:
            raise SystemExit("--uniform-from: that run was not measured on the same report windows")
        if prev.get("quant") != out["quant"]:
            raise SystemExit("--uniform-from: that run realised its rows with another PTQ recipe")
        with np.load(RESULTS / f"{args.uniform_from}_nll.npz") as z:
            uniform = {s: {**prev["uniform"][s], "nll": z[s]} for s in SCHEMES}
    for s in SCHEMES if not uniform else ():
        m = measure(Allocation.uniform(names, LayerBits.of(s)))
        m["bpw"] = cost.uniform(LayerBits.of(s)).bpw
        uniform[s] = m
        print(f"uniform {s}: bpw {m['bpw']:.4f} ppl {m['perplexity']:.3f} kl {m['kl']:.4f}", flush=True)
    out["uniform"] = {s: {k: v for k, v in m.items() if k != "nll"} for s, m in uniform.items()}
    nlls = {"fp32": fp.per_sample_loss.numpy(), **{s: m["nll"] for s, m in uniform.items()}}
    np.savez(RESULTS / f"{args.out}_nll.npz", **nlls)

    def counts(alloc: Allocation) -> dict[str, int]:
        chosen: dict[str, int] = {}
        for n in names:
            chosen[alloc[n].label()] = chosen.get(alloc[n].label(), 0) + 1
        return chosen

    def gap_row(budget: float, m: dict) -> dict:
        return {"perplexity": m["perplexity"], "kl": m["kl"], "agreement": m["agreement"],
                **gap_stats({u: v["bpw"] for u, v in uniform.items()}, nlls, budget, m["nll"], boot_idx)}

    def run(method: str, budgets: list[str], activation_bits: list[int]):
        t, c = time.perf_counter(), time.process_time()
        params = {"max_probes": args.hutch_probes} if method == "hessian" else {}
        refine = {} if args.refine_passes is None else {"max_passes": args.refine_passes}
        r = bitsearch.search(
            model, roles={"calibration": cal, "selection": selection, "report": report}, budgets=budgets,
            method="measured", solver="ilp", pareto=args.pareto, seed=0, refine=refine,
            options={"weight_bits": [], "schemes": list(SCHEMES), "activation_bits": activation_bits},
            sensitivity={"method": method, "samples": args.sens_samples, "settings": params},
            quant=dict(QUANT))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if QuantConfig.from_dict(r.table.settings["quant"]) != config:
            raise SystemExit(f"the search realised its points with {r.table.settings['quant']}, not with "
                             f"{config.to_dict()}: this bench would score other models than it chose")
        rec = r.recommendation
        alloc = rec.allocation
        ev = rec.evidence or {}
        sens_passes = r.table.cost.get("passes")
        fwd = {"sensitivity": float(sens_passes or 0) * r.table.data.get("samples", args.sens_samples)}
        for stage, c_ in r.costs.items():  # refine: passes over the tuning windows; measure_*: candidates
            if isinstance(c_, dict) and "passes" in c_:
                fwd[stage] = float(c_["passes"]) * (c_.get("samples") or c_.get("tune_samples", 0))
        search = {"method": method, "wall_s": wall, "cpu_s": cpu, "timings": r.timings,
                  "sensitivity_passes": sens_passes, "window_passes": fwd,
                  "window_passes_total": float(sum(fwd.values())), "costs": r.costs,
                  "kind": ev.get("recommended"), "reason": ev.get("reason"), "baseline": ev.get("baseline"),
                  "contender": ev.get("contender"), "selection_test": ev.get("selection"),
                  "report_test": ev.get("report"), "metrics": rec.point.metrics,
                  "chosen": counts(alloc), "allocation": {n: alloc[n].label() for n in names}}
        contender_alloc = None
        label = (ev.get("contender") or {}).get("label")
        if label is not None:
            pts = [p for p in r.front.points if p.kind != "uniform" and _label(p) == label]
            if pts:
                contender_alloc = pts[0].allocation
        return alloc, search, contender_alloc

    out["mixed"] = []
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        for budget in [float(b) for b in args.budgets.split(",") if b]:
            alloc, search, contender = run(method, [f"bpw<={budget}"], [32])
            m = measure(alloc)
            nlls[f"{method}_{budget}"] = m["nll"]
            row = {"budget": budget, **gap_row(budget, m), **search}
            if contender is not None and search["kind"] != "mixed":
                cm = measure(contender)
                nlls[f"{method}_{budget}_contender"] = cm["nll"]
                row["contender_report"] = {"perplexity": cm["perplexity"], "kl": cm["kl"],
                                           **{k: v for k, v in gap_row(budget, cm).items()
                                              if k in ("gap_closed", "gap_ci", "vs_best_fit", "vs_best_fit_ci")}}
            out["mixed"].append(row)
            print(f"{method} bpw<={budget}: ppl {m['perplexity']:.3f} gap {row['gap_closed']:.0f}% "
                  f"({row['gap_ci'][0]:.0f}-{row['gap_ci'][1]:.0f}) {search['kind']} {search['chosen']} "
                  f"refine {search['costs'].get('refine', {}).get('steps')} steps {search['wall_s']:.0f}s",
                  flush=True)
            save(out, args.out, render)
            np.savez(RESULTS / f"{args.out}_nll.npz", **nlls)

    # --- multi-budget: bpw and peak activation memory ---------------------------------------------------------
    if not args.no_multi:
        peak32 = cost.uniform(LayerBits.of("int4-g128", 32)).peak_activation_bits
        peak8 = cost.uniform(LayerBits.of("int4-g128", 8)).peak_activation_bits
        limit = int(peak32 // 2)
        out["multi"] = []
        for method in [m for m in (args.multi_methods or args.methods).split(",") if m]:
            alloc, search, _ = run(method, ["bpw<=4.25", f"peak_activation_memory<={limit}"], [8, 32])
            m = measure(alloc)
            out["multi"].append({"bpw_limit": 4.25, "peak_limit_bits": limit, "peak_a32_bits": peak32,
                                 "peak_a8_bits": peak8, "perplexity": m["perplexity"], "kl": m["kl"], **search})
            print("multi", method, m["perplexity"], search["chosen"], search["metrics"], flush=True)
            save(out, args.out, render)
    save(out, args.out, render)
    print(render(out))


def ppl(nll: np.ndarray) -> np.ndarray:
    return np.exp(nll.mean(-1))


def boot_indices(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n, size=(BOOT, n))


def gap_stats(bpw: dict[str, float], nlls: dict[str, np.ndarray], budget: float, rec: np.ndarray,
              boot_idx: np.ndarray) -> dict:
    """Gap closed and Δ vs the best uniform that fits, on the report windows (paired bootstrap CIs).
    `bpw`: the uniform schemes' bpw; `nlls`: their per-sequence NLLs by name."""
    u_ppl = {s: float(ppl(nlls[s])) for s in bpw}
    fits = [s for s in bpw if bpw[s] <= budget + 1e-9]
    rest = [s for s in bpw if s not in fits]
    best = min(fits, key=lambda s: u_ppl[s])
    better = [s for s in rest if u_ppl[s] < u_ppl[best]]
    above = min(better, key=lambda s: (bpw[s], u_ppl[s]))
    lit_below = max(fits, key=lambda s: (bpw[s], -u_ppl[s]))
    lit_above = min(rest, key=lambda s: (bpw[s], u_ppl[s]))

    def diff_ci(a: np.ndarray, b: np.ndarray) -> list[float]:
        d = ppl(a[boot_idx]) - ppl(b[boot_idx])
        return [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]

    # A scheme above can be better than the best fit by less than the noise; the gap to it then says little.
    # The cheapest one that is significantly better (its paired 95 % interval of ppl(best) - ppl(it) above 0):
    sig_better = [s for s in better if diff_ci(nlls[best], nlls[s])[0] > 0]
    sig_above = min(sig_better, key=lambda s: (bpw[s], u_ppl[s])) if sig_better else None

    def gap(below: str, above: str | None) -> tuple[float, list[float]] | tuple[None, None]:
        if above is None:
            return None, None
        lo, hi = nlls[below], nlls[above]
        if ppl(hi) >= ppl(lo):
            return None, None
        gb = (ppl(lo[boot_idx]) - ppl(rec[boot_idx])) / (ppl(lo[boot_idx]) - ppl(hi[boot_idx])) * 100
        return (float((ppl(lo) - ppl(rec)) / (ppl(lo) - ppl(hi)) * 100),
                [float(np.percentile(gb, 2.5)), float(np.percentile(gb, 97.5))])

    g, g_ci = gap(best, above)
    lg, lg_ci = gap(lit_below, lit_above)
    sg, sg_ci = gap(best, sig_above)
    vs_ci = diff_ci(rec, nlls[best])
    return {"below": best, "above": above, "best_fit": best, "gap_closed": g, "gap_ci": g_ci,
            "gap_width_ci": diff_ci(nlls[best], nlls[above]),
            "sig_above": sig_above, "sig_gap_closed": sg, "sig_gap_ci": sg_ci,
            "bpw_below": lit_below, "bpw_above": lit_above, "bpw_gap_closed": lg, "bpw_gap_ci": lg_ci,
            "vs_best_fit": float(ppl(rec) - ppl(nlls[best])), "vs_best_fit_ci": vs_ci,
            "significantly_worse": vs_ci[0] > 0, "goal_met": bool(g >= 50),
            "goal_met_sig_gap": None if sg is None else bool(sg >= 50)}


def merge(names: list[str], out_name: str) -> None:
    """One result from several runs on the same data (their uniform rows must agree): mixed and multi rows
    concatenated, every command kept."""
    import json

    runs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    first = runs[0]
    for r in runs[1:]:
        if r["fp32"] != first["fp32"] or r.get("quant") != first.get("quant") or {s: u["perplexity"] for s, u in r["uniform"].items()} != {
            s: u["perplexity"] for s, u in first["uniform"].items()
        }:
            raise SystemExit("the runs to merge were not measured on the same data with the same PTQ recipe")
    out = {**first, "command": "`; `".join(r["command"] for r in runs), "mixed": [], "multi": []}
    nlls: dict[str, np.ndarray] = {}
    for n, r in zip(names, runs):
        out["mixed"] += r.get("mixed", [])
        multi = r.get("multi")
        out["multi"] += [multi] if isinstance(multi, dict) else (multi or [])
        path = RESULTS / f"{n}_nll.npz"
        if path.exists():
            with np.load(path) as z:
                nlls.update({k: z[k] for k in z.files})
    # the gap figures again from the per-sequence NLLs, so every row has the same (current) definitions
    bpw = {s: u["bpw"] for s, u in out["uniform"].items()}
    boot_idx = boot_indices(len(nlls["fp32"]))
    for r in out["mixed"]:
        key = f"{r['method']}_{r['budget']}"
        if key in nlls:
            r.update(gap_stats(bpw, nlls, r["budget"], nlls[key], boot_idx))
        if r.get("contender_report") and key + "_contender" in nlls:
            c = gap_stats(bpw, nlls, r["budget"], nlls[key + "_contender"], boot_idx)
            r["contender_report"].update({k: c[k] for k in ("gap_closed", "gap_ci", "vs_best_fit", "vs_best_fit_ci")})
    out["noise_floor"] = noise_floor(out, nlls)
    np.savez(RESULTS / f"{out_name}_nll.npz", **nlls)
    save(out, out_name, render)


def noise_floor(o: dict, nlls: dict[str, np.ndarray]) -> list[dict]:
    """Per mixed row: the mean per-sequence NLL change that closing 50 % of the gap needs, against the smallest
    change the one-sided 95 % paired test can detect with n sequences (1.645 · sd(paired differences) / √n),
    sd taken from the mixed allocation the search tested (its contender, else its recommendation) against the
    best uniform that fits, on the report windows."""
    rows = []
    for r in o.get("mixed", []):
        key = f"{r['method']}_{r['budget']}"
        mixed = nlls.get(key + "_contender", nlls.get(key))
        base = nlls.get(r["best_fit"])
        if mixed is None or base is None:
            continue
        below, above = o["uniform"][r["best_fit"]]["perplexity"], o["uniform"][r["above"]]["perplexity"]
        need = float(np.log(below - 0.5 * (below - above)) - np.log(below))
        d = mixed - base
        n_sel = (r.get("selection_test") or {}).get("n") or len(d)
        rows.append({"method": r["method"], "budget": r["budget"], "best_fit": r["best_fit"], "above": r["above"],
                     "needed_dnll": need, "sd_paired": float(d.std(ddof=1)), "n_selection": n_sel,
                     "detectable_dnll": float(1.645 * d.std(ddof=1) / np.sqrt(n_sel)),
                     "tested_dnll_report": float(d.mean())})
    return rows


def render(o: dict) -> str:
    lines = [f"Command: `{o['command']}`. Machine: {o['machine']}. Loaded: other jobs shared the 2 cores, so wall "
             "seconds are upper bounds; CPU seconds are fairer.", "",
             "PTQ recipe of every row (the search's own, `search_quant_config`): " + (", ".join(
                 f"{k} {o['quant'][k]}" for k in ("weight_clip", "weight_rounding", "activation_clip", "bias_correction"))
                 if o.get("quant") else "round to nearest, MSE weight clipping (the bench's own; not the search's)")
             + ".", "",
             f"FP32 on the report half ({o['fp32']['tokens']} tokens): perplexity **{o['fp32']['perplexity']:.3f}**.",
             "", "| uniform scheme | bpw | perplexity | KL (nats/token) | top-1 agreement % |", "|---|---:|---:|---:|---:|"]
    for s, m in sorted(o["uniform"].items(), key=lambda kv: kv[1]["bpw"]):
        lines.append(f"| {s} | {m['bpw']:.4f} | {m['perplexity']:.3f} | {m['kl']:.4f} | {m['agreement']:.1f} |")
    u = o["uniform"]

    def g(v, ci):
        return "n/a" if v is None else f"{v:.0f} ({ci[0]:.0f} – {ci[1]:.0f})"

    def width(r):
        w = r.get("gap_width_ci")
        if not w:
            return "–"
        d = u[r["below"]]["perplexity"] - u[r["above"]]["perplexity"]
        return f"{d:.3f} ({w[0]:+.3f} – {w[1]:+.3f}){'' if w[0] > 0 else ' n.s.'}"

    def sig(r):
        if "sig_above" not in r:
            return "–"
        if r["sig_above"] is None:
            return "none"
        return (f"{r['sig_above']}: {g(r['sig_gap_closed'], r['sig_gap_ci'])} "
                f"{'met' if r['goal_met_sig_gap'] else 'NOT met'}")

    def test(t):
        if not t:
            return "–"
        return f"{t['delta']:+.4f} ({t['ci'][0]:+.4f} – {t['ci'][1]:+.4f}){' sig.' if t['significant'] else ''}"

    lines += ["", "Mixed, one search per method and budget (ppl and gap on the report windows; the paired test that "
              "chose between mixed and uniform ran on the selection windows: Δ mean per-sequence NLL, contender − "
              "best uniform, 95 % CI, 'sig.' when the one-sided test at 95 % passed):", "",
              "| method | budget bpw | rec. bpw | kind | perplexity | best uniform that fits / next better | "
              "gap width ppl (95 % CI) | gap closed % (95 % CI) | goal ≥ 50 % | next significantly better: gap closed "
              "% (95 % CI) | ppl − ppl(best fit) (95 % CI) | selection test Δ NLL | "
              "refine: moves kept / passes | search wall s / CPU s | forward-pass equivalents (windows) |",
              "|---|---:|---:|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in o.get("mixed", []):
        rf = r["costs"].get("refine", {})
        lines.append(
            f"| {r.get('method', 'measured')} | {r['budget']} | {r['metrics']['bpw']:.3f} | {r['kind']} | "
            f"{r['perplexity']:.3f} | {r['below']} {u[r['below']]['perplexity']:.3f} / {r['above']} "
            f"{u[r['above']]['perplexity']:.3f} | {width(r)} | {g(r['gap_closed'], r['gap_ci'])} | "
            f"{'met' if r['goal_met'] else 'NOT met'} | {sig(r)} | {r['vs_best_fit']:+.3f} "
            f"({r['vs_best_fit_ci'][0]:+.3f} – {r['vs_best_fit_ci'][1]:+.3f}){' worse' if r['significantly_worse'] else ''} | "
            f"{test(r.get('selection_test'))} | {rf.get('steps', '–')} / {rf.get('passes', '–')} | "
            f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} | {r.get('window_passes_total', 0):.0f} |")
    diag = [r for r in o.get("mixed", []) if r.get("contender_report")]
    if diag:
        lines += ["", "Where uniform was kept, the mixed contender the search tested, scored on the report windows "
                  "(a diagnostic: it was not recommended):", "",
                  "| method | budget | contender perplexity | gap closed % (95 % CI) | ppl − ppl(best fit) (95 % CI) |",
                  "|---|---:|---:|---:|---:|"]
        for r in diag:
            c = r["contender_report"]
            lines.append(f"| {r['method']} | {r['budget']} | {c['perplexity']:.3f} | {g(c['gap_closed'], c['gap_ci'])} | "
                         f"{c['vs_best_fit']:+.3f} ({c['vs_best_fit_ci'][0]:+.3f} – {c['vs_best_fit_ci'][1]:+.3f}) |")
    lines += ["", "Forward-pass equivalents count one model forward over one 128-token window (sensitivity: its "
              "passes × windows, a backward or Hessian-vector product counted as one pass as the method reports "
              "it; refine: its passes × tuning windows; measuring: candidates × windows of each role).", "",
              "Schemes chosen (layers per option) and the refinement's stop:", ""]
    for r in o.get("mixed", []):
        rf = r["costs"].get("refine", {})
        lines.append(f"* {r.get('method', 'measured')}, bpw ≤ {r['budget']}: {r['chosen']}; refine: "
                     f"{rf.get('stopped', rf.get('skipped', '–'))}; window passes {r.get('window_passes', {})}")
    nf = o.get("noise_floor") or []
    if nf:
        lines += ["", "Noise floor of the paired test (per-sequence NLL, nats/token averaged per sequence): what closing "
                  "50 % of the gap needs, against the smallest mean change the one-sided 95 % test on n selection "
                  "sequences can detect (1.645 · sd / √n, sd of the paired differences mixed − best fit measured on "
                  "the report windows), and the tested mixed allocation's own change on the report windows:", "",
                  "| method | budget | best fit / next better | Δ NLL for 50 % | detectable Δ NLL (n) | tested mixed Δ NLL |",
                  "|---|---:|---|---:|---:|---:|"]
        for f in nf:
            lines.append(f"| {f['method']} | {f['budget']} | {f['best_fit']} / {f['above']} | {f['needed_dnll']:+.4f} | "
                         f"{-f['detectable_dnll']:+.4f} ({f['n_selection']}) | {f['tested_dnll_report']:+.4f} |")
    multi = o.get("multi")
    for mu in ([multi] if isinstance(multi, dict) else multi or []):
        lines += ["", (f"Multi-budget, {mu.get('method', 'measured')} (bpw ≤ {mu['bpw_limit']}, peak activation memory ≤ "
                       f"{mu['peak_limit_bits']} bits = half of float activations' {mu['peak_a32_bits']} bits; A8 alone "
                       f"would need {mu['peak_a8_bits']}): {mu['kind']}, bpw {mu['metrics'].get('bpw', float('nan')):.3f}, "
                       f"peak activation {mu['metrics'].get('peak_activation_memory', float('nan')):.0f} bits, perplexity "
                       f"{mu['perplexity']:.3f}, KL {mu['kl']:.4f}; chose {mu['chosen']}; search {mu['wall_s']:.0f} s wall / "
                       f"{mu['cpu_s']:.0f} CPU s, {mu.get('window_passes_total', 0):.0f} forward-pass equivalents; "
                       f"selection test {test(mu.get('selection_test'))}. Reason: {mu['reason']}")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
