"""zoo:tiny-llama: training, uniform integer schemes, mixed allocations at bpw budgets, sensitivity cost.

    python bench/llm.py [--model zoo:tiny-llama] [--sens-samples 32] [--hutch-ref-probes 400]

Data (all from `zoo:stdlib-text`, seed 0): calibration/sensitivity = 256 windows of the training modules;
the 384 held-out windows (modules never trained on) are split at random into a *selection* half (the
search measures its front and picks its recommendation there) and a *report* half (every figure below),
so the recommendation is never scored on the data that chose it. Options: integer weights, symmetric, per
output channel (`weight_clip="mse"`: each row's clipping range minimises its weight MSE), activations in float; bits 2, 3, 4, 5, 6, 8. q/k/v and gate/up are
tied (the default). `bpw` is the solver's average weight bits; `bpw+s` adds one fp16 scale per output row.
Gap closed at budget b = (ppl(uniform below b) − ppl(recommendation)) / (ppl(uniform below) − ppl(uniform
above)); 95 % intervals by a paired bootstrap over report sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, machine, write_result  # noqa: E402
from quant import Allocation, LayerBits, QuantConfig, apply_allocation, default_tie_groups  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from search import AllocationProblem, Constraints, measure_front, pareto_front, recommend  # noqa: E402
from sensitivity import SensitivityOptions, compute_sensitivity  # noqa: E402
from zoo import load_model  # noqa: E402
from zoo.lm_eval import evaluate_tokens  # noqa: E402
from zoo.models import cache_path  # noqa: E402
from zoo.tokens import stdlib_text_splits  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)
BUDGETS = (3.25, 3.5, 4.25, 4.5)
METHODS = ("fisher", "hessian", "measured", "orthogonality")
BOOT = 2000


def provenance(spec) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(cache_path(spec)), "pt") as f:
        return dict(f.metadata() or {})


def step_time(spec, steps: int = 10) -> dict[str, float]:
    """Wall and CPU seconds per training step of the zoo recipe (fresh model, same batch shape)."""
    import torch.nn.functional as F

    model = spec.builder().train()
    r = spec.trainer
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr)
    ids = torch.randint(0, 256, (r.batch_size, r.seq_len), generator=torch.Generator().manual_seed(0))
    for i in range(steps + 2):
        if i == 2:
            t, c = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(ids), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"wall": (time.perf_counter() - t) / steps, "cpu": (time.process_time() - c) / steps}


def bpw_with_scales(layers, alloc: Allocation) -> float:
    bits = sum(l.params * alloc[l.name].weight_bits + (l.out_channels * 16 if alloc[l.name].weight_bits < 16 else 0)
               for l in layers)
    return bits / sum(l.params for l in layers)


def data_roles(calib: int, selection: int):
    """(calibration, selection, report) of `zoo:stdlib-text`, seed 0: `calib` training-module windows; the
    held-out windows split at random into a selection half (`selection` of them used) and a report half."""
    splits = stdlib_text_splits(seed=0)
    order = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(1))
    half = len(order) // 2
    sel = splits.test.subset(torch.sort(order[:half]).values).take(selection, seed=0)
    report = splits.test.subset(torch.sort(order[half:]).values)
    return splits.calibration.take(calib, seed=0), sel, report


def ppl_ci(nll: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    boots = np.exp(nll[idx].mean(1))
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:tiny-llama")
    ap.add_argument("--sens-samples", type=int, default=32)
    ap.add_argument("--hutch-ref-probes", type=int, default=400)
    ap.add_argument("--pareto", type=int, default=6)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--selection", type=int, default=128)
    ap.add_argument("--hutch-probes", type=int, default=64, help="max_probes of the Hessian method's run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="llm")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    out: dict = {"machine": machine(), "command": " ".join(["python bench/llm.py", *sys.argv[1:]])}

    t = time.perf_counter()
    loaded = load_model(args.model)
    out["load"] = {"source": loaded.source.split(" ")[0], "seconds": time.perf_counter() - t}  # no local paths
    out["provenance"] = provenance(loaded.spec)
    out["step_time"] = {**step_time(loaded.spec), "steps": loaded.spec.trainer.steps}
    model = loaded.model

    cal, selection, report = data_roles(args.calib, args.selection)
    n_rep = len(report)
    boot_idx = np.random.default_rng(0).integers(0, n_rep, size=(BOOT, n_rep))
    config = QuantConfig(weight_clip="mse")

    fp = evaluate_tokens(model, report)
    out["fp32"] = {"perplexity": fp.perplexity, "loss": fp.loss, "tokens": fp.tokens,
                   "ci": ppl_ci(fp.per_sample_loss.numpy(), boot_idx)}

    def measure(alloc: Allocation) -> dict:
        q = apply_allocation(model, alloc, cal, config)
        r = evaluate_tokens(q, report, reference_logits=fp.logits)
        return {"perplexity": r.perplexity, "kl": r.kl, "agreement": r.agreement,
                "nll": r.per_sample_loss.numpy()}

    # --- uniform schemes ------------------------------------------------------------------------------------
    names = None
    uniform = {}
    for b in BITS:
        if names is None:
            from quant import discover_layers

            layers = discover_layers(model, cal.x[:2])
            names = [l.name for l in layers]
        alloc = Allocation.uniform(names, LayerBits(b, 32))
        m = measure(alloc)
        m["bpw"], m["bpw_scales"] = float(b), bpw_with_scales(layers, alloc)
        uniform[b] = m
        print(f"uniform W{b}: ppl {m['perplexity']:.3f} kl {m['kl']:.4f}", flush=True)
    out["uniform"] = {str(b): {k: v for k, v in m.items() if k != "nll"} for b, m in uniform.items()}

    # --- per method: sensitivity, then mixed at bpw budgets -------------------------------------------------
    sens_data = cal.take(args.sens_samples, seed=0)
    ties = default_tie_groups(layers)
    tables, out["sensitivity"], out["mixed"] = {}, {}, []
    for method in args.methods.split(","):
        params = {"max_probes": args.hutch_probes} if method == "hessian" else {}
        opts = SensitivityOptions(BITS, (32,), samples=args.sens_samples, batch_size=8, quant=config, params=params)
        t = time.perf_counter()
        table = compute_sensitivity(model, sens_data, method, opts)
        tables[method] = table
        out["sensitivity"][method] = {
            "seconds": time.perf_counter() - t, "passes": table.cost.get("passes"),
            "estimator": table.settings.get("estimator"), "probes": table.extra.get("probes"),
            "decision": (table.extra.get("gn_check") or {}).get("decision"),
        }
        print(method, out["sensitivity"][method], flush=True)

        t = time.perf_counter()
        problem = AllocationProblem(table, CostModel(layers), [], Constraints(ties=ties))
        front = pareto_front(problem, "avg_weight_bits", args.pareto, "ilp", extra_limits=list(BUDGETS))
        front = measure_front(front, model, cal, selection, config)
        search_s = time.perf_counter() - t
        for budget in BUDGETS:
            p = recommend(front, f"avg_weight_bits={budget}")
            alloc = p.allocation
            m = measure(alloc)
            below = max(b for b in BITS if b <= budget)
            above = min(b for b in BITS if b > budget)
            lo, hi, rec = uniform[below]["nll"], uniform[above]["nll"], m["nll"]

            def gap(a, b_, c):
                pa, pb, pc = np.exp(a.mean(-1)), np.exp(b_.mean(-1)), np.exp(c.mean(-1))
                return (pa - pc) / (pa - pb) * 100

            gb = gap(lo[boot_idx], hi[boot_idx], rec[boot_idx])
            worse = np.exp(rec[boot_idx].mean(1)) - np.exp(lo[boot_idx].mean(1))
            row = {"method": method, "budget": budget, "below": below, "above": above,
                   "ppl": m["perplexity"], "kl": m["kl"], "bpw": p.metrics["avg_weight_bits"],
                   "bpw_scales": bpw_with_scales(layers, alloc), "kind": p.kind,
                   "gap_closed": float(gap(lo, hi, rec)),
                   "gap_ci": [float(np.percentile(gb, 2.5)), float(np.percentile(gb, 97.5))],
                   "vs_below_ci": [float(np.percentile(worse, 2.5)), float(np.percentile(worse, 97.5))],
                   "search_seconds": search_s, "front_points": len(front.candidates()),
                   "bits": {n: alloc[n].weight_bits for n in names}}
            out["mixed"].append(row)
            print(method, budget, f"ppl {m['perplexity']:.3f} bpw {row['bpw']:.3f} {p.kind} "
                  f"gap {row['gap_closed']:.0f}%", flush=True)
        save(out, args.out)

    # --- Hutchinson against a long reference run ------------------------------------------------------------------
    if "hessian" in tables and args.hutch_ref_probes > 0:
        hs = tables["hessian"]
        t = time.perf_counter()
        ref = compute_sensitivity(model, sens_data, "hessian", SensitivityOptions(
            BITS, (32,), samples=args.sens_samples, batch_size=8, quant=config, seed=1,
            params={"estimator": "hutchinson", "min_probes": args.hutch_ref_probes,
                    "max_probes": args.hutch_ref_probes, "tol": 0.0}))
        ref_s = time.perf_counter() - t
        tr, tr_ref = hs.extra["trace"], ref.extra["trace"]
        rel = np.array([abs(tr[n] - tr_ref[n]) / abs(tr_ref[n]) for n in names])
        ref_rel_se = np.array([ref.extra["trace_stderr"][n] / abs(tr_ref[n]) for n in names])
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        out["hutchinson"] = {
            "default_probes": hs.extra["probes"], "reference_probes": ref.extra["probes"],
            "median_rel_error": float(np.median(rel)), "max_rel_error": float(rel.max()),
            "worst_layer": names[int(rel.argmax())], "reference_median_rel_stderr": float(np.median(ref_rel_se)),
            "reference_seconds": ref_s,
            "spearman": float(np.corrcoef(rank([tr[n] for n in names]), rank([tr_ref[n] for n in names]))[0, 1]),
        }
        print("hutchinson", out["hutchinson"], flush=True)
    save(out, args.out)
    print(render(out))


def save(out: dict, name: str, render_fn=None) -> None:
    """bench/results/NAME.json and NAME.md (rendered by `render_fn`, default this bench's `render`)."""
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
    write_result(f"{name}.md", (render_fn or render)(out))


def render(o: dict) -> str:
    pv, st = o["provenance"], o["step_time"]
    lines = [
        f"Command: `{o['command']}`. Machine: {o['machine']}. Loaded machine: other jobs shared the 2 cores "
        "during every run, so wall-clock seconds are upper bounds; CPU seconds are given where it matters.",
        "",
        f"Training ({pv.get('recipe')}, corpus SHA-256 {pv.get('corpus_sha256', '')[:12]}…, Python "
        f"{pv.get('python')}): {pv.get('train_seconds')} s wall"
        + (f", {pv['train_cpu_seconds']} CPU s" if "train_cpu_seconds" in pv else "")
        + f" when trained (model loaded from: {o['load']['source'].split(' ')[0]}); one training step measured "
        f"in this run: {st['wall']:.3f} s wall, {st['cpu']:.3f} CPU s, i.e. "
        f"{st['wall'] * st['steps'] / 60:.1f} min wall, {st['cpu'] * st['steps'] / 60:.1f} CPU min for the {st['steps']}-step recipe at this load. "
        f"Held-out perplexity at training time: {pv.get('heldout_perplexity')} "
        f"({pv.get('heldout_tokens')} tokens).",
        "",
        f"FP32 on the report half ({o['fp32']['tokens']} tokens): perplexity **{o['fp32']['perplexity']:.3f}** "
        f"(95 % CI {o['fp32']['ci'][0]:.3f}–{o['fp32']['ci'][1]:.3f}).",
        "",
        "| uniform | bpw | bpw+s | perplexity | KL (nats/token) | top-1 agreement % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b, m in o["uniform"].items():
        lines.append(f"| INT{b} per-channel | {m['bpw']:.2f} | {m['bpw_scales']:.3f} | {m['perplexity']:.3f} | "
                     f"{m['kl']:.4f} | {m['agreement']:.1f} |")
    lines += ["", "| method | budget bpw | rec. bpw | bpw+s | kind | perplexity | KL | uniform below / above | "
              "gap closed % (95 % CI) | ppl − ppl(below) (95 % CI) | search s |",
              "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    unif = o["uniform"]
    for r in o["mixed"]:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['bpw']:.3f} | {r['bpw_scales']:.3f} | {r['kind']} | "
            f"{r['ppl']:.3f} | {r['kl']:.4f} | INT{r['below']} {unif[str(r['below'])]['perplexity']:.3f} / "
            f"INT{r['above']} {unif[str(r['above'])]['perplexity']:.3f} | {r['gap_closed']:.0f} "
            f"({r['gap_ci'][0]:.0f} – {r['gap_ci'][1]:.0f}) | {r['vs_below_ci'][0]:+.3f} – "
            f"{r['vs_below_ci'][1]:+.3f} | {r['search_seconds']:.0f} |")
    lines += ["", "| sensitivity method | forward-pass equivalents | seconds | estimator / route |",
              "|---|---:|---:|---|"]
    for k, s in o["sensitivity"].items():
        lines.append(f"| {k} | {s['passes']} | {s['seconds']:.1f} | {s.get('decision') or s.get('estimator') or ''} |")
    h = o.get("hutchinson")
    if h is None:
        return "\n".join(lines) + "\n"
    lines += ["", (
        f"Hutchinson as the Hessian method ran above ({h['default_probes']} probes, tolerance 0.05) against a {h['reference_probes']}-probe "
        "reference (other probe seed) on the same sensitivity data: median relative error of the per-layer "
        f"traces {h['median_rel_error'] * 100:.1f} %, worst {h['max_rel_error'] * 100:.1f} % "
        f"({h['worst_layer']}); the reference's own median relative standard error "
        f"{h['reference_median_rel_stderr'] * 100:.1f} %; Spearman rank correlation of the layers' traces "
        f"{h['spearman']:.3f}; reference run {h['reference_seconds']:.0f} s.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
