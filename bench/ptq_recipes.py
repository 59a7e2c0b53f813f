"""How an allocation is realised: PTQ recipes compared on uniform allocations, on more than one model.

    .venv/bin/python bench/ptq_recipes.py                   # -> bench/results/ptq_recipes.md

A search can only recommend what its PTQ realises, so the realisation recipe is the first lever on every
budget. Recipes (all per-channel symmetric weights, per-tensor activations):

- `rtn`: output-MSE-searched weight clipping (`weight_clip="auto"`), round to nearest, min-max activations
  (the recipe of the first selection benchmark);
- `rtn+amse`: the same with MSE-searched activation clipping (`activation_clip="mse"`);
- `gptq`: `weight_clip="auto"` and GPTQ error-compensated rounding (`weight_rounding="gptq"`);
- `gptq+amse`: GPTQ and MSE activation clipping;
- `gptq+amse+bc`: the same plus bias correction.

Models and data roles: ResNet-20 (shared checkpoint; calibration = a seeded 256 of train.npz; figures on the
2,000 *selection* images of test.npz, `split_roles(seed 0)`, the same images the search selects on; the
8,000 report images are not touched, since choosing a recipe is a selection) and the zoo's digits-cnn and
digits-mlp (calibration = their 240 calibration images, figures on their 360 test images). Δ: paired
against `rtn` on the same images, points, 95 % bootstrap interval.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, require_shared, run_footer, write_results

from quant import Allocation, LayerBits, QuantConfig
from quant.apply import collect_statistics, set_allocation, wrap_model
from quant.layers import discover_layers
from search.selection import mean_interval, paired_test, split_roles
from zoo import evaluate, load_digits_splits, load_model, load_npz

RECIPES = {
    "rtn": dict(weight_clip="auto"),
    "rtn+amse": dict(weight_clip="auto", activation_clip="mse"),
    "gptq": dict(weight_clip="auto", weight_rounding="gptq"),
    "gptq+amse": dict(weight_clip="auto", weight_rounding="gptq", activation_clip="mse"),
    "gptq+amse+bc": dict(weight_clip="auto", weight_rounding="gptq", activation_clip="mse", bias_correction=True),
}
ALLOCS = ("2/32", "3/32", "4/32", "4/4", "3/4")


def run_model(name, model, calib, data, recipes, allocs):
    names = [l.name for l in discover_layers(model, calib.x[:2])]
    ref = evaluate(model, data)
    out = {"fp32": ref.top1, "n": len(data), "rows": {}}
    per = {}
    for rname in recipes:
        cfg = QuantConfig(**RECIPES[rname])
        q = copy.deepcopy(model).eval()
        t = time.process_time()
        collect_statistics(q, wrap_model(q, cfg), calib, cfg)
        for a in allocs:
            set_allocation(q, Allocation.uniform(names, LayerBits.parse(a)))
            r = evaluate(q, data, reference_logits=ref.logits)
            per[(rname, a)] = r.per_sample["correct"].numpy()
        cpu = time.process_time() - t
        out["rows"][rname] = {"cpu_s": cpu}
        print(f"{name} {rname}: " + ", ".join(f"{a} {per[(rname, a)].mean() * 100:.2f}" for a in allocs)
              + f" ({cpu:.0f} CPU s)", flush=True)
    for rname in recipes:
        for a in allocs:
            v = per[(rname, a)]
            lo, hi = mean_interval(v, 0.95, 100.0)
            d = paired_test(v, per[("rtn", a)]).to_dict() if rname != "rtn" else None
            out["rows"][rname][a] = {"top1": float(v.mean() * 100), "ci": [lo, hi], "delta_vs_rtn": d}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,digits-cnn,digits-mlp")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default="ptq_recipes.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    recipes = [r for r in args.recipes.split(",") if r]
    if "rtn" not in recipes:
        recipes.insert(0, "rtn")
    results = {}
    for m in args.models.split(","):
        torch.manual_seed(0)
        if m == "resnet20":
            require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
            loaded = load_model("zoo:cifar-resnet20", RESNET20)
            calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
            test = load_npz(CIFAR_TEST, loaded.normalisation)
            data = test.subset(split_roles(len(test), 2000, seed=0).selection)
            label = "ResNet-20 (2,000 selection images)"
        else:
            loaded = load_model(f"zoo:{m}")
            splits = load_digits_splits()
            calib, data = splits.calibration, splits.test
            label = f"{m} (360 test images)"
        results[label] = run_model(m, loaded.model.eval(), calib, data, recipes, ALLOCS)
    lines = ["# PTQ recipes on uniform allocations", "", __doc__.split("\n\n", 2)[2].strip(), ""]
    for label, res in results.items():
        lines += [f"## {label}: FP32 {res['fp32']:.2f} %", "",
                  "| recipe | " + " | ".join(f"W{a.replace('/32', 'Afp').replace('/', 'A')}" for a in ALLOCS)
                  + " | CPU s (stats + 5 allocations) |",
                  "| --- |" + " ---: |" * (len(ALLOCS) + 1)]
        for rname, row in res["rows"].items():
            cells = []
            for a in ALLOCS:
                c = row[a]
                s = f"{c['top1']:.2f}"
                if c["delta_vs_rtn"]:
                    d = c["delta_vs_rtn"]
                    s += f" (Δ {d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}])"
                cells.append(s)
            lines.append(f"| {rname} | " + " | ".join(cells) + f" | {row['cpu_s']:.0f} |")
        lines.append("")
    lines += run_footer("ptq_recipes.py", time.perf_counter() - t0)
    text = "\n".join(lines) + "\n"
    write_results(args.out, text, results)
    print(text)


if __name__ == "__main__":
    main()
