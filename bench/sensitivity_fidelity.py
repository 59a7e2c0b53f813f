"""How well does each sensitivity method rank the shared ResNet-20's layers? Spearman against measurement.

Ground truth, independent of every method (and of `measured`'s prefix cache): per layer and weight bit-width
b in {2, 3, 4}, that layer alone is quantized (weights only, per-channel symmetric min-max: the default
`QuantConfig`), every other layer in float, and the mean cross-entropy on 2000 held-out test images (a seeded
random sample of test.npz: the file is sorted by class, so its first 2000 images would be two classes only) is
compared with the float model's; one plain forward pass over the 2000 images per cell.

Each method registered in `sensitivity.METHODS` then runs through `compute_sensitivity` on 256 training
images (a seeded sample of train.npz, with labels; the same options: weight bits 2, 3, 4, float activations),
once per seed (default 0, 1, 2: three different samples; ρ varies a lot from one 256-image sample to the
next),
and its predicted per-layer loss increase is rank-correlated (Spearman ρ) with the ground truth per bit-width,
and over all 60 cells pooled (which also asks whether the method knows that 2 bits cost more than 4).
Variants of `orthogonality` (OMPQ's own LP mapping, next-layer-input features) and data-free `measured`
are reported too.

Seconds are wall clock on a shared machine whose load varies; each method's time is also given in
"fwd units": its seconds over the seconds of one forward pass over the 256 images, measured right before it.

    .venv/bin/python bench/sensitivity_fidelity.py            # ~30-40 min on a busy 2-core CPU
    .venv/bin/python bench/sensitivity_fidelity.py --gt-cache gt.json       # reuse the ground truth

Writes bench/results/sensitivity_fidelity.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spinning on a busy box

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result  # noqa: E402

from quant.allocation import LayerBits  # noqa: E402
from quant.apply import QuantConfig, wrap_model  # noqa: E402
from quant.layers import discover_layers  # noqa: E402
from sensitivity import METHODS, SensitivityOptions, compute_sensitivity  # noqa: E402
from zoo import IMAGENET_NORMALISATION, load_model, load_npz  # noqa: E402

BITS = (2, 3, 4)
TEST_SEED = 0  # the ground truth's sample of test.npz (sorted by class: never take its first items)


@torch.no_grad()
def per_sample_ce(model, x, y, bs=250) -> torch.Tensor:
    return torch.cat(
        [F.cross_entropy(model(x[i : i + bs]), y[i : i + bs], reduction="none") for i in range(0, len(x), bs)]
    ).double()


def ground_truth(model, names, x, y) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(layers × bits) increase of the mean test cross-entropy, its standard error, float loss, seconds."""
    t0 = time.perf_counter()
    qmodel = copy.deepcopy(model).eval()
    wrappers = wrap_model(qmodel, QuantConfig())
    base = per_sample_ce(qmodel, x, y)
    gt = np.zeros((len(names), len(BITS)))
    se = np.zeros_like(gt)
    for i, name in enumerate(names):
        q = wrappers[name]
        for j, b in enumerate(BITS):
            q.set_bits(LayerBits(b))
            d = per_sample_ce(qmodel, x, y) - base
            gt[i, j], se[i, j] = float(d.mean()), float(d.std() / len(d) ** 0.5)
        q.bits = None
        print(f"  ground truth {name}: " + " ".join(f"W{b} {gt[i, j]:+.4f}" for j, b in enumerate(BITS)),
              flush=True)
    return gt, se, float(base.mean()), time.perf_counter() - t0


def fwd_unit(model, x, repeats=3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def rho(a, b) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="training images for the methods")
    ap.add_argument("--test", type=int, default=2000, help="held-out images for the ground truth")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training samples drawn")
    ap.add_argument("--gt-cache", type=Path, help="JSON file to store / reuse the ground truth")
    ap.add_argument("--methods", nargs="*", help="only these registered methods (default: all)")
    ap.add_argument("--no-variants", action="store_true", help="skip the orthogonality / data-free variants")
    args = ap.parse_args()
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    torch.manual_seed(0)

    model = load_model("zoo:cifar-resnet20", weights=RESNET20).model.eval()
    full_train = load_npz(CIFAR_TRAIN, IMAGENET_NORMALISATION)
    test = load_npz(CIFAR_TEST, IMAGENET_NORMALISATION).take(args.test, seed=TEST_SEED)
    names = [info.name for info in discover_layers(model, test.x[:2])]
    print(f"{len(names)} layers; {args.samples} training images for the methods, {len(test)} test images for "
          f"the ground truth", flush=True)

    if args.gt_cache and args.gt_cache.exists():
        cached = json.loads(args.gt_cache.read_text())
        gt, gt_se = np.array(cached["gt"]), np.array(cached["se"])
        base, gt_seconds = cached["base"], cached["seconds"]
        print(f"ground truth from {args.gt_cache}")
    else:
        gt, gt_se, base, gt_seconds = ground_truth(model, names, test.x, test.y)
        if args.gt_cache:
            args.gt_cache.write_text(
                json.dumps({"gt": gt.tolist(), "se": gt_se.tolist(), "base": base, "seconds": gt_seconds})
            )

    runs: list[tuple[str, str, dict, bool]] = []  # (label, method, params, with data)
    for method in sorted(METHODS):
        if args.methods and method not in args.methods:
            continue
        runs.append((method, method, {}, True))
    if not args.no_variants:
        if "orthogonality" in METHODS and (not args.methods or "orthogonality" in args.methods):
            lp_label = "orthogonality, mapping=lp (OMPQ's LP objective)"
            runs.append((lp_label, "orthogonality", {"mapping": "lp"}, True))
            runs.append(("orthogonality, features=next_input", "orthogonality", {"features": "next_input"},
                         True))
        if "measured" in METHODS and (not args.methods or "measured" in args.methods):
            runs.append(("measured, data-free (distilled inputs, KL)", "measured", {}, False))

    samples = {seed: full_train.take(args.samples, seed=seed) for seed in args.seeds}
    rows = []
    for label, method, params, with_data in runs:
        rhos, pooled, secs, cpus, units, passes = [], [], [], [], [], []
        for seed in args.seeds:
            train = samples[seed]
            unit = fwd_unit(model, train.x)
            opts = SensitivityOptions(weight_bits=BITS, samples=args.samples, batch_size=64, seed=seed,
                                      params=params)
            data = (train.x, train.y) if with_data else None
            t0, c0 = time.perf_counter(), time.process_time()
            table = compute_sensitivity(model, data, method, opts, example_input=train.x[:2])
            secs.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            units.append(secs[-1] / unit)
            passes.append(table.cost.get("passes"))
            assert table.layer_names == names
            cols = [table.options.index(LayerBits(b)) for b in BITS]
            pred = table.values[:, cols]
            rhos.append([rho(pred[:, j], gt[:, j]) for j in range(len(BITS))])
            pooled.append(rho(pred.reshape(-1), gt.reshape(-1)))
            print(f"{label} (seed {seed}): rho " + " ".join(f"W{b} {r:+.3f}" for b, r in zip(BITS, rhos[-1]))
                  + f" pooled {pooled[-1]:+.3f}; {secs[-1]:.1f} s wall, {cpus[-1]:.1f} s CPU, "
                  f"{units[-1]:.0f} fwd units, passes {passes[-1]}", flush=True)
        rows.append((label, np.array(rhos), np.array(pooled), np.mean(secs), np.mean(cpus), np.mean(units),
                     passes[0]))

    def ms(v) -> str:
        return f"{np.mean(v):+.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:+.3f}"

    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# Sensitivity fidelity on ResNet-20 / CIFAR-10 (JPEG)",
        "",
        " ".join(
            [
                "Spearman ρ between each method's predicted per-layer loss increase and the measured",
                "one (that layer alone quantized, weights only, per-channel symmetric min-max; mean",
                f"cross-entropy on {len(test)} test images, a seeded random sample of test.npz, seed",
                f"{TEST_SEED}, since the file is sorted by class and its first images would cover only a",
                f"few classes; float loss {base:.4f}). Methods ran",
                f"on {args.samples} training images with labels (a seeded random sample of train.npz, seeds",
                f"{seeds}; ρ is the mean ± standard deviation over the seeds), weight options 2/3/4 bits.",
                "'pooled': ρ over all layers × bit-widths together. Times are means over the seeds;",
                "'fwd units': the method's seconds over one forward pass of the model over the same images,",
                "measured just before it (the machine is shared and its load varies; this ratio is steadier",
                "than seconds). 'passes': the method's own count of forward passes over its data.",
            ]
        ),
        "",
        "| method | ρ W2 | ρ W3 | ρ W4 | ρ pooled | seconds (wall) | CPU s | fwd units | passes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r, pooled, secs, cpu, units, passes in rows:
        lines.append(
            f"| {label} | " + " | ".join(ms(r[:, j]) for j in range(len(BITS))) + f" | {ms(pooled)} | "
            f"{secs:.1f} | {cpu:.1f} | {units:.0f} | {passes if passes is not None else '–'} |"
        )
    lines += [
        "",
        f"Ground truth: {gt_seconds:.0f} s ({len(names)} layers × {len(BITS)} bit-widths × {len(test)} "
        "images).",
        "",
        "Measured ground truth (increase of the mean test cross-entropy ± its standard error over the "
        "images):",
        "",
        "| layer | " + " | ".join(f"W{b}" for b in BITS) + " |",
        "| --- | " + " | ".join("---:" for _ in BITS) + " |",
    ]
    for i, name in enumerate(names):
        lines.append(
            f"| {name} | "
            + " | ".join(f"{gt[i, j]:+.3f} ± {gt_se[i, j]:.3f}" for j in range(len(BITS)))
            + " |"
        )
    negative = int((gt < 0).sum())
    significant = int((gt + 2 * gt_se < 0).sum())
    non_monotone = int(sum(1 for i in range(len(names)) if not (gt[i, 0] >= gt[i, 1] >= gt[i, 2])))
    lines += [
        "",
        f"{negative} of {gt.size} ground-truth cells are negative ({significant} by more than two standard "
        f"errors), and {non_monotone} of {len(names)} layers are not monotone in the bit-width "
        "(W2 ≥ W3 ≥ W4 fails).",
    ]
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    lines += [
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/sensitivity_fidelity.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {machine()}; 2-core CPU shared with other jobs (load average at the end {load}).",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    path = write_result("sensitivity_fidelity.md", text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
