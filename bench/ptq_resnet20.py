"""Post-training quantization of the shared ResNet-20 on the shared CIFAR-10 (JPEG) test set.

FP32 (must read 81.03 %), weight-only PTQ at 8/6/5/4/3/2 bits with every clipping method, and W8A8, W4A8.
Calibration: 256 images of train.npz; score: all 10,000 images of test.npz.

    .venv/bin/python bench/ptq_resnet20.py            # writes bench/results/ptq_resnet20.md
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result  # noqa: E402

from quant import Allocation, QuantConfig, apply_allocation, discover_layers  # noqa: E402
from zoo import evaluate, load_model, load_npz  # noqa: E402

CLIPS = ["minmax", "percentile", "mse", "aciq", "output_mse", "auto"]
WEIGHT_BITS = ["8", "6", "5", "4", "3", "2"]


def main() -> None:
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    calib = load_npz(CIFAR_TRAIN, loaded.normalisation).take(256, seed=0)
    names = [l.name for l in discover_layers(loaded.model, calib.x[:2])]
    t0 = time.perf_counter()
    fp = evaluate(loaded.model, test)
    print(f"FP32 {fp.top1:.2f} % ({time.perf_counter() - t0:.1f} s)", flush=True)

    def run(bits: str, clip: str, **kw) -> tuple[float, float]:
        t = time.perf_counter()
        cfg = QuantConfig(weight_clip=clip, percentile=99.9 if clip == "percentile" else 99.99, **kw)
        q = apply_allocation(loaded.model, Allocation.uniform(names, bits), calib, cfg)
        r = evaluate(q, test)
        print(f"{bits:>4} {clip:<11} {r.top1:6.2f} % ({time.perf_counter() - t:.1f} s)", flush=True)
        return r.top1, time.perf_counter() - t

    rows = {b: {c: run(b, c)[0] for c in CLIPS} for b in WEIGHT_BITS}
    bc = {b: run(b, "auto", bias_correction=True)[0] for b in ("4", "3", "2")}
    act = {b: {c: run(b, c)[0] for c in ("minmax", "auto")} for b in ("8/8", "4/8")}

    lines = [
        "### PTQ of ResNet-20 on CIFAR-10 (JPEG test set, 10,000 images)",
        "",
        f"Command: `.venv/bin/python bench/ptq_resnet20.py`. Machine: {machine()}.",
        "Calibration: 256 images of train.npz. Per-channel symmetric weights; activations (where quantized)",
        "per-tensor, unsigned after ReLU, min-max range. Percentile clipping at 99.9 % for weights.",
        "",
        f"FP32: **{fp.top1:.2f} %**",
        "",
        "| weight bits (A: FP32) | " + " | ".join(CLIPS) + " | auto + bias corr. |",
        "|---|" + "---:|" * (len(CLIPS) + 1),
    ]
    for b in WEIGHT_BITS:
        cells = [f"{rows[b][c]:.2f}" for c in CLIPS]
        lines.append(f"| W{b} | " + " | ".join(cells) + f" | {bc[b]:.2f} |" if b in bc else
                     f"| W{b} | " + " | ".join(cells) + " | — |")
    lines += ["", "| W/A | minmax | auto |", "|---|---:|---:|"]
    for b in act:
        lines.append(f"| W{b.replace('/', 'A')} | {act[b]['minmax']:.2f} | {act[b]['auto']:.2f} |")
    out = "\n".join(lines) + "\n"
    print(out)
    print("wrote", write_result("ptq_resnet20.md", out))


if __name__ == "__main__":
    main()
