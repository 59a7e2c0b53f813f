"""`fisher`: empirical-Fisher (Taylor) sensitivity of weights and input activations, as in AutoQuantize.

The loss increase of quantizing layer l alone is estimated to second order with the diagonal empirical
Fisher in place of the Hessian, per sample n (ℓ_n: the sample's cross-entropy):

    weights:      W_l(b) = ½ · 1/N Σ_n Σ_i (∂ℓ_n/∂W_l,i)² · ΔW_l,i(b)²          = ½ Σ_i F_i ΔW_i²
    activations:  A_l(a) = ½ · 1/N Σ_n Σ_j (∂ℓ_n/∂x_l,n,j)² · Δx_l,n,j(a)²

with F = 1/N Σ_n g_n ⊙ g_n the empirical Fisher diagonal from **per-sample** gradients (not per-batch),
ΔW(b) = Q_b(W) − W from the layer's deployed weight quantizer (for a named scheme — int-g, FP8, MXFP4,
NVFP4 — that scheme's own quantize-dequantize: its grid, groups and scales) and Δx(a) = Q_a(x) − x the quantization noise
of the layer's own input x (the float model's activation), with the input quantizer calibrated exactly as
`QuantizedLayer` calibrates it (`wrap_model` + `collect_statistics` on the sensitivity data, `set_bits`).
The activation term pairs each sample's squared input gradient with that sample's own noise.

    value(l, (b, a)) = W_l(b) + A_l(a)          (additive; the cross term is dropped)

Standard errors are over samples: the std of the per-sample values of W_l(b) + A_l(a), divided by √N.
Per-sample weight gradients come from each layer's input and output gradient (one backward pass per batch,
a batched matrix product per layer); the input gradient is taken on a private alias of the layer's input,
so it is the gradient through that layer only. Labels: the data's, or the float model's own argmax.
Float options cost the float16 rounding error (16 bits) or nothing (32 bits).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from quant.allocation import LayerBits, is_float_bits
from quant.apply import weights_need_data

from .base import SensitivityContext, SensitivityMethod, register_method
from .plumbing import (
    PerSampleGrads,
    capture_forward,
    labels_for,
    only_weights_require_grad,
    quantizer_wrappers,
    weight_error,
    weight_key,
    weight_option,
    weight_options,
)
from .table import SensitivityTable


@register_method
class FisherMethod(SensitivityMethod):
    """Diagonal empirical Fisher × squared quantization noise, for weights and input activations."""

    name = "fisher"
    supports_schemes = True  # ΔW = Q(W) − W from each option's own quantize-dequantize (schemes included)
    covers_activations = True
    needs_labels = False

    def compute(self, ctx: SensitivityContext) -> SensitivityTable:
        opts = ctx.options
        # Weight options: the config's integer bits and named schemes alike (each with its own ΔW).
        wbits, abits = weight_options(opts.options), list(opts.activation_bits)
        int_acts = any(not is_float_bits(a) for a in abits)
        need_stats = int_acts or (
            weights_need_data(opts.quant) and any(not is_float_bits(b.weight_bits) for b in wbits)
        )
        ctx.progress(0.0, "calibrating quantizers")
        wrappers = quantizer_wrappers(ctx, need_stats)
        modules = ctx.modules()
        names = [l.name for l in ctx.layers]

        # ΔW² per layer and weight option, (n_w, numel); input quantizers per layer and activation option.
        dw2: dict[str, torch.Tensor] = {}
        in_q: dict[str, list] = {}
        noise_sq: dict[str, dict[str, float]] = {}
        for name in names:
            q = wrappers[name]
            errs = [weight_error(q, b).flatten().double() for b in wbits]
            dw2[name] = torch.stack(errs).pow(2)
            noise_sq[name] = {weight_key(b): float(e.pow(2).sum()) for b, e in zip(wbits, errs)}
            quants = []
            for a in abits:
                q.set_bits(LayerBits(32, a))
                quants.append(q.input_quant)
            in_q[name] = quants
        ctx.progress(0.1, "quantizers ready")

        batches, given = labels_for(ctx.model, ctx.batches())
        w_parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # per batch (n, n_w)
        a_parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # per batch (n, n_a)
        fisher_trace = dict.fromkeys(names, 0.0)
        total_n = 0
        with only_weights_require_grad(ctx.model, modules):
            for bi, (x, y) in enumerate(batches):
                f, cap = capture_forward(ctx.model, modules, x, alias_inputs=True)
                loss = F.cross_entropy(f, y, reduction="sum")  # per-sample gradients of ℓ_n
                outs = [o for n in names for o in cap.outputs[n]]
                ins = [i for n in names for i in cap.inputs[n]]
                grads = torch.autograd.grad(loss, outs + ins, allow_unused=True)
                g_out, g_in = grads[: len(outs)], grads[len(outs) :]
                pos = 0
                nb = x.shape[0]
                total_n += nb
                for name in names:
                    k = len(cap.outputs[name])
                    go = [
                        torch.zeros_like(o) if g is None else g
                        for g, o in zip(g_out[pos : pos + k], outs[pos : pos + k])
                    ]
                    gi = g_in[pos : pos + k]
                    xi = ins[pos : pos + k]
                    pos += k
                    psg = PerSampleGrads(modules[name], [t.detach() for t in xi])
                    wp = []
                    for sl in psg.chunks(nb):
                        g2 = psg.grads(go, sl).flatten(1).double().pow(2)  # (chunk, numel)
                        fisher_trace[name] += float(g2.sum())
                        wp.append(0.5 * g2 @ dw2[name].T)
                    w_parts[name].append(torch.cat(wp))
                    ap = torch.zeros(nb, len(abits), dtype=torch.float64)
                    with torch.no_grad():
                        for xin, gx in zip(xi, gi):
                            if gx is None:
                                continue
                            xin = xin.detach()
                            gx2 = gx.detach().double().pow(2).flatten(1)
                            for j, iq in enumerate(in_q[name]):
                                dx = (iq(xin) - xin).double().flatten(1)
                                ap[:, j] += 0.5 * (gx2 * dx.pow(2)).sum(1)
                    a_parts[name].append(ap)
                del cap, f, loss, grads
                ctx.progress(0.1 + 0.9 * (bi + 1) / len(batches), f"Fisher: batch {bi + 1}/{len(batches)}")

        options = opts.options
        values = np.zeros((len(names), len(options)))
        stderr = np.zeros_like(values)
        widx = {b: i for i, b in enumerate(wbits)}
        aidx = {a: i for i, a in enumerate(abits)}
        w_mean, a_mean = {}, {}
        for i, name in enumerate(names):
            W = torch.cat(w_parts[name]).numpy()  # (N, n_w)
            A = torch.cat(a_parts[name]).numpy()  # (N, n_a)
            w_mean[name] = {weight_key(b): float(W[:, widx[b]].mean()) for b in wbits}
            a_mean[name] = {str(a): float(A[:, aidx[a]].mean()) for a in abits}
            for j, o in enumerate(options):
                per_sample = W[:, widx[weight_option(o)]] + A[:, aidx[o.activation_bits]]
                values[i, j] = per_sample.mean()
                stderr[i, j] = (
                    per_sample.std(ddof=1) / math.sqrt(len(per_sample)) if len(per_sample) > 1 else np.nan
                )
        ctx.progress(1.0, "done")
        settings = {
            "fisher": "empirical, per-sample gradients (diagonal)",
            "value": "W_l(b) + A_l(a), additive: 0.5*sum(F*dW^2) + 0.5*mean_n sum((dl_n/dx)^2 * dx_n^2)",
            "stderr": "over samples",
            "loss": "cross-entropy per sample",
            "labels": "given" if given else "float model argmax",
        }
        extra = {
            "weight_part": w_mean,
            "activation_part": a_mean,
            "fisher_trace": {n: v / total_n for n, v in fisher_trace.items()},
            "weight_noise_sq": noise_sq,
        }
        cost = {
            "passes": 2 * len(batches) + (1 if need_stats else 0),
            "forward_passes": len(batches),
            "backward_passes": len(batches),
        }
        return SensitivityTable(
            method=self.name, layers=list(ctx.layers), options=options, values=values, stderr=stderr,
            covers_activations=True, settings=settings, cost=cost, extra=extra,
        )  # fmt: skip
