"""End to end with QAT: mixed W/A allocations against uniform W3A4 at the same size and BOPs, all fine-tuned
with exactly the recipe and steps of `bench/qat.py`, over several training seeds (HAWQ-V3's comparison, on
our data).

    .venv/bin/python bench/qat_mixed.py                                  # all arms x seeds 0,1,2 -> qat_mixed.md
    .venv/bin/python bench/qat_mixed.py --arms uniform,hessian --seeds 0,1,2,3 --jobs 2
    .venv/bin/python bench/qat_mixed.py --aggregate                      # tables from the stored runs only

Arms (`--arms`): `uniform` (W3A4 everywhere); `ptq-rec`, the PTQ recommendation of
`bench/results/search_selection.json` (row "W/A", budget "size+BOPs of W3A4": chosen by PTQ accuracy on the
2,000 selection images of test.npz, with the PTQ recipe of its time); `gptq-rec`, the search's current
recommendation at that budget, `bench/results/search_selection_wa.json` (the same procedure with the search's
GPTQ PTQ recipe, `quant.apply.SEARCH_PTQ_DEFAULTS`); `hessian` and `fisher`, allocations chosen *for QAT*
from a sensitivity table alone, with no accuracy measurement: the ILP solver (`search.solve`) over
W{2..8} x A{4,6,8} at <= the average weight bits *and* <= the BOPs of uniform W3A4, from a table computed by
`compute_sensitivity` on 256 calibration images of train.npz. `hessian` prices each layer's weights with its Hessian trace (HAWQ-V2/V3:
½·Tr(H)/n·‖ΔW‖², exact Gauss-Newton trace, the loss curvature QAT recovers from) and its input activations
with the empirical-Fisher activation term (the Hessian method covers weights only); `fisher` uses the
empirical-Fisher table for both.

Training (one process per arm and seed, one thread, at most `--jobs` at once): train.npz (256 fixed random
images calibrate), recipe of bench/qat.py (SGD momentum 0.9, lr 0.01 cosine, weight decay 1e-4, batch 128,
BN train, LSQ, 200 steps); the seed sets the data order and the initial random state, identical for every arm
of a seed. Scored on the 8,000 **report** images of test.npz (`split_roles(10000, 2000, seed=0)`), never
used to choose anything; the 2,000 selection images are scored too, and are the only data a choice among
the mixed arms may use. Per run: `bench/results/qat_mixed_runs/<arm>-s<seed>.json` (figures and the
per-image correctness, packed). Per mixed arm against uniform: each seed's paired Δ with an exact McNemar
test; over seeds, the mean Δ with (a) a t-interval over the per-seed paired Δs (seed variation only, df =
seeds − 1) and (b) a two-level bootstrap (resample seeds, and the report images shared by all seeds: seed and
image variation together). With few seeds the t-interval is very wide and the bootstrap, resampling only
those seeds, understates seed variation: the +1.0 goal counts as met only when both lower bounds clear it.

QAT init (`--init`): "calibrated" (the recipe above: round-to-nearest latent weights, LSQ steps from
MSE-clipped ranges; runs in `qat_mixed_runs/`, tables `qat_mixed.md`) or "ptq" (`QATRecipe.init="ptq"`: every
run starts from the search's PTQ realisation, `search_quant_config` — GPTQ-rounded weights as latents, their
scales as LSQ steps, MSE activation ranges, bias correction as a trainable bias; runs in
`qat_mixed_ptq_runs/`, which start from the same `allocations.json`, tables `qat_mixed_ptq.md`, with both
inits side by side and their step-0 accuracy). A choice between the inits uses the selection images only.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, RESULTS, machine, require_shared, write_result

from quant import Allocation, LayerBits, QuantConfig, discover_layers
from quant.cost import CostModel
from quant.qat import QATRecipe, QATTrainer
from search import AllocationProblem, Budget, solve
from search.selection import mean_interval, paired_test, split_roles
from sensitivity import SensitivityOptions, SensitivityTable, compute_sensitivity
from zoo import evaluate, load_model, load_npz

ARMS = ("uniform", "ptq-rec", "gptq-rec", "hessian", "fisher")
UNIFORM = LayerBits(3, 4)
WBITS = (2, 3, 4, 5, 6, 7, 8)
ABITS = (4, 6, 8)
#: The PTQ quantizer settings of bench/search_selection.py, so the tables price the same weight errors.
CONFIG = QuantConfig(weight_clip="auto")
RUNS = RESULTS / "qat_mixed_runs"
#: Where each QAT init's runs and tables go: "calibrated" is the bench's original recipe (its runs are kept
#: as they were); "ptq" starts QAT from the search's PTQ realisation (GPTQ weights, bias correction).
INITS = {"calibrated": ("qat_mixed_runs", "qat_mixed"), "ptq": ("qat_mixed_ptq_runs", "qat_mixed_ptq")}
PTQ_BUDGET = "size+BOPs of W3A4"
#: Where the search's current W/A recommendation (the GPTQ PTQ recipe) is stored: the `gptq-rec` arm.
GPTQ_SOURCE = RESULTS / "search_selection_wa.json"


def parse_label(text: str) -> LayerBits:
    m = re.fullmatch(r"W(\d+)A(\d+|fp)", text)
    if not m:
        raise SystemExit(f"cannot read the option {text!r}")
    return LayerBits(int(m.group(1)), 32 if m.group(2) == "fp" else int(m.group(2)))


def label_of(alloc: Allocation, names: list[str]) -> str:
    return "/".join(alloc.layers[n].label() for n in names)


def pack(v: np.ndarray) -> str:
    return base64.b64encode(np.packbits(v.astype(bool)).tobytes()).decode()


def unpack(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8))[:n].astype(np.float64)


class Setup:
    """Model, data roles and calibration images, identical in every process."""

    def __init__(self) -> None:
        require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
        self.loaded = load_model("zoo:cifar-resnet20", RESNET20)
        self.model = self.loaded.model.eval()
        self.train = load_npz(CIFAR_TRAIN, self.loaded.normalisation)
        test = load_npz(CIFAR_TEST, self.loaded.normalisation)
        split = split_roles(len(test), 2000, seed=0)
        self.selection, self.report = test.subset(split.selection), test.subset(split.report)
        self.calib = self.train.take(256, seed=0)
        self.layers = discover_layers(self.model, self.calib.x[:2])
        self.names = [l.name for l in self.layers]
        self.cost = CostModel(self.layers)
        u = self.cost.cost(Allocation.uniform(self.names, UNIFORM))
        self.budgets = [Budget("avg_weight_bits", u.avg_weight_bits), Budget("bops", float(u.bops))]


def sensitivity_allocation(s: Setup, method: str) -> tuple[Allocation, dict]:
    """ILP allocation at <= size and BOPs of uniform W3A4 from a sensitivity table (calibration data only)."""
    t0, c0 = time.perf_counter(), time.process_time()

    def table(m: str, wbits: tuple, abits: tuple) -> SensitivityTable:
        opts = SensitivityOptions(weight_bits=wbits, activation_bits=abits, samples=256, quant=CONFIG)
        return compute_sensitivity(s.model, s.calib, m, opts)

    if method == "fisher":
        tab = table("fisher", WBITS, ABITS)
    elif method == "hessian":
        # Weight term: Hessian trace (weights only); activation term: the Fisher table at float weights
        # (weight bits 32 cost nothing there), so value(l, W b A a) = H_l(b) + F_l(a), both loss increases.
        h = table("hessian", WBITS, (32,))
        f = table("fisher", (32,), ABITS)
        options = [LayerBits(w, a) for w in WBITS for a in ABITS]
        values = np.array(
            [
                [h.value(n, LayerBits(o.weight_bits, 32)) + f.value(n, LayerBits(32, o.activation_bits)) for o in options]
                for n in h.layer_names
            ]
        )
        tab = SensitivityTable(
            method="hessian+fisher-activations",
            layers=h.layers,
            options=options,
            values=values,
            covers_activations=True,
            settings={"weights": h.settings, "activations": f.settings},
            data=h.data,
            cost={"hessian": h.cost, "fisher": f.cost},
        )
    else:
        raise SystemExit(f"no sensitivity allocation for {method!r}")
    sol = solve(AllocationProblem(tab, s.cost, s.budgets), "ilp")
    info = {
        "method": tab.method,
        "predicted_loss_increase": float(sol.objective),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }
    return sol.allocation, info


def allocation_of(s: Setup, arm: str, source: Path) -> tuple[Allocation, dict]:
    if arm == "uniform":
        return Allocation.uniform(s.names, UNIFORM), {"method": "uniform W3A4"}
    if arm in ("ptq-rec", "gptq-rec"):
        source = GPTQ_SOURCE if arm == "gptq-rec" else source
        rows = json.loads(source.read_text())
        row = next(r for r in rows if r["setting"] == "W/A" and r["budget"] == PTQ_BUDGET)
        alloc = Allocation({n: parse_label(b) for n, b in zip(s.names, row["bits"].split("/"))})
        return alloc, {"method": f"PTQ recommendation ({row['rec_kind']}) of {source.name}"}
    return sensitivity_allocation(s, arm)


def allocations(s: Setup, arms: list[str], source: Path) -> dict[str, dict]:
    """Each arm's allocation, computed once and stored (RUNS/allocations.json) so every seed trains the same."""
    path = RUNS / "allocations.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    ucost = s.cost.cost(Allocation.uniform(s.names, UNIFORM))
    for arm in arms:
        if arm in stored:
            continue
        alloc, info = allocation_of(s, arm, source)
        c = s.cost.cost(alloc)
        if c.avg_weight_bits > ucost.avg_weight_bits * (1 + 1e-9) or c.bops > ucost.bops * (1 + 1e-9):
            raise SystemExit(f"{arm}: allocation over the budget of uniform W3A4")
        stored[arm] = {
            "bits": label_of(alloc, s.names),
            "avg_weight_bits": c.avg_weight_bits,
            "gbops": c.bops / 1e9,
            **info,
        }
        print(f"{arm}: {stored[arm]}", flush=True)
        RUNS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=1) + "\n")
    return stored


def use_init(init: str) -> None:
    """Point RUNS at `init`'s folder; a new folder starts from the original runs' allocations, so that both
    recipes train exactly the same bits (search_selection.json may have changed since)."""
    global RUNS
    RUNS = RESULTS / INITS[init][0]
    first = RESULTS / INITS["calibrated"][0] / "allocations.json"
    if init != "calibrated" and not (RUNS / "allocations.json").exists() and first.exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        (RUNS / "allocations.json").write_text(first.read_text())


def run_one(arm: str, seed: int, steps: int, init: str) -> None:
    """Fine-tune one arm with one seed; store its figures and per-image correctness."""
    torch.set_num_threads(1)
    s = Setup()
    stored = json.loads((RUNS / "allocations.json").read_text())
    alloc = Allocation({n: parse_label(b) for n, b in zip(s.names, stored[arm]["bits"].split("/"))})
    recipe = QATRecipe(steps=steps, batch_size=128, lr=0.01, weight_decay=1e-4, bn="train", seed=seed, init=init)
    torch.manual_seed(seed)
    c0 = time.process_time()
    trainer = QATTrainer(s.model, alloc, s.train, recipe, calibration=s.calib)
    build_cpu = time.process_time() - c0
    # The starting point (step 0, the fake-quant model before any step): with init "ptq", the PTQ model.
    start = {role: evaluate(trainer.model, data).top1 for role, data in (("report", s.report), ("selection", s.selection))}
    c1 = time.process_time()
    res = trainer.run()
    cpu = build_cpu + time.process_time() - c1
    out = {"arm": arm, "seed": seed, "init": init, "bits": stored[arm]["bits"], "steps": res.steps,
           "train_seconds": res.train_seconds, "cpu_seconds": cpu, "start_top1": start}  # fmt: skip
    for role, data in (("report", s.report), ("selection", s.selection)):
        r = evaluate(res.model, data)
        correct = r.per_sample["correct"].numpy()
        out[role] = {"top1": float(correct.mean() * 100), "n": len(correct), "correct": pack(correct)}
    (RUNS / f"{arm}-s{seed}.json").write_text(json.dumps(out) + "\n")
    print(f"{arm} seed {seed}: report {out['report']['top1']:.2f} %, selection {out['selection']['top1']:.2f} % "
          f"({res.train_seconds:.0f} s training, {cpu:.0f} CPU s)", flush=True)  # fmt: skip


def train_missing(arms: list[str], seeds: list[int], steps: int, jobs: int, init: str) -> None:
    """One subprocess per missing (arm, seed), ordered seed by seed so that a cut leaves balanced arms."""
    todo = [(a, sd) for sd in seeds for a in arms if not (RUNS / f"{a}-s{sd}.json").exists()]
    running: list[subprocess.Popen] = []
    script = str(Path(__file__).resolve())
    while todo or running:
        while todo and len(running) < jobs:
            a, sd = todo.pop(0)
            cmd = [sys.executable, script, "--run-one", f"{a}:{sd}", "--steps", str(steps), "--init", init]
            running.append(subprocess.Popen(cmd))
        time.sleep(5)
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            if p.returncode:
                raise SystemExit(f"{' '.join(p.args)} failed ({p.returncode})")


def t_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    if len(d) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def two_level_bootstrap(diff: np.ndarray, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """`diff`: (seeds, images) paired differences. Resample seeds and, shared by all seeds, images.
    Returns the 95 % percentile interval and the share of resampled means at or above the +1.0 goal."""
    rng = np.random.default_rng(seed)
    s, n = diff.shape
    means = np.empty(resamples)
    for i in range(resamples):
        rows = diff[rng.integers(0, s, s)]
        means[i] = rows[:, rng.integers(0, n, n)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi), float((means >= 1.0).mean())


def against_uniform(corr: dict, arm: str, seeds: list[int]) -> dict:
    """`arm` against uniform on the report images of `seeds`: per-seed paired Δ with McNemar's p, the mean Δ
    over seeds with a t-interval and a two-level bootstrap, and whether the +1.0 goal is met (both lower
    bounds at or above it)."""
    per, diffs = [], []
    for sd in seeds:
        d = paired_test(corr[(arm, sd)]["report"], corr[("uniform", sd)]["report"], alternative="two-sided")
        per.append({"seed": sd, "delta": d.delta, "low": d.low, "high": d.high, "p_mcnemar": d.p_value})
        diffs.append(corr[(arm, sd)]["report"] - corr[("uniform", sd)]["report"])
    diff = np.stack(diffs) * 100
    dseed = diff.mean(axis=1)
    tlo, thi = t_interval(dseed)
    blo, bhi, share = two_level_bootstrap(diff)
    mean = float(dseed.mean())
    lo = min(tlo, blo) if len(seeds) > 1 else blo
    goal = "met" if lo >= 1.0 else ("not shown (mean ≥ 1.0, interval below)" if mean >= 1.0 else "**not met**")
    return {"per_seed": per, "mean_delta": mean, "t_interval": [tlo, thi], "bootstrap_interval": [blo, bhi],
            "bootstrap_share_at_goal": share, "seeds": seeds, "goal": goal}  # fmt: skip


def aggregate(arms: list[str], seeds: list[int], cmd: str, init: str = "calibrated") -> None:
    runs = {}
    for p in sorted(RUNS.glob("*-s*.json")):
        r = json.loads(p.read_text())
        if r["arm"] in arms and r["seed"] in seeds:
            runs[(r["arm"], r["seed"])] = r
    allocs = json.loads((RUNS / "allocations.json").read_text())
    done = [sd for sd in seeds if ("uniform", sd) in runs]
    corr = {k: {role: unpack(v[role]["correct"], v[role]["n"]) for role in ("report", "selection")}
            for k, v in runs.items()}  # fmt: skip
    summary: dict = {"arms": {}, "comparisons": {}, "allocations": allocs, "command": cmd}
    lines = [
        "# QAT end to end: mixed W/A allocations against uniform W3A4 at the same size and BOPs, over seeds",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "## Allocations",
        "",
        "| arm | chosen by | avg weight bits | GBOPs | tables + ILP, wall / CPU s | bits per layer |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for a in list(arms) + [a for a in allocs if a not in arms]:
        if a in allocs:
            al = allocs[a]
            a = a if a in arms else f"{a} (not trained)"
            secs = f"{al['wall_s']:.0f} / {al['cpu_s']:.0f}" if "wall_s" in al else "–"
            lines.append(f"| {a} | {al['method']} | {al['avg_weight_bits']:.3f} | {al['gbops']:.4f} | {secs} | "
                         f"`{al['bits']}` |")  # fmt: skip
    lines += ["", "## Top-1 on the 8,000 report images after 200 QAT steps, per seed", "",
              "| arm | " + " | ".join(f"seed {sd}" for sd in seeds) + " | mean | selection mean (2,000) |",
              "| --- |" + " ---: |" * (len(seeds) + 2)]  # fmt: skip
    for a in arms:
        got = [sd for sd in seeds if (a, sd) in runs]
        if not got:
            continue
        cells = []
        for sd in seeds:
            if (a, sd) in runs:
                v = corr[(a, sd)]["report"]
                lo, hi = mean_interval(v, 0.95, 100.0)
                cells.append(f"{v.mean() * 100:.2f} [{lo:.2f}, {hi:.2f}]")
            else:
                cells.append("not run (time)")
        rep = [runs[(a, sd)]["report"]["top1"] for sd in got]
        sel = [runs[(a, sd)]["selection"]["top1"] for sd in got]
        summary["arms"][a] = {
            "report_top1": {sd: runs[(a, sd)]["report"]["top1"] for sd in got},
            "selection_top1": {sd: runs[(a, sd)]["selection"]["top1"] for sd in got},
            "train_seconds": {sd: runs[(a, sd)]["train_seconds"] for sd in got},
            "cpu_seconds": {sd: runs[(a, sd)]["cpu_seconds"] for sd in got},
        }
        spread = f" (sd {np.std(rep, ddof=1):.2f})" if len(rep) > 1 else ""
        lines.append(f"| {a} | " + " | ".join(cells) + f" | **{np.mean(rep):.2f}**{spread} | {np.mean(sel):.2f} |")
    lines += ["", "## Paired differences against uniform W3A4 (report images; the same seeds)", "",
              "| arm | per seed: Δ points (McNemar p) | seeds | mean Δ | t-interval over seeds, 95 % | "
              "two-level bootstrap, 95 % | goal Δ ≥ +1.0 |",
              "| --- | --- | ---: | ---: | --- | --- | --- |"]  # fmt: skip
    for a in arms:
        if a == "uniform":
            continue
        both = [sd for sd in done if (a, sd) in runs]
        if not both:
            continue
        c = against_uniform(corr, a, both)
        per, mean, (tlo, thi), (blo, bhi) = c["per_seed"], c["mean_delta"], c["t_interval"], c["bootstrap_interval"]
        share, goal = c["bootstrap_share_at_goal"], c["goal"]
        summary["comparisons"][a] = c
        cells = ", ".join(f"s{x['seed']}: {x['delta']:+.2f} (p={x['p_mcnemar']:.2g})" for x in per)
        tcell = f"[{tlo:+.2f}, {thi:+.2f}]" if len(both) > 1 else "n/a (one seed)"
        lines.append(f"| {a} | {cells} | {len(both)} | **{mean:+.2f}** | {tcell} | "
                     f"[{blo:+.2f}, {bhi:+.2f}] | {goal}; {share * 100:.1f} % of resamples ≥ +1.0 |")  # fmt: skip
    mixed = [a for a in summary["comparisons"]]
    if len(mixed) > 1:
        # A choice among the mixed arms, on selection images only (mean over the seeds every arm has).
        common = [sd for sd in done if all((a, sd) in runs for a in mixed)]
        sel = {a: float(np.mean([runs[(a, sd)]["selection"]["top1"] for sd in common])) for a in mixed}
        pick = max(sel, key=sel.get)
        summary["selection_choice"] = {"selection_means": sel, "chosen": pick, "seeds": common}
        lines += ["", f"Choice among the mixed arms on the 2,000 **selection** images (mean top-1 over seeds "
                  f"{common}: " + ", ".join(f"{a} {v:.2f}" for a, v in sel.items()) + f"): **{pick}**; its report "
                  f"figures are the row above, not chosen on the report images."]  # fmt: skip
    if init != "calibrated":
        lines += recipes_side_by_side(arms, seeds, init, corr, runs, summary)
    secs = [r["train_seconds"] for r in runs.values()]
    cpus = [r["cpu_seconds"] for r in runs.values()]
    how = "--jobs 2" if init == "calibrated" else f"--init {init} --jobs 1"
    at_once = "at most two runs at once" if init == "calibrated" else "one run at a time"
    lines += ["", f"Training time per run: {np.mean(secs):.0f} s wall (loaded machine; range {min(secs):.0f}–"
              f"{max(secs):.0f}), {np.mean(cpus):.0f} CPU s, one thread, 200 steps.", "",
              f"Runs: `.venv/bin/python bench/qat_mixed.py --arms {','.join(arms)} --seeds "
              f"{','.join(map(str, seeds))} {how}`; tables: `.venv/bin/{cmd}`. Machine: {machine()}; shared with "
              f"other jobs, {at_once}, so wall-clock figures are on a loaded machine."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    name = INITS[init][1]
    write_result(f"{name}.md", text)
    write_result(f"{name}.json", json.dumps(summary, indent=1, default=str) + "\n")


def starting_point(arm: str, init: str) -> dict[str, float]:
    """Top-1 of the fake-quant model at step 0 (before any QAT step) on report and selection images; it does
    not depend on the seed (the calibration images are fixed). Stored in the init's runs folder."""
    path = RESULTS / INITS[init][0] / "starts.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if arm not in stored:
        torch.set_num_threads(1)
        s = Setup()
        allocs = json.loads((RESULTS / INITS[init][0] / "allocations.json").read_text())
        alloc = Allocation({n: parse_label(b) for n, b in zip(s.names, allocs[arm]["bits"].split("/"))})
        trainer = QATTrainer(s.model, alloc, s.train, QATRecipe(steps=200, init=init), calibration=s.calib)
        stored[arm] = {role: evaluate(trainer.model, d).top1 for role, d in (("report", s.report), ("selection", s.selection))}
        path.write_text(json.dumps(stored, indent=1) + "\n")
    return stored[arm]


def recipes_side_by_side(arms: list[str], seeds: list[int], init: str, corr: dict, runs: dict, summary: dict) -> list[str]:
    """This init's runs beside the original recipe's ("calibrated", its own folder), the same arms and seeds.
    A choice between the recipes may use the selection images only; the report columns are not for choosing."""
    other = {}
    for p in sorted((RESULTS / INITS["calibrated"][0]).glob("*-s*.json")):
        r = json.loads(p.read_text())
        if r["arm"] in arms and r["seed"] in seeds:
            other[(r["arm"], r["seed"])] = r
    common = [sd for sd in seeds if all((a, sd) in runs and (a, sd) in other for a in arms)]
    if not common:
        return []
    lines = ["", f"## Both QAT inits side by side (seeds {common}; step 0 = the model before any QAT step)", "",
             f"The calibrated rows are the runs in `{INITS['calibrated'][0]}/` (`--init calibrated`, the same "
             f"allocations, seeds and steps); the {init} rows those above.", "",
             "| arm | init | step 0: selection / report | after 200 steps: selection mean | report mean | "
             "report Δ vs uniform (same init) | t-interval over seeds | two-level bootstrap | goal Δ ≥ +1.0 |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]  # fmt: skip
    other_corr = {k: {role: unpack(v[role]["correct"], v[role]["n"]) for role in ("report", "selection")}
                  for k, v in other.items()}  # fmt: skip
    side: dict = {}
    for a in arms:
        for name, rr, cc in (("calibrated", other, other_corr), (init, runs, corr)):
            st = starting_point(a, name)
            sel = float(np.mean([rr[(a, sd)]["selection"]["top1"] for sd in common]))
            rep = float(np.mean([rr[(a, sd)]["report"]["top1"] for sd in common]))
            entry = {"start": st, "selection_mean": sel, "report_mean": rep}
            cells = "– | – | – | –"
            if a != "uniform":
                c = against_uniform(cc, a, common)
                entry["against_uniform"] = c
                (tlo, thi), (blo, bhi) = c["t_interval"], c["bootstrap_interval"]
                cells = (f"{c['mean_delta']:+.2f} | [{tlo:+.2f}, {thi:+.2f}] | [{blo:+.2f}, {bhi:+.2f}] | "
                         f"{c['goal']}")  # fmt: skip
            side.setdefault(a, {})[name] = entry
            lines.append(f"| {a} | {name} | {st['selection']:.2f} / {st['report']:.2f} | {sel:.2f} | {rep:.2f} | "
                         f"{cells} |")  # fmt: skip
    better = {a: side[a][init]["selection_mean"] > side[a]["calibrated"]["selection_mean"] for a in arms}
    lines += ["", f"Choice of init on the 2,000 **selection** images (mean over seeds {common}): "
              + ", ".join(f"{a}: {init} {side[a][init]['selection_mean']:.2f} vs calibrated "
                          f"{side[a]['calibrated']['selection_mean']:.2f}" for a in arms)
              + (f"; **{init}** is better for every arm." if all(better.values())
                 else f"; {init} is not better for every arm, so \"calibrated\" stays the default.")]  # fmt: skip
    summary["inits_side_by_side"] = {"seeds": common, "arms": side, f"{init}_better_on_selection": better}
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="source", default=str(RESULTS / "search_selection.json"))
    ap.add_argument("--arms", default="uniform,ptq-rec,hessian", help=f"comma-separated, of {ARMS}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    ap.add_argument("--aggregate", action="store_true", help="only tabulate the stored runs")
    ap.add_argument("--init", choices=sorted(INITS), default="calibrated",
                    help='QAT init: "calibrated" (the original recipe) or "ptq" (from the search\'s PTQ model); '
                         "each has its own runs folder and tables")  # fmt: skip
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_init(args.init)
    if args.run_one:
        arm, seed = args.run_one.split(":")
        run_one(arm, int(seed), args.steps, args.init)
        return
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown arms {unknown}; choose from {ARMS}")
    if "uniform" not in arms:
        arms.insert(0, "uniform")
    seeds = [int(x) for x in args.seeds.split(",")]
    cmd = "python bench/qat_mixed.py" + "".join(f" {a}" for a in sys.argv[1:])
    torch.set_num_threads(1)
    if not args.aggregate:
        allocations(Setup(), arms, Path(args.source))
        train_missing(arms, seeds, args.steps, args.jobs, args.init)
    aggregate(arms, seeds, cmd, args.init)


if __name__ == "__main__":
    main()
