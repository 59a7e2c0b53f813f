"""ONNX QDQ export: fidelity in ONNX Runtime, CPU latency, and a front under a measured-latency budget.

1. Fidelity: the exported model in ONNX Runtime (CPU) against the PyTorch fake-quant model on the same
   images: digits models (360 test images) and ResNet-20 (all 10,000 images of test.npz), W8A8, W4A8 and a
   mixed allocation; the FP32 export against PyTorch FP32 as a control.
2. Latency: ResNet-20 in ONNX Runtime CPU at batch 1 and 64: FP32, W8A8 and the mixed allocation, timed in
   one run, the models taking turns run by run (medians and IQR); the FP32 / W8A8 time ratio, with and
   without BatchNorm folded into the quantized convolutions (which lets ONNX Runtime use QLinearConv).
3. Latency front: `profile_layers` measures every ResNet-20 layer at W/A in {4, 8, fp} x {8, fp} (batch 1);
   a Fisher sensitivity table (256 calibration images of train.npz) and the ILP solve for a latency budget of
   uniform W8A8's predicted latency minus 20 %; the chosen allocation and the uniform points are exported
   and timed whole: predicted (sum of the layer table) against measured end-to-end latency.

    .venv/bin/python bench/export.py                 # writes bench/results/export.{md,json}
    .venv/bin/python bench/export.py --quick         # digits only, few repeats (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result  # noqa: E402

import onnxruntime  # noqa: E402

from quant import Allocation, LayerBits, QuantConfig, apply_allocation, discover_layers  # noqa: E402
from quant.cost import CostModel  # noqa: E402
import numpy as np  # noqa: E402

from quant.export.onnx_qdq import ExportConfig, check_fidelity, export_float, export_onnx, ort_session  # noqa: E402
from quant.profile import measure_model, profile_layers  # noqa: E402
from zoo import evaluate, load_digits_splits, load_model, load_npz  # noqa: E402

CONFIG = QuantConfig()  # per-channel symmetric weights, min-max ranges: the search's default


def mixed_pattern(names: list[str]) -> Allocation:
    """A fixed mixed allocation for the digits models: first/last 8/8, the rest 4/8, 6/8, fp, 3/8 in turn."""
    cycle = [LayerBits(4, 8), LayerBits(6, 8), LayerBits(32, 32), LayerBits(3, 8)]
    bits = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    bits[names[0]] = bits[names[-1]] = LayerBits(8, 8)
    return Allocation(bits, metadata={"pattern": "8/8 ends; 4/8, 6/8, fp, 3/8 in turn"})


def fidelity_rows(label, model, example, calib, test, allocations, out):
    fp = check_fidelity(model, export_float(model, example), test.x, test.y)
    out.append({"model": label, "allocation": "FP32", "n": fp.n, "agreement": fp.agreement,
                "top1_torch": fp.accuracy_torch, "top1_onnx": fp.accuracy_onnx,
                "max_logit_diff": fp.max_abs_logit_diff, "containers": "float"})
    for name, alloc in allocations.items():
        fold = name.endswith("BN folded")
        q = apply_allocation(model, alloc, calibration=calib.x, config=CONFIG)
        res = export_onnx(q, example, allocation=alloc, config=ExportConfig(fold_batchnorm=fold))
        f = check_fidelity(q, res.model, test.x, test.y)
        conts = sorted({l.weight for l in res.layers})
        out.append({"model": label, "allocation": name, "n": f.n, "agreement": f.agreement,
                    "top1_torch": f.accuracy_torch, "top1_onnx": f.accuracy_onnx,
                    "max_logit_diff": f.max_abs_logit_diff, "containers": "+".join(conts),
                    "opset": res.opset})
        print(out[-1], flush=True)


def latency_front(loaded, calib, threads, repeats):
    from search import AllocationProblem, pareto_front
    from sensitivity import SensitivityOptions, compute_sensitivity

    model, example = loaded.model, calib.x[:2]
    t0 = time.perf_counter()
    prof = profile_layers(model, example, ["4/8", "8/8", "fp/8", "4/fp", "8/fp", "fp/fp"], batch_size=1,
                          warmup=10, repeats=repeats, threads=threads, config=CONFIG)
    t_prof = time.perf_counter() - t0
    table = prof.table()
    opts = SensitivityOptions((4, 8, 32), (8, 32), samples=256, seed=0, quant=CONFIG)
    sens = compute_sensitivity(model, calib, "fisher", opts, example_input=example)
    cost = CostModel(sens.layers, latency_table=table)
    names = [l.name for l in sens.layers]
    w8a8 = cost.cost(Allocation.uniform(names, "8/8")).latency_s
    budget = 0.8 * w8a8
    problem = AllocationProblem(sens, cost, [f"latency={budget}"])
    front = pareto_front(problem, "latency", 6, "ilp", extra_limits=[budget])
    at_budget = [p for p in front.points if p.budget is not None and p.budget <= budget * (1 + 1e-9)]
    chosen = max(at_budget, key=lambda p: p.budget) if at_budget else None
    rows = []
    candidates = [("search @ W8A8 - 20 %", chosen.allocation)] if chosen else []
    candidates += [(u, Allocation.uniform(names, u)) for u in ("fp", "8/8", "4/8")]
    for label, alloc in candidates:
        predicted = cost.cost(alloc).latency_s
        if all(b.weight_bits == 32 and b.activation_bits == 32 for b in alloc.layers.values()):
            onnx_model = export_float(model, example)
        else:
            onnx_model = export_onnx(apply_allocation(model, alloc, calibration=calib.x, config=CONFIG), example,
                                     allocation=alloc).model
        t = measure_model(onnx_model, (3, 32, 32), 1, warmup=10, repeats=repeats, threads=threads)
        rows.append({"point": label, "predicted_ms": 1e3 * predicted, "measured_ms": 1e3 * t.median_s,
                     "iqr_ms": 1e3 * (t.p75_s - t.p25_s),
                     "error_pct": 100 * (predicted - t.median_s) / t.median_s,
                     "within_budget_measured": t.median_s <= budget,
                     "mix": {o: sum(1 for b in alloc.layers.values() if b.label() == o)
                             for o in sorted({b.label() for b in alloc.layers.values()})}})
        print(rows[-1], flush=True)
    return {"budget_ms": 1e3 * budget, "w8a8_predicted_ms": 1e3 * w8a8, "profile_s": t_prof,
            "table": table, "overhead_s": prof.overhead_s, "rows": rows,
            "chosen": chosen.allocation.to_dict() if chosen else None}


def weight_budget_front(loaded, calib, test, table, threads, repeats):
    """The latency budget again, now with weights held to <= 8 bits on average (no float layers to hide in):
    the solver must trade W4/W8 against A8/float activations on the measured table."""
    from search import AllocationProblem, pareto_front
    from sensitivity import SensitivityOptions, compute_sensitivity

    model, example = loaded.model, calib.x[:2]
    opts = SensitivityOptions((4, 8, 32), (8, 32), samples=256, seed=0, quant=CONFIG)
    sens = compute_sensitivity(model, calib, "fisher", opts, example_input=example)
    cost = CostModel(sens.layers, latency_table=table)
    names = [l.name for l in sens.layers]
    budget = 0.8 * cost.cost(Allocation.uniform(names, "8/8")).latency_s
    problem = AllocationProblem(sens, cost, [f"latency={budget}", "avg_weight_bits=8"])
    front = pareto_front(problem, "latency", 6, "ilp", extra_limits=[budget])
    at_budget = [p for p in front.points if p.budget is not None and p.budget <= budget * (1 + 1e-9)]
    chosen = max(at_budget, key=lambda p: p.budget) if at_budget else None
    candidates = [("search @ W8A8 - 20 %, avg w bits <= 8", chosen.allocation)] if chosen else []
    candidates += [(u, Allocation.uniform(names, u)) for u in ("8/8", "8/fp", "4/fp")]
    rows = []
    fp_model = export_float(model, example)
    fp64 = measure_model(fp_model, (3, 32, 32), 64, warmup=3, repeats=10, threads=threads)
    fp1 = measure_model(fp_model, (3, 32, 32), 1, warmup=10, repeats=repeats, threads=threads)
    for label, alloc in candidates:
        q = apply_allocation(model, alloc, calibration=calib.x, config=CONFIG)
        onnx_model = export_onnx(q, example, allocation=alloc).model
        t = measure_model(onnx_model, (3, 32, 32), 1, warmup=10, repeats=repeats, threads=threads)
        t64 = measure_model(onnx_model, (3, 32, 32), 64, warmup=3, repeats=10, threads=threads)
        f = check_fidelity(q, onnx_model, test.x, test.y)
        predicted = cost.cost(alloc).latency_s
        rows.append({"point": label, "predicted_ms": 1e3 * predicted, "measured_ms": 1e3 * t.median_s,
                     "iqr_ms": 1e3 * (t.p75_s - t.p25_s), "error_pct": 100 * (predicted - t.median_s) / t.median_s,
                     "within_budget_measured": t.median_s <= budget, "top1_onnx": f.accuracy_onnx,
                     "agreement": f.agreement, "avg_weight_bits": cost.cost(alloc).avg_weight_bits,
                     "batch64_ms": 1e3 * t64.median_s, "batch64_iqr_ms": 1e3 * (t64.p75_s - t64.p25_s),
                     "mix": {o: sum(1 for b in alloc.layers.values() if b.label() == o)
                             for o in sorted({b.label() for b in alloc.layers.values()})}})
        print(rows[-1], flush=True)
    return {"budget_ms": 1e3 * budget, "rows": rows, "chosen": chosen.allocation.to_dict() if chosen else None,
            "fp32_ms": {"1": 1e3 * fp1.median_s, "64": 1e3 * fp64.median_s}}


def latency_rows(model, example, allocs, calib, threads, batches, repeats):
    """Whole-model latency; the models take turns run by run, so load changes hit them alike."""
    models = {"FP32": export_float(model, example)}
    for name, (alloc, fold) in allocs.items():
        q = apply_allocation(model, alloc, calibration=calib.x, config=CONFIG)
        models[name] = export_onnx(q, example, allocation=alloc, config=ExportConfig(fold_batchnorm=fold)).model
    sessions = {name: ort_session(m, threads=threads) for name, m in models.items()}
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *example.shape[1:])).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, sess in sessions.items():
            for _ in range(5):
                sess.run(None, {"input": x})
        for _ in range(repeats[b]):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, {"input": x})
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            q25, q50, q75 = np.percentile(ts, [25, 50, 75])
            rows.append({"batch": b, "model": name, "median_ms": 1e3 * q50, "iqr_ms": 1e3 * (q75 - q25),
                         "repeats": len(ts)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--front2", action="store_true",
                    help="Only add the front with avg weight bits <= 8, reusing the layer table of export.json.")
    ap.add_argument("--resnet-mixed", action="store_true",
                    help="Only add ResNet-20's fidelity at the fixed mixed pattern to export.json.")
    args = ap.parse_args()
    if args.resnet_mixed:
        from _common import RESULTS

        result = json.loads((RESULTS / "export.json").read_text())
        loaded = load_model("zoo:cifar-resnet20", RESNET20)
        test = load_npz(CIFAR_TEST, loaded.normalisation)
        calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
        names = [l.name for l in discover_layers(loaded.model, calib.x[:2])]
        rows: list[dict] = []
        fidelity_rows("cifar-resnet20", loaded.model, calib.x[:2], calib, test,
                      {"mixed (8/8 ends; 4/8, 6/8, fp, 3/8)": mixed_pattern(names)}, rows)
        result["fidelity"] += rows[1:]  # the FP32 control row is already there
        write_result("export.json", json.dumps(result, indent=1) + "\n")
        write_result("export.md", render(result))
        return
    if args.front2:
        from _common import RESULTS

        result = json.loads((RESULTS / "export.json").read_text())
        loaded = load_model("zoo:cifar-resnet20", RESNET20)
        test = load_npz(CIFAR_TEST, loaded.normalisation)
        calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
        result["front2"] = weight_budget_front(loaded, calib, test, result["front"]["table"], args.threads, 50)
        result["front2"]["load"] = os.getloadavg()
        write_result("export.json", json.dumps(result, indent=1) + "\n")
        write_result("export.md", render(result))
        print(render(result))
        return
    load0 = os.getloadavg()
    started = time.perf_counter()
    result: dict = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "threads": args.threads}
    fid: list[dict] = []
    digits = load_digits_splits()
    for ref in ("zoo:digits-cnn", "zoo:digits-mlp"):
        lm = load_model(ref)
        names = [l.name for l in discover_layers(lm.model, lm.example_input)]
        allocs = {"W8A8": Allocation.uniform(names, "8/8"), "W4A8": Allocation.uniform(names, "4/8"),
                  "mixed": mixed_pattern(names), "W8A8 BN folded": Allocation.uniform(names, "8/8")}
        fidelity_rows(ref, lm.model, lm.example_input, digits.calibration, digits.test, allocs, fid)
    if not args.quick:
        require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
        loaded = load_model("zoo:cifar-resnet20", RESNET20)
        test = load_npz(CIFAR_TEST, loaded.normalisation)
        calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
        result["fp32_top1_torch"] = evaluate(loaded.model, test).top1
        front = latency_front(loaded, calib, args.threads, repeats=50)
        result["front"] = front
        names = [l.name for l in discover_layers(loaded.model, calib.x[:2])]
        mixed = Allocation.from_dict(front["chosen"]) if front["chosen"] else mixed_pattern(names)
        allocs = {"W8A8": Allocation.uniform(names, "8/8"), "W4A8": Allocation.uniform(names, "4/8"),
                  "mixed (search point)": mixed, "W8A8 BN folded": Allocation.uniform(names, "8/8")}
        fidelity_rows("cifar-resnet20", loaded.model, calib.x[:2], calib, test, allocs, fid)
        result["latency"] = latency_rows(
            loaded.model, calib.x[:2],
            {"W8A8": (allocs["W8A8"], False), "W8A8 BN folded": (allocs["W8A8"], True),
             "mixed (search point)": (mixed, False), "mixed BN folded": (mixed, True)},
            calib, args.threads, (1, 64), {1: 100, 64: 20})
    result["fidelity"] = fid
    result["load_before"], result["load_after"] = load0, os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    write_result("export.json", json.dumps(result, indent=1) + "\n")
    write_result("export.md", render(result))
    print(render(result))


def render(r: dict) -> str:
    lines = [
        "# ONNX QDQ export: fidelity, ONNX Runtime CPU latency, latency front",
        "",
        f"Machine: {r['machine']}; ONNX Runtime {r['onnxruntime']} CPUExecutionProvider, "
        f"{r['threads']} intra-op threads; load average {r['load_before'][0]:.1f} before and "
        f"{r['load_after'][0]:.1f} after (a machine shared with other work: latencies are medians with "
        f"their IQR). Wall time {r['wall_s']:.0f} s. Command: `python bench/export.py`. No GPU: the CUDA and "
        "TensorRT providers were not measured.",
        "",
        "## Fidelity (ONNX Runtime vs PyTorch fake-quant, same images)",
        "",
        "| model | allocation | images | top-1 agreement % | top-1 PyTorch % | top-1 ONNX % | max abs logit diff | weight containers |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for f in r["fidelity"]:
        lines.append(
            f"| {f['model']} | {f['allocation']} | {f['n']} | {100 * f['agreement']:.2f} | "
            f"{100 * f['top1_torch']:.2f} | {100 * f['top1_onnx']:.2f} | {f['max_logit_diff']:.2g} | {f['containers']} |"
        )
    if "latency" in r:
        lines += ["", "## ResNet-20 latency, ONNX Runtime CPU (one run)", "",
                  "| batch | model | median ms | IQR ms | repeats |", "|---:|---|---:|---:|---:|"]
        for x in r["latency"]:
            lines.append(f"| {x['batch']} | {x['model']} | {x['median_ms']:.3f} | {x['iqr_ms']:.3f} | {x['repeats']} |")
        for b in (1, 64):
            fp = next(x for x in r["latency"] if x["batch"] == b and x["model"] == "FP32")["median_ms"]
            for name in ("W8A8", "W8A8 BN folded"):
                w8 = next(x for x in r["latency"] if x["batch"] == b and x["model"] == name)["median_ms"]
                lines.append(f"\nBatch {b}: FP32 / {name} time ratio {fp / w8:.2f} (above 1: {name} is faster).")
    if "front" in r:
        fr = r["front"]
        lines += ["", "## Latency front (batch 1): budget = uniform W8A8 predicted latency - 20 %", "",
                  f"Layer table measured in {fr['profile_s']:.0f} s; W8A8 predicted {fr['w8a8_predicted_ms']:.3f} ms, "
                  f"budget {fr['budget_ms']:.3f} ms.", "",
                  "| point | layers per option | predicted ms (sum of layers) | measured ms | IQR ms | error % | measured within budget |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for x in fr["rows"]:
            mix = ", ".join(f"{k}×{v}" for k, v in x["mix"].items())
            lines.append(f"| {x['point']} | {mix} | {x['predicted_ms']:.3f} | {x['measured_ms']:.3f} | "
                         f"{x['iqr_ms']:.3f} | {x['error_pct']:+.1f} | {'yes' if x['within_budget_measured'] else 'no'} |")
    if "front2" in r:
        fr = r["front2"]
        lines += ["", "### The same budget with weights held to <= 8 bits on average", "",
                  f"Command: `python bench/export.py --front2` (reuses the layer table above; load average "
                  f"{fr['load'][0]:.1f} at the end). Budget {fr['budget_ms']:.3f} ms; accuracy of each exported "
                  "model in ONNX Runtime on all 10,000 test images; batch 64 timed too (10 runs). FP32 in the "
                  f"same run: {fr['fp32_ms']['1']:.3f} ms (batch 1), {fr['fp32_ms']['64']:.2f} ms (batch 64).", "",
                  "| point | layers per option | avg w bits | predicted ms | measured ms (b1) | IQR ms | error % | measured within budget | b64 ms | top-1 ONNX % | agreement with fake-quant % |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for x in fr["rows"]:
            mix = ", ".join(f"{k}×{v}" for k, v in x["mix"].items())
            lines.append(f"| {x['point']} | {mix} | {x['avg_weight_bits']:.2f} | {x['predicted_ms']:.3f} | "
                         f"{x['measured_ms']:.3f} | {x['iqr_ms']:.3f} | {x['error_pct']:+.1f} | "
                         f"{'yes' if x['within_budget_measured'] else 'no'} | {x['batch64_ms']:.2f} | "
                         f"{100 * x['top1_onnx']:.2f} | "
                         f"{100 * x['agreement']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
