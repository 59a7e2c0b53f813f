"""QAT of the shared ResNet-20 on the shared CIFAR-10 (JPEG): step-time overhead and accuracy.

(1) Step time: one SGD step (batch 128, CPU) of the plain FP32 model against the same step of the LSQ W4A4
    fake-quant model, interleaved in one process; the ratio of the medians.
(2) Accuracy, top-1 on all of test.npz: (a) the FP32 model fine-tuned for --steps steps (the fair baseline:
    the pretrained model has never seen these JPEG images), and uniform W4A4 and W3A4 (every layer, the first
    and last included) each fine-tuned from the pretrained model with the same recipe and number of steps;
    (b) W4A4 fine-tuned from that fine-tuned FP32 model (KD from it) against FP32 fine-tuned as many further
    steps.

    .venv/bin/python bench/qat.py --steps 200          # writes bench/results/qat.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import CIFAR_TEST, CIFAR_TRAIN, RESNET20, machine, require_shared, write_result  # noqa: E402

from quant import Allocation, discover_layers  # noqa: E402
from quant.qat import PrintProgress, QATRecipe, QATTrainer, finetune, strip_quantizers  # noqa: E402
from zoo import load_model, load_npz  # noqa: E402


def step_timing(model, names, train, recipe: QATRecipe, rounds: int) -> dict[str, float]:
    """Median seconds per training step, FP32 vs LSQ W4A4, measured alternately on the same batch."""
    trainer = QATTrainer(model, Allocation.uniform(names, "4/4"), train, recipe)
    trainer._train_mode()
    xb, yb = trainer._batch(0)
    fp = copy.deepcopy(model).to(trainer.device).train()
    opt = torch.optim.SGD(fp.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    cuda = trainer.device.type == "cuda"

    def fp_step():
        with trainer._autocast():  # the same precision as the QAT step (bf16 autocast on CUDA)
            loss = F.cross_entropy(fp(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def qat_step():
        loss = trainer._loss(xb, yb, 0)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    for f in (fp_step, qat_step, fp_step, qat_step):  # warm-up (allocator, oneDNN primitives)
        f()
    def timed(f) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        if cuda:  # kernels run asynchronously: the step ends when the GPU is done
            torch.cuda.synchronize()
        return time.perf_counter() - t

    t_fp, t_q = [], []
    for _ in range(rounds):
        t_fp.append(timed(fp_step))
        t_q.append(timed(qat_step))
    f, q = statistics.median(t_fp), statistics.median(t_q)
    return {"fp32": f, "qat": q, "ratio": q / f}


def gpu_name() -> str:
    return f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps of every model (default 200)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--bn", default="train", choices=["train", "frozen", "reestimate"])
    ap.add_argument("--distill", action="store_true", help="(a) with KD from the pretrained FP32 model")
    ap.add_argument("--bits", default="4/4,3/4", help="comma-separated uniform W/A options (default 4/4,3/4)")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                    help="also (b): QAT from the fine-tuned FP32 model with KD, against FP32 with as many steps")
    ap.add_argument("--pipeline-bits", default="4/4", help="the quantized options run in (b) (default 4/4)")
    ap.add_argument("--timing-rounds", type=int, default=8, help="interleaved FP32/QAT steps timed (0: skip)")
    ap.add_argument("--no-accuracy", action="store_true", help="only the step-time measurement")
    ap.add_argument("--eval-items", type=int, default=None, help="score on N test images drawn at random (default all)")
    ap.add_argument("--train-items", type=int, default=None, help="train on N train images drawn at random (default all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu (fp32), or cuda (bf16 autocast, as the trainer runs there)")
    ap.add_argument("--out", default="qat.md", help="file name under bench/results/")
    args = ap.parse_args()

    require_shared(RESNET20, CIFAR_TRAIN, CIFAR_TEST)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loaded = load_model("zoo:cifar-resnet20", RESNET20)
    # The shared files are sorted by class: a subset must be drawn at random, never the first N.
    train = load_npz(CIFAR_TRAIN, loaded.normalisation)
    test = load_npz(CIFAR_TEST, loaded.normalisation)
    if args.train_items:
        train = train.take(args.train_items, seed=0)
    if args.eval_items:
        test = test.take(args.eval_items, seed=1)
    calib = train.take(256, seed=0)
    names = [l.name for l in discover_layers(loaded.model, calib.x[:2])]
    recipe = QATRecipe(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, bn=args.bn,
        device=args.device,
    )
    command = "`.venv/bin/python bench/qat.py " + " ".join(sys.argv[1:]) + "`"
    lines = [
        "### QAT of ResNet-20 on CIFAR-10 (JPEG)",
        "",
        f"Command: {command}. Machine: {machine()}"
        + (f", {gpu_name()}, bf16 autocast" if args.device == "cuda" else "") + ".",
        "",
    ]

    if args.timing_rounds:
        tm = step_timing(loaded.model, names, train, recipe, args.timing_rounds)
        print(f"step time: FP32 {tm['fp32'] * 1e3:.0f} ms, LSQ W4A4 {tm['qat'] * 1e3:.0f} ms, ratio {tm['ratio']:.2f}",
              flush=True)
        lines += [
            f"**Step time** (batch {args.batch_size}, SGD, forward + backward + update, median of "
            f"{args.timing_rounds} interleaved steps on {gpu_name() if args.device == 'cuda' else 'CPU'}):",
            "",
            "| FP32 step | LSQ W4A4 step | ratio |",
            "|---:|---:|---:|",
            f"| {tm['fp32'] * 1e3:.0f} ms | {tm['qat'] * 1e3:.0f} ms | **{tm['ratio']:.2f}×** |",
            "",
        ]

    if not args.no_accuracy:
        kd = QATRecipe(**{**recipe.to_dict(), "distill": True})

        def run(label, model, bits, r, tag=""):
            res = finetune(
                model, Allocation.uniform(names, bits), train, r, calibration=calib, eval_data=test,
                callbacks=PrintProgress(every=50, prefix=f"[{tag}{label}] "),
            )
            start, end = res.initial_metrics["top1"], res.metrics["top1"]
            print(f"{tag}{label}: start {start:.2f} % -> {end:.2f} % after {res.steps} steps "
                  f"({res.train_seconds:.0f} s training, {res.seconds:.0f} s total)", flush=True)
            return res, (label, start, end, res.steps, res.train_seconds, res.seconds)

        def table(rows, ref_label, start_label):
            out = [
                f"| model | before | after | vs {ref_label} | steps | training s | total s |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            ref = rows[0][2]
            for label, start, end, steps, ts, tt in rows:
                delta = "—" if label.startswith("FP32") else f"**{end - ref:+.2f}**"
                before = f"{start:.2f}" + (f" ({start_label})" if label.startswith("FP32") else " (PTQ)")
                out.append(f"| {label} | {before} | **{end:.2f}** | {delta} | {steps} | {ts:.0f} | {tt:.0f} |")
            return out

        qbits = [(f"W{b.split('/')[0]}A{b.split('/')[1]}", b) for b in args.bits.split(",") if b]
        fp_res, fp_row = run("FP32", loaded.model, "fp", recipe)
        rows = [fp_row] + [run(label, loaded.model, b, kd if args.distill else recipe)[1] for label, b in qbits]
        n_test = len(test)
        lines += [
            f"**Accuracy** (top-1 on {n_test:,} test images of test.npz; training on train.npz, 256 of its images "
            f"for calibration). Recipe of every run: SGD momentum 0.9, lr {args.lr} cosine, weight decay "
            f"{args.weight_decay}, batch {args.batch_size}, BN {args.bn}, {args.steps} steps. LSQ weights per "
            "channel, LSQ activations per tensor (unsigned after ReLU; LSQ+ with a learned offset for the "
            "normalised image), steps initialised from MSE-calibrated ranges; every layer quantized, the first "
            "and last included. 'Before' is that initialisation (PTQ). The pretrained model never saw JPEG "
            "images, so fine-tuning alone gains FP32 several points.",
            "",
            f"(a) Equal steps from the pretrained model: FP32, and each quantized model{' (KD from FP32)' if args.distill else ''}, "
            f"fine-tuned {args.steps} steps; the quantized runs adapt to the data and to quantization in the same "
            "steps.",
            "",
        ]
        lines += table(rows, "fine-tuned FP32", "pretrained")
        lines.append("")
        if args.pipeline:
            # (b) the usual pipeline: QAT starts from the fine-tuned FP32 model, with KD from it; the FP32
            # reference gets the same further steps. The next data (seed + 1) is used for both.
            ft = strip_quantizers(fp_res.model)
            nxt = QATRecipe(**{**recipe.to_dict(), "seed": recipe.seed + 1})
            nxt_kd = QATRecipe(**{**nxt.to_dict(), "distill": True})
            rows_b = [run("FP32", ft, "fp", nxt, tag="(b) ")[1]]
            rows_b += [run(label, ft, b, nxt_kd, tag="(b) ")[1] for label, b in qbits if b in args.pipeline_bits.split(",")]
            lines += [
                f"(b) From the fine-tuned FP32 model above: {args.steps} further steps for FP32 and for each "
                f"quantized model (KD from the fine-tuned FP32, T 4, α 0.5), so both have {2 * args.steps} steps "
                "in total.",
                "",
            ]
            lines += table(rows_b, f"FP32 after {2 * args.steps} steps", f"after {args.steps} steps")
            lines.append("")
    lines.append(f"Wall time of the whole script: {time.perf_counter() - t_start:.0f} s.")
    out = "\n".join(lines) + "\n"
    print(out)
    print("wrote", write_result(args.out, out))


if __name__ == "__main__":
    main()
