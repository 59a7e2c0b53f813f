"""The search's default PTQ recipe against the earlier one, on models other than ResNet-20 (zoo digits).

    .venv/bin/python bench/search_recipe_models.py            # -> bench/results/search_recipe_models.md

One default `bitsearch.search` per model, budget and recipe on the zoo's digits-cnn and digits-mlp with their
own data (`zoo:digits`: 240 calibration images; the 360 test images split into 180 selection and 180
report images by the search itself). Recipes: `search` = the default (`quant.apply.SEARCH_PTQ_DEFAULTS`:
GPTQ rounding, output-MSE weight clipping, MSE activation clipping, bias correction); `rtn` = the earlier
one (`weight_clip="auto"`, round to nearest, min-max activations, no bias correction), given as the spec's
`quant`. Figures: the recommendation and the best uniform allocation that fits, top-1 on the 180 report
images with a 95 % interval, and the paired Δ of the best mixed candidate against the uniform baseline on
report (the search's evidence; 0 when that candidate is the baseline). 180 images are few: intervals are wide.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import run_footer, write_results

import bitsearch

RECIPES = {
    "search": {},
    "rtn": {"weight_clip": "auto", "weight_rounding": "nearest", "activation_clip": "minmax",
            "bias_correction": False},
}


def fmt(d) -> str:
    if not d:
        return "—"
    return f"{d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def top1(rep) -> str:
    t = (rep or {}).get("top1")
    if isinstance(t, dict):
        ci = t.get("ci") or [float("nan")] * 2
        return f"{t['value']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{t:.2f}" if isinstance(t, (int, float)) else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-cnn,digits-mlp")
    ap.add_argument("--budgets", default="3.0,2.5")
    ap.add_argument("--out", default="search_recipe_models.md")
    args = ap.parse_args()
    t_all = time.perf_counter()
    rows = []
    for m in args.models.split(","):
        for b in [float(x) for x in args.budgets.split(",")]:
            for rname, quant in RECIPES.items():
                t, c = time.perf_counter(), time.process_time()
                r = bitsearch.search(f"zoo:{m}", "zoo:digits", budgets=[f"avg_wbits={b}"], quant=quant)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                ev = r.recommendation.evidence or {}
                row = {
                    "model": m, "budget": b, "recipe": rname, "recommended": ev.get("recommended"),
                    "baseline": ev.get("baseline"), "rec_report": top1(ev.get("recommended_report")),
                    "delta_report": fmt(ev.get("report")),
                    "reason": ev.get("reason"), "refine": {k: r.costs.get("refine", {}).get(k)
                                                           for k in ("passes", "max_passes", "stopped", "steps")},
                    "wall_s": wall, "cpu_s": cpu, "evidence": ev,
                }
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "evidence"}, default=str), flush=True)
    lines = ["# The search's PTQ recipe on the zoo digits models", "", __doc__.split("\n\n", 2)[2].strip(), "",
             "| model | avg bits | recipe | recommended | uniform baseline | recommendation "
             "(report) | Δ best mixed − uniform baseline, report | refinement | wall s | CPU s |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        rf = r["refine"]
        lines.append(f"| {r['model']} | {r['budget']:g} | {r['recipe']} | {r['recommended']} | {r['baseline']} | "
                     f"{r['rec_report']} | {r['delta_report']} | "
                     f"{rf['steps']} kept, {rf['passes']} of {rf['max_passes']} passes: {rf['stopped']} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} |")
    lines += ["", *run_footer("search_recipe_models.py", time.perf_counter() - t_all)]
    text = "\n".join(lines) + "\n"
    write_results(args.out, text, rows)
    print(text)


if __name__ == "__main__":
    main()
