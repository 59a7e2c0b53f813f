"""End to end with QAT: a searched mixed W/A allocation against uniform W3A4 at the same size and BOPs,
both fine-tuned with exactly the recipe and steps of `bench/qat.py` (HAWQ-V3's comparison, on our data).

    .venv/bin/python bench/qat_mixed.py                      # -> bench/results/qat_mixed.md
    .venv/bin/python bench/qat_mixed.py --which refined      # the refined point instead of the recommendation

The allocation comes from `bench/results/search_selection.json` (written by `bench/search_selection.py`),
row "W/A", budget "size+BOPs of W3A4": the recommendation (`--which rec`, default), the refined solver
point (`refined`) or the mixed contender of the paired test (`contender`). Training: train.npz (256 random
images calibrate), recipe of bench/qat.py (SGD momentum 0.9, lr 0.01 cosine, weight decay 1e-4, batch 128,
BN train, LSQ, --steps steps, one thread). Scored on the 8,000 **report** images of test.npz (the same
`split_roles(10000, 2000, seed=0)` split: never used to choose the allocation); paired Δ with exact
McNemar test and bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, RESULTS, machine, require_shared, write_result

from quant import Allocation, LayerBits, discover_layers
from quant.cost import CostModel
from quant.qat import QATRecipe, finetune
from search.selection import mean_interval, paired_test, split_roles
from zoo import evaluate, load_model, load_npz


def parse_label(text: str) -> LayerBits:
    m = re.fullmatch(r"W(\d+)A(\d+|fp)", text)
    if not m:
        raise SystemExit(f"cannot read the option {text!r}")
    return LayerBits(int(m.group(1)), 32 if m.group(2) == "fp" else int(m.group(2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="source", default=str(RESULTS / "search_selection.json"))
    ap.add_argument("--budget", default="size+BOPs of W3A4")
    ap.add_argument("--uniform", default="3/4")
    ap.add_argument("--which", default="rec", choices=["rec", "refined", "contender"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="qat_mixed.md")
    args = ap.parse_args()
    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = json.loads(Path(args.source).read_text())
    row = next(r for r in rows if r["setting"] == "W/A" and r["budget"] == args.budget)
    key = {"rec": "bits", "refined": "refined_bits", "contender": "contender_bits"}[args.which]
    if not row.get(key):
        raise SystemExit(f"{args.source} has no {key} for {args.budget}")
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    train = load_npz(CIFAR_TRAIN, loaded.normalisation)
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    report = test.subset(split_roles(len(test), 2000, seed=0).report)
    calib = train.take(256, seed=0)
    layers = discover_layers(loaded.model, calib.x[:2])
    names = [l.name for l in layers]
    mixed = Allocation({n: parse_label(b) for n, b in zip(names, row[key].split("/"))})
    uniform = Allocation.uniform(names, LayerBits.parse(args.uniform))
    cost = CostModel(layers)
    cm, cu = cost.cost(mixed), cost.cost(uniform)
    assert cm.avg_weight_bits <= cu.avg_weight_bits * (1 + 1e-9) and cm.bops <= cu.bops * (1 + 1e-9)
    recipe = QATRecipe(steps=args.steps, batch_size=128, lr=0.01, weight_decay=1e-4, bn="train")
    fp_logits = evaluate(loaded.model, report).logits
    results = {}
    for label, alloc in (("uniform", uniform), ("mixed", mixed)):
        torch.manual_seed(0)
        res = finetune(loaded.model, alloc, train, recipe, calibration=calib)
        r = evaluate(res.model, report, reference_logits=fp_logits)
        results[label] = (res, r)
        print(f"{label}: {r.top1:.2f} % on report after {res.steps} steps ({res.seconds:.0f} s)", flush=True)
    (ru, eu), (rm, em) = results["uniform"], results["mixed"]
    d = paired_test(
        em.per_sample["correct"].numpy(), eu.per_sample["correct"].numpy(), alternative="two-sided"
    )

    def fig(r):
        lo, hi = mean_interval(r.per_sample["correct"].numpy(), 0.95, 100.0)
        return f"**{r.top1:.2f}** [{lo:.2f}, {hi:.2f}]"

    cmd = "python bench/qat_mixed.py" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        "# QAT end to end: searched mixed W/A against uniform W3A4 at the same size and BOPs",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Mixed allocation ({args.which} of `{args.budget}`, recommended kind there: {row['rec_kind']}): "
        f"{cm.avg_weight_bits:.3f} avg weight bits, {cm.bops / 1e9:.3f} GBOPs; uniform W3A4: "
        f"{cu.avg_weight_bits:.3f}, {cu.bops / 1e9:.3f} GBOPs.",
        "",
        "| model | top-1 on report after QAT [95 %] | steps | training s |",
        "| --- | ---: | ---: | ---: |",
        f"| uniform W3A4 | {fig(eu)} | {ru.steps} | {ru.train_seconds:.0f} |",
        f"| mixed | {fig(em)} | {rm.steps} | {rm.train_seconds:.0f} |",
        "",
        f"Paired Δ mixed − uniform on the {d.n:,} report images: **{d.delta:+.2f}** points, 95 % interval "
        f"[{d.low:+.2f}, {d.high:+.2f}], exact McNemar two-sided p = {d.p_value:.3g}. Goal (mixed ≥ uniform + 1.0 "
        f"after the same steps): {'met' if d.delta >= 1.0 else '**not met**'} (one training seed each; run-to-run "
        "spread of QAT is not in this interval).",
        "",
        "Layers (" + ", ".join(names) + "): `" + row[key] + "`",
        "",
        f"Command: `.venv/bin/{cmd}` ({time.perf_counter() - t0:.0f} s). Machine: {machine()}; shared with other "
        "jobs, so wall-clock figures are on a loaded machine.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
