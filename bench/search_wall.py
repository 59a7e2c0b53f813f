"""Wall and CPU seconds of one whole default search on ResNet-20 (CIFAR-10 JPEG) at 3 average weight bits.

    .venv/bin/python bench/search_wall.py                  # -> bench/results/search_wall.md
    .venv/bin/python bench/search_wall.py --out wall_idle.md

One `bitsearch.search(...)` call with the default settings (sensitivity method, solver, Pareto points, PTQ
recipe, refinement, paired selection, and `report_points="evidence"`: only the points shown with evidence are
measured on the report data), budget `avg_wbits=3`, options W{2,3,4,5,6,8}. Data roles as in
bench/search_selection.py: calibration = a seeded random 256 of train.npz (sensitivity, quantizer statistics,
the refinement's KL); selection = a random 2,000 of test.npz (`split_roles(seed 0)`); report = the other
8,000. Stages are timed from the search's own progress messages (wall and this process's CPU seconds, all
threads); the refinement's and the measurements' own counters come from `result.costs`. Nothing else runs
in this process; the machine's load is printed so an idle run can be told from a loaded one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result

import bitsearch
from search.selection import split_roles
from zoo import load_model, load_npz

GOAL_WALL_S = 90.0


class StageClock:
    """Wall and CPU seconds per stage, a stage being the class of the search's progress messages."""

    def __init__(self):
        self.stage, self.t, self.c = "start", time.perf_counter(), time.process_time()
        self.spent: dict[str, dict[str, float]] = {}

    @staticmethod
    def classify(msg: str) -> str:
        if msg.startswith("sensitivity"):
            return "sensitivity"
        if msg.startswith("solving"):
            return "solve (front)"
        if msg.startswith("measuring: refine") or msg.startswith("measuring: refined"):
            return "refinement"
        if msg.startswith("measuring"):
            return "measure candidates (selection + report)"
        if msg.startswith("loading"):
            return "load"
        return msg.split(":")[0]

    def switch(self, stage: str) -> None:
        if stage == self.stage:
            return
        t, c = time.perf_counter(), time.process_time()
        s = self.spent.setdefault(self.stage, {"wall": 0.0, "cpu": 0.0})
        s["wall"] += t - self.t
        s["cpu"] += c - self.c
        self.stage, self.t, self.c = stage, t, c

    def progress(self, frac: float, msg: str) -> None:
        self.switch(self.classify(msg))


def _num(v) -> str:
    if isinstance(v, dict):
        v = v.get("value")
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="search_wall.md", help="result file name under bench/results")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the goal is on 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    load0 = os.getloadavg()
    t_all, c_all = time.perf_counter(), time.process_time()
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    split = split_roles(len(test), 2000, seed=0)
    roles = {"calibration": calib, "selection": test.subset(split.selection), "report": test.subset(split.report)}
    data_wall, data_cpu = time.perf_counter() - t_all, time.process_time() - c_all
    clock = StageClock()
    t0, c0 = time.perf_counter(), time.process_time()
    r = bitsearch.search(loaded.model, budgets=["avg_wbits=3"], roles=roles, progress=clock.progress)
    clock.switch("end")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()
    rec = r.recommendation
    ev = rec.evidence or {}
    spec = r.spec
    lines = [
        "# One whole default search, ResNet-20 at 3 average weight bits: wall and CPU seconds",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Settings (defaults): sensitivity `{spec.sensitivity.method}` ({spec.sensitivity.samples} samples), "
        f"solver `{spec.solver.name}`, {spec.pareto_points} Pareto points, refine `{spec.refine}`, "
        f"report points `{spec.report_points}`, "
        f"confidence {spec.confidence}; PTQ `{json.dumps({k: v for k, v in r.table.settings.get('quant', {}).items() if k in ('weight_clip', 'weight_rounding', 'activation_clip', 'bias_correction')})}`.",
        "",
        f"**Search: {wall:.1f} s wall, {cpu:.1f} s CPU** (goal ≤ {GOAL_WALL_S:g} s wall on 2 cores: "
        f"{'met' if wall <= GOAL_WALL_S else '**not met**'} on this run). Loading the data (not part of the "
        f"search): {data_wall:.1f} s wall, {data_cpu:.1f} s CPU.",
        "",
        "| stage | wall s | CPU s |",
        "| --- | ---: | ---: |",
    ]
    for stage, s in clock.spent.items():
        if stage != "start" or s["wall"] > 0.05:
            lines.append(f"| {stage} | {s['wall']:.1f} | {s['cpu']:.1f} |")
    for role in ("selection", "report"):  # the search's own clocks of the two measurements (stage above)
        c = r.costs.get(f"measure_{role}")
        if c:
            lines.append(f"| — of which on {role}: {c.get('points')} points, {c.get('passes')} passes × "
                         f"{c['samples']:,} images | {c['seconds']:.1f} | {c['cpu_seconds']:.1f} |")
    lines += ["", "Notes of the result on measurement: " + ("; ".join(
        n for n in r.notes if n.startswith("report figures")) or "none") + ".", ""]
    lines += ["Counters from `result.costs`:", ""]
    for k, v in r.costs.items():
        lines.append(f"- `{k}`: `{json.dumps(v, default=str)}`")
    lines += [
        "",
        f"Recommendation: {ev.get('recommended', rec.point.kind)}, "
        f"{rec.point.metrics.get('avg_weight_bits', float('nan')):.3f} avg bits; top-1 on the 8,000 report "
        f"images {_num((rec.report or {}).get('top1'))} % (the search's own report figure); why: "
        f"{ev.get('reason', '')}.",
        "",
        f"Command: `.venv/bin/python bench/search_wall.py{''.join(' ' + a for a in sys.argv[1:])}`.",
        "",
        f"Machine: {machine()}; load average before {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, after "
        f"{load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} "
        f"({'loaded: other jobs ran' if max(load0[0], load1[0]) > 2.5 else 'about idle'}).",
    ]
    text = "\n".join(lines) + "\n"
    path = write_result(args.out, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
