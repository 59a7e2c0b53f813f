"""Weight schemes on real weights: bits per weight (cost model vs hand arithmetic) and quantization error.

For each scheme of `quant.formats`, every conv/linear layer of the shared ResNet-20 is quantized (weights
only, activations FP32) by round-to-nearest and by GPTQ, and we report

* bpw: `CostModel` bits per weight including scales/zero points, for a 4096×4096 Linear layer (checked
  against the hand formula) and for the whole ResNet-20 (its rows are short: 27 to 576 inputs);
* relative weight MSE: Σ‖ΔW‖² / Σ‖W‖² over all layers;
* relative output MSE: Σ tr(ΔW H ΔWᵀ) / Σ tr(W H Wᵀ), H = E[x xᵀ] of each layer's input patches measured
  on *report* images (test.npz), disjoint from the GPTQ calibration images (train.npz);
* top-1 on 2,000 random test.npz images (disjoint from the 256 output-MSE images) next to FP32 measured
  on the same images, with a 95 % interval of the paired difference to FP32.

    .venv/bin/python bench/formats.py            # writes bench/results/formats.md
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result  # noqa: E402

import torch  # noqa: E402

from quant import Allocation, LayerBits, QuantConfig, apply_allocation, discover_layers  # noqa: E402
from quant.apply import collect_statistics, set_allocation, wrap_model  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.layers import LayerInfo  # noqa: E402
from zoo import evaluate, load_model, load_npz  # noqa: E402

SCHEMES = [
    "int8", "fp8-e4m3", "fp8-e4m3-tensor", "mxfp8",
    "int4", "int4-g128", "int4-g32", "int4-g128-asym", "mxfp4", "nvfp4",
    "int3-g64", "int3-g32", "int3-g32-asym", "int2-g32-asym",
]
#: bits per weight of a 4096×4096 layer by hand: elements + scale bits / group (+ zero point, tensor scale)
HAND_BPW = {
    "int8": 8 + 16 / 4096, "fp8-e4m3": 8 + 32 / 4096, "fp8-e4m3-tensor": 8 + 32 / 4096**2, "mxfp8": 8 + 8 / 32,
    "int8-g32": 8 + 16 / 32, "int4": 4 + 16 / 4096, "int4-g128": 4 + 16 / 128, "int4-g64": 4 + 16 / 64,
    "int4-g32": 4 + 16 / 32, "int4-g128-asym": 4 + 20 / 128, "int4-g32-asym": 4 + 20 / 32, "mxfp4": 4 + 8 / 32,
    "nvfp4": 4 + 8 / 16 + 32 / 4096**2, "int3-g128": 3 + 16 / 128, "int3-g64": 3 + 16 / 64,
    "int3-g32": 3 + 16 / 32, "int3-g32-asym": 3 + 19 / 32, "int2-g32-asym": 2 + 18 / 32,
}


def paired_ci(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and 95 % half-width of the paired difference of two 0/1 correctness vectors, in points."""
    d = (a.float() - b.float()) * 100
    return float(d.mean()), 1.96 * float(d.std(unbiased=True)) / math.sqrt(d.numel())


def main() -> None:
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    t_start = time.perf_counter()
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    model = loaded.model.eval()
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)  # GPTQ's Hessians
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    report = test.subset(torch.sort(order[:256]).values)  # output-MSE Hessians: never used for rounding
    test = test.subset(torch.sort(order[256:2256]).values)  # top-1: 2,000 other random test images
    layers = discover_layers(model, calib.x[:2])
    names = [l.name for l in layers]

    # bpw: a 4096×4096 Linear and the ResNet-20 as a whole
    big = CostModel([LayerInfo("w", "Linear", (4096, 4096), 4096 * 4096, False, 4096 * 4096, (4096,), (4096,),
                               out_channels=4096)])
    resnet = CostModel(layers)
    bpw_big = {s: big.uniform(LayerBits.of(s)).bpw for s in SCHEMES}
    bpw_net = {s: resnet.uniform(LayerBits.of(s)).bpw for s in SCHEMES}
    for s in SCHEMES:
        assert abs(bpw_big[s] - HAND_BPW[s]) < 1e-12, (s, bpw_big[s], HAND_BPW[s])

    # report-data input second moments of every layer
    model_copy = copy.deepcopy(model)
    ref = wrap_model(model_copy, QuantConfig(calibration_samples=256))
    collect_statistics(model_copy, ref, report.x, QuantConfig(calibration_samples=256))
    H = {n: ref[n].stats.weight_moments(ref[n].layer)[1].input_cov for n in names}
    weights = {n: m.weight.detach().flatten(1) for n, m in model.named_modules() if n in names}
    w2 = sum(float(w.pow(2).sum()) for w in weights.values())
    wh = sum(float(torch.trace(weights[n] @ H[n] @ weights[n].T)) for n in names)

    fp = evaluate(model, test)
    fp_ok = fp.logits.argmax(1) == test.y
    print(f"FP32 {fp.top1:.2f} %", flush=True)

    # one wrapped model per rounding; calibration statistics are gathered once and reused for every scheme
    qmodels = {
        r: apply_allocation(model, Allocation.uniform(names, LayerBits.of(SCHEMES[0])), calib,
                            QuantConfig(weight_rounding=r, calibration_samples=256))
        for r in ("nearest", "gptq")
    }
    rows = []
    for s in SCHEMES:
        for rounding in ("nearest", "gptq"):
            t = time.perf_counter()
            q = qmodels[rounding]
            set_allocation(q, Allocation.uniform(names, LayerBits.of(s)))
            with torch.no_grad():
                qw = {l.name: l.quantized_weight().detach().flatten(1) for l in q.modules()
                      if hasattr(l, "quantized_weight")}
            dw2 = sum(float((qw[n] - weights[n]).pow(2).sum()) for n in names)
            dwh = sum(float(torch.trace((qw[n] - weights[n]) @ H[n] @ (qw[n] - weights[n]).T)) for n in names)
            r = evaluate(q, test)
            diff, hw = paired_ci(r.logits.argmax(1) == test.y, fp_ok)
            rows.append((s, rounding, dw2 / w2, dwh / wh, r.top1, diff, hw, time.perf_counter() - t))
            print(f"{s:<16} {rounding:<8} wMSE {dw2 / w2:.3e} oMSE {dwh / wh:.3e} top1 {r.top1:6.2f} "
                  f"({diff:+.2f} ± {hw:.2f}) {time.perf_counter() - t:.1f} s", flush=True)

    lines = [
        "### Weight schemes: bits per weight and quantization error (ResNet-20, CIFAR-10)",
        "",
        f"Command: `.venv/bin/python bench/formats.py` ({time.perf_counter() - t_start:.0f} s). Machine: {machine()};",
        "wall-clock taken on a loaded, shared 2-core machine. Weights only (activations FP32), every conv/linear",
        "layer in the scheme. GPTQ calibration: 256 random train.npz images; output-MSE Hessians: 256 random",
        "test.npz images; top-1: 2,000 other random test.npz images, Δ = paired difference to FP32 with a 95 %",
        "interval.",
        f"FP32 top-1 on the same 2,000 images: **{fp.top1:.2f} %**.",
        "",
        "bpw (4096²): the cost model's bits per weight for a 4096×4096 Linear layer, equal to the hand formula",
        "(elements + scale bits per group, + zero point bits when asymmetric, + 32 bits per tensor for NVFP4)",
        "to 1e-12 for every row; bpw (ResNet-20): the same over ResNet-20's layers, whose short rows (27-576",
        "inputs) make per-channel scales and partial groups cost more.",
        "",
        "| scheme | bpw (4096²) | bpw (ResNet-20) | rounding | rel. weight MSE | rel. output MSE | top-1 % | Δ top-1 vs FP32 |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for s, rounding, wm, om, top1, diff, hw, _ in rows:
        lines.append(f"| {s} | {bpw_big[s]:.4f} | {bpw_net[s]:.4f} | {rounding} | {wm:.3e} | {om:.3e} | "
                     f"{top1:.2f} | {diff:+.2f} ± {hw:.2f} |")
    out = "\n".join(lines) + "\n"
    print(out)
    print("wrote", write_result("formats.md", out))


if __name__ == "__main__":
    main()
