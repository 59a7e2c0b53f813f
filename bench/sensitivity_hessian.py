"""Per-layer Hessian traces of the shared ResNet-20: PyHessian (as HAWQ runs it) against the `hessian` method.

* PyHessian: one ``hessian(model, criterion, data=(x, y), cuda=False).trace(maxIter=50, tol=1e-3)`` run per
  layer with only that layer's weight requiring grad (how HAWQ-V2/V3 obtain per-block traces);
* ours, Gauss-Newton exact: `sensitivity.hessian.gauss_newton_traces` (one backward per class per batch);
  exact for this piecewise-linear network, so it is also the reference;
* ours, joint Hutchinson: every probe covers all layers (one Hessian-vector product per probe);
* checks of the reference: the exact Hessian block of `linear` (closed form through the penultimate
  features, torch.func.hessian) and long per-layer Hutchinson runs on a few layers (± 1 standard error).

Data: 200 images of train.npz drawn at random (seed 0) with their labels; loss: mean cross-entropy. Seconds are wall clock
on this machine; the load can vary between phases, so each phase also reports its time in units of one
forward+backward pass over the 200 images measured right before it ("fb units").

    .venv/bin/python bench/sensitivity_hessian.py                      # everything (PyHessian: ~30 min)
    .venv/bin/python bench/sensitivity_hessian.py --pyhessian-layers 4 # PyHessian on 4 layers, extrapolated
    .venv/bin/python bench/sensitivity_hessian.py --cache /tmp/h.json  # reuse finished phases

Writes bench/results/sensitivity_hessian.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import CIFAR_TRAIN, RESNET20, machine, require_shared, write_result

from quant.layers import discover_layers
from sensitivity import SensitivityOptions, compute_sensitivity
from sensitivity.hessian import gauss_newton_traces, gn_numeric_check, hutchinson_traces
from zoo import IMAGENET_NORMALISATION, load_model, load_npz


class Timer:
    """Wall-clock and CPU seconds of this process (CPU time is what a shared machine's load barely moves)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def fb_unit(model, x, y, repeats: int = 3) -> float:
    """CPU seconds of one forward+backward pass over (x, y) (median of `repeats`)."""
    times = []
    for _ in range(repeats):
        with Timer() as t:
            loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        times.append(t.cpu)
    return float(np.median(times))


def run_pyhessian(model, modules, x, y, names, max_iter, tol, seed):
    from pyhessian import hessian

    out = {}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for name in names:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            w = modules[name].weight
            w.requires_grad_(True)
            torch.manual_seed(seed)
            with Timer() as t:
                h = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
                vhv = h.trace(maxIter=max_iter, tol=tol)
            w.grad = None
            del h
            out[name] = {
                "trace": float(np.mean(vhv)),
                "probes": len(vhv),
                "seconds": t.wall,
                "cpu": t.cpu,
                "stderr": float(np.std(vhv, ddof=1) / math.sqrt(len(vhv))) if len(vhv) > 1 else None,
            }
            print(
                f"  pyhessian {name}: {out[name]['trace']:.3f} ({len(vhv)} probes, {t.wall:.1f} s, "
                f"{t.cpu:.1f} s CPU)",
                flush=True,
            )
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    return out


def exact_linear_block(model, x, y) -> float:
    """Tr of the exact Hessian block of `linear` (the loss depends on it only through the pooled features)."""
    feats = {}
    h = model.linear.register_forward_hook(lambda m, a, o: feats.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    b = model.linear.bias.detach()

    def loss(w):
        return F.cross_entropy(F.linear(feats["x"].double(), w, b.double()), y)

    hm = torch.func.hessian(loss)(model.linear.weight.detach().double())
    n = model.linear.weight.numel()
    return float(hm.reshape(n, n).diagonal().sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument(
        "--pyhessian-layers", type=int, default=0, help="0: all layers; N: the first N, extrapolated"
    )
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--joint-probes", type=int, default=100, help="probes of the joint Hutchinson run")
    ap.add_argument("--verify-layers", default="conv1,layer3.2.conv2", help="long per-layer Hutchinson runs")
    ap.add_argument("--verify-probes", type=int, default=200)
    ap.add_argument("--cache", default="", help="JSON file keeping finished phases between runs")
    ap.add_argument("--phases", default="pyhessian,gn,method,joint,verify")
    ap.add_argument("--out", default="sensitivity_hessian.md")
    args = ap.parse_args()
    require_shared(RESNET20, CIFAR_TRAIN)
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = {}
    if args.cache and Path(args.cache).exists():
        cache = json.loads(Path(args.cache).read_text())

    def save():
        if args.cache:
            Path(args.cache).write_text(json.dumps(cache, indent=1))

    lm = load_model("zoo:cifar-resnet20", weights=RESNET20)
    model = lm.model.eval()
    # train.npz is sorted by class: a seeded random sample, not the first images (all of one class)
    ds = load_npz(CIFAR_TRAIN, IMAGENET_NORMALISATION).take(args.samples, seed=0)
    x, y = ds.x, ds.y
    layers = discover_layers(model, x[:2])
    named = dict(model.named_modules())
    modules = {l.name: named[l.name] for l in layers}
    names = list(modules)
    phases = set(args.phases.split(","))
    cache.setdefault("machine", machine())
    cache["params"] = {l.name: l.params for l in layers}

    if "pyhessian" in phases and "pyhessian" not in cache:
        todo = names if not args.pyhessian_layers else names[: args.pyhessian_layers]
        print(f"PyHessian on {len(todo)} layers ...", flush=True)
        unit = fb_unit(model, x, y)
        res = run_pyhessian(model, modules, x, y, todo, args.max_iter, args.tol, seed=0)
        cache["pyhessian"] = {"layers": res, "fb_unit": unit}
        save()

    if "gn" in phases and "gn" not in cache:
        print("Gauss-Newton exact ...", flush=True)
        unit = fb_unit(model, x, y)
        with Timer() as tc:
            check = gn_numeric_check(model, modules, x[:4], y[:4])
        with Timer() as t:
            r = gauss_newton_traces(
                model, modules, [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
            )
        cache["gn"] = {
            "trace": r.as_dict(),
            "seconds": t.wall,
            "cpu": t.cpu,
            "check_seconds": tc.wall,
            "check_cpu": tc.cpu,
            "check_max_ratio": max(check.values()),
            "backward_passes": r.backward_passes,
            "fb_unit": unit,
        }
        print(f"  {t.wall:.1f} s, {t.cpu:.1f} s CPU (+ check {tc.cpu:.1f} s CPU)", flush=True)
        save()

    if "method" in phases and "method" not in cache:
        print("compute_sensitivity(method='hessian') ...", flush=True)
        opts = SensitivityOptions(samples=args.samples, batch_size=64)
        with Timer() as t:
            table = compute_sensitivity(model, (x, y), "hessian", opts)
        cache["method"] = {
            "seconds": t.wall,
            "cpu": t.cpu,
            "estimator": table.settings["estimator"],
            "cost": table.cost,
        }
        print(f"  {t.wall:.1f} s, {t.cpu:.1f} s CPU, estimator {table.settings['estimator']}", flush=True)
        save()

    if "joint" in phases and "joint" not in cache:
        print(f"joint Hutchinson, {args.joint_probes} probes ...", flush=True)
        unit = fb_unit(model, x, y)
        with Timer() as t:
            r = hutchinson_traces(
                model,
                modules,
                [(x, y)],
                probing="joint",
                tol=0.0,
                min_probes=args.joint_probes,
                max_probes=args.joint_probes,
                seed=1,
            )
        cache["joint"] = {
            "trace": r.as_dict(),
            "stderr": dict(zip(names, r.stderr.tolist())),
            "seconds": t.wall,
            "cpu": t.cpu,
            "probes": r.probes,
            "hvp_passes": r.hvp_passes,
            "fb_unit": unit,
        }
        print(f"  {t.wall:.1f} s, {t.cpu:.1f} s CPU", flush=True)
        save()

    if "verify" in phases and "verify" not in cache:
        print("reference checks ...", flush=True)
        ver = {"linear_exact": exact_linear_block(model, x, y), "long": {}}
        for name in [n for n in args.verify_layers.split(",") if n]:
            with Timer() as t:
                r = hutchinson_traces(
                    model,
                    {name: modules[name]},
                    [(x, y)],
                    probing="per-layer",
                    tol=0.0,
                    min_probes=args.verify_probes,
                    max_probes=args.verify_probes,
                    seed=2,
                )
            ver["long"][name] = {
                "trace": float(r.trace[0]),
                "stderr": float(r.stderr[0]),
                "probes": r.probes,
                "seconds": t.wall,
                "cpu": t.cpu,
            }
            print(f"  {name}: {r.trace[0]:.3f} ± {r.stderr[0]:.3f}", flush=True)
        cache["verify"] = ver
        save()

    if "pyhessian" in cache and "gn" in cache:
        text = report(cache, names, args)
        if "/" in args.out:
            path = Path(args.out)
            path.write_text(text)
        else:
            path = write_result(args.out, text)
        print(text)
        print(f"written to {path}")


HEADER = (
    "| layer | weights | reference (GN exact) | PyHessian (probes) | err | joint Hutchinson ± s.e. | err |"
)


def _shown_args() -> str:
    """The command-line arguments without `--cache FILE` (a local detail of the run)."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--cache":
            skip = True
        elif not a.startswith("--cache="):
            out.append(a)
    return " ".join(out)


def _err(v: float, ref: float) -> float:
    return abs(v - ref) / abs(ref)


def report(c, names, args) -> str:
    ref = c["gn"]["trace"]
    py = c["pyhessian"]["layers"]
    joint = c.get("joint")
    params = c.get("params", {})
    lines = [
        "# Per-layer Hessian traces: PyHessian vs `hessian` (ResNet-20, CIFAR-10)",
        "",
        f"Machine: {c['machine']}. The machine was shared with other jobs (load 4-9 on 2 cores), so the",
        "comparison uses **CPU seconds** of the benchmark process (one torch thread: CPU time ≈ work); wall",
        "seconds are given too. *fb* = CPU seconds of one forward+backward pass over the 200 images.",
        f"Data: {args.samples} images of train.npz drawn at random (seed 0) with their labels; loss: mean "
        "cross-entropy.",
        "Reference: the exact Gauss-Newton trace, which equals the Hessian block trace for this",
        "piecewise-linear network (see the checks below).",
        "",
        f"Command: `.venv/bin/python bench/sensitivity_hessian.py {_shown_args()}`"
        + (" (phases run separately, kept in a `--cache` file)" if "--cache" in sys.argv else ""),
        "",
        HEADER,
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    py_err, j_err = [], []
    for n in names:
        r = ref[n]
        row = f"| {n} | {params.get(n, '')} | {r:.2f} |"
        if n in py:
            py_err.append(_err(py[n]["trace"], r))
            row += f" {py[n]['trace']:.2f} ({py[n]['probes']}) | {py_err[-1] * 100:.1f} % |"
        else:
            row += " – | – |"
        if joint:
            j_err.append(_err(joint["trace"][n], r))
            row += f" {joint['trace'][n]:.2f} ± {joint['stderr'][n]:.2f} | {j_err[-1] * 100:.1f} % |"
        else:
            row += " – | – |"
        lines.append(row)
    n_py = len(py)
    scale = len(names) / n_py
    extrap = n_py < len(names)
    py_cpu = sum(v.get("cpu", v["seconds"]) for v in py.values()) * scale
    py_wall = sum(v["seconds"] for v in py.values()) * scale
    gn = c["gn"]

    def row(label, wall, cpu, unit, errs, passes):
        e = (
            f"{np.mean(errs) * 100:.1f} % | {np.median(errs) * 100:.1f} % | {np.max(errs) * 100:.1f} %"
            if errs
            else "0 | 0 | 0"
        )
        return f"| {label} | {wall:.1f} | {cpu:.1f} | {cpu / unit:.0f} | {e} | {passes} |"

    lines += [
        "",
        "| estimator | wall s | CPU s | fb | mean err | median err | max err | passes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        row(
            f"PyHessian, per layer, maxIter={args.max_iter}, tol={args.tol}"
            + (f" (**{n_py} of {len(names)} layers measured, extrapolated ×{scale:.1f}**)" if extrap else ""),
            py_wall,
            py_cpu,
            c["pyhessian"]["fb_unit"],
            py_err,
            f"{sum(v['probes'] for v in py.values())} HVPs (each over the layers after the probed one)",
        ),
        row(
            "ours, Gauss-Newton exact (the reference)",
            gn["seconds"],
            gn.get("cpu", gn["seconds"]),
            gn["fb_unit"],
            [],
            f"{gn['backward_passes']} backward passes to the layer outputs",
        ),
        (
            f"| ours, GN validity check (4 samples) | {gn['check_seconds']:.1f} "
            f"| {gn.get('check_cpu', 0):.1f} "
            f"| {gn.get('check_cpu', 0) / gn['fb_unit']:.1f} | | | "
            f"| dropped/full ratio {gn['check_max_ratio']:.0e} |"
        ),
    ]
    if joint:
        lines.append(
            row(
                f"ours, joint Hutchinson, {joint['probes']} probes",
                joint["seconds"],
                joint.get("cpu", joint["seconds"]),
                joint["fb_unit"],
                j_err,
                f"{joint['hvp_passes']} HVPs (each over the whole network)",
            )
        )
    if "method" in c:
        m = c["method"]
        lines.append(
            f'| `compute_sensitivity(method="hessian")` end to end ({m["estimator"]}, with the weight-error '
            f"table and the check) | {m['seconds']:.1f} | {m.get('cpu', m['seconds']):.1f} | | | | | "
            f"{m['cost'].get('passes')} passes |"
        )
    gn_cpu = gn.get("cpu", gn["seconds"]) + gn.get("check_cpu", 0)
    lines += [
        "",
        (
            "**Speed-up of the Gauss-Newton route (with its check) over PyHessian: "
            f"{py_cpu / gn_cpu:.0f}× in "
            f"CPU seconds ({py_wall / (gn['seconds'] + gn['check_seconds']):.0f}× wall clock), at zero "
            "estimator error** (PyHessian's error is its Monte-Carlo error: maxIter=50 with tol=1e-3 on the "
            "running mean often stops after a handful of probes)."
        ),
    ]
    if joint:
        jc = joint.get("cpu", joint["seconds"])
        lines.append(
            f"Joint Hutchinson ({joint['probes']} probes): {py_cpu / jc:.1f}× less CPU than PyHessian; every "
            "probe pays for a full-network HVP and carries the cross-layer terms v_lᵀH_lm v_m as noise, "
            "which swamps layers with small traces (`linear`)."
        )
    if "verify" in c:
        v = c["verify"]
        lines += ["", "Checks of the reference:", ""]
        lin = v["linear_exact"]
        lines.append(
            f"- `linear`: exact Hessian block (torch.func.hessian, float64) {lin:.4f}; GN exact "
            f"{ref['linear']:.4f} (relative difference {_err(ref['linear'], lin):.1e})."
        )
        for n, r in v["long"].items():
            z = (r["trace"] - ref[n]) / r["stderr"] if r["stderr"] else float("nan")
            lines.append(
                f"- `{n}`: per-layer Hutchinson with {r['probes']} probes "
                f"{r['trace']:.2f} ± {r['stderr']:.2f}"
                f" (1 s.e.); GN exact {ref[n]:.2f} ({z:+.1f} s.e.)."
            )
        lines.append(
            f"- the numerical GN check: the term the Gauss-Newton block drops is {gn['check_max_ratio']:.0e} "
            "× the full block along a random direction, for every layer."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
