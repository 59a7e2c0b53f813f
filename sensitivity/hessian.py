"""`hessian`: HAWQ-V2/V3 sensitivity from per-layer Hessian traces.

For layer l with n_l weights and the weight error ΔW_l(b) = Q_b(W_l) − W_l of its deployed quantizer (for a
named scheme — int-g, FP8, MXFP4, NVFP4 — that scheme's own quantize-dequantize: its grid, groups, scales),

    value(l, b) = ½ · Tr(H_l) / n_l · ‖ΔW_l(b)‖²

the second-order increase of the mean task loss when ΔW_l is taken as isotropic noise of that energy (HAWQ's
Ω is twice this; the ½ makes the values a loss increase, comparable with the other methods). H_l is the
diagonal block of the Hessian of the mean cross-entropy over the sensitivity data. Only weights are covered:
a value depends on the option's weight bits alone (float weights: the float16 rounding error, or 0).

Two trace estimators:

* ``gauss-newton-exact`` (default where valid). When the network output is linear in each layer's weights
  with the rest fixed (Conv/Linear, ReLU-like activations, max/avg pooling, BatchNorm in eval, residual
  adds, reshapes), the term Σ_c ∂ℓ/∂f_c · ∂²f_c/∂W_l² of the Hessian vanishes inside a diagonal block, so
  H_l = J_lᵀ H_f J_l exactly, with H_f = diag(p) − ppᵀ the cross-entropy Hessian in the logits. Writing
  H_f = Σ_k u_k u_kᵀ with u_k = √p_k (e_k − p) (exact, since Σp = 1),

      Tr(H_l) = 1/N Σ_n Σ_k ‖∂(u_{n,k}·f(x_n)) / ∂W_l‖²,

  i.e. squared norms of per-sample gradients, one backward pass per class per batch. The per-sample weight
  gradients come from each layer's input and output gradient (a batched matrix product per layer), not
  from per-sample backward passes. With more than ``gn_max_classes`` classes, ``gn_columns`` random
  Rademacher combinations of the u_k replace them (unbiased, ``gauss-newton-mc``, with a standard error).
  Validity is checked structurally (module types, shared layers, 2-D logits) and numerically: on a few
  samples, along a random direction per layer, the dropped term is compared with the full Hessian term.
* ``hutchinson``: Rademacher probes v, Hessian-vector products by double backpropagation. By default all
  layers share each probe (one HVP over all quantized weights per probe, split by layer as v_lᵀ(Hv)_l);
  ``probing="per-layer"`` probes each block on its own (PyHessian/HAWQ style, L times the HVPs, smaller
  variance). Probing stops when every layer's standard error is within ``tol`` of its mean, or at
  ``max_probes``.

Method parameters (``SensitivityOptions.params``): ``estimator`` ("auto" | "gauss-newton" | "hutchinson"),
``check`` (numerical GN check, default True), ``check_samples`` (4), ``check_rtol`` (1e-3), ``probing``
("joint" | "per-layer"), ``tol`` (0.05), ``min_probes`` (8), ``max_probes`` (200), ``keep_graph``
("auto" | bool: keep the first-order graphs between probes), ``probe_batch`` (1: probes per vmapped
double-backward pass), ``gn_max_classes`` (100), ``gn_columns`` (16).

The loss is the mean cross-entropy over the context's data, with its labels or, without labels, the float
model's own argmax predictions. The exact Gauss-Newton trace does not depend on the labels at all (H_f
does not); Hutchinson's full Hessian does, through its off-diagonal blocks.

Building blocks, usable on their own (`fisher` shares the plumbing): `gauss_newton_traces`,
`hutchinson_traces` (→ `TraceResult`), `gn_structure_check`, `gn_numeric_check`, `PerSampleGrads`
(per-sample weight gradients of a layer from its input and output gradient), `capture_forward`,
`quantizer_wrappers` / `weight_error` / `weight_noise_sq` (the deployed weight error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.apply import QuantizedLayer
from quant.errors import BitsearchError
from quant.registry import check_choice, check_positive

from .base import SensitivityContext, SensitivityMethod, register_method
from .plumbing import (  # noqa: F401  (public here too: the hessian method's building blocks)
    Batch,
    Capture,
    Progress,
    PerSampleGrads,
    capture_forward,
    labels_for,
    only_weights_require_grad,
    quantizer_wrappers,
    weight_error,
    weight_key,
    weight_noise_sq,
    weight_option,
)
from .table import SensitivityTable
from .traces import TraceResult, _rademacher, gauss_newton_traces, hutchinson_traces  # noqa: F401

# --- when is the Gauss-Newton block the Hessian block? ---------------------------------------------------

#: Leaf modules that keep the network piecewise linear in each layer's weights (BatchNorm: in eval mode).
PIECEWISE_LINEAR = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Hardsigmoid, nn.Softshrink,
    nn.Hardshrink, nn.Threshold,
)  # fmt: skip


#: Leaf modules known not to be piecewise linear in their input.
NOT_PIECEWISE_LINEAR = (
    nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Hardswish, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.MultiheadAttention, nn.RNNBase, nn.Bilinear, nn.GLU, nn.RMSNorm,
)  # fmt: skip

#: Class-name endings of transformer blocks (any library): softmax attention and normalisation layers make the
#: output non-linear in the weights before them, so the Gauss-Newton block is not the Hessian block there.
TRANSFORMER_BLOCKS = ("Attention", "SdpaAttention", "RMSNorm", "LayerNorm", "Norm")


def gn_structure_check(
    model: nn.Module, modules: dict[str, nn.Module], calls: dict[str, int]
) -> tuple[bool, list[str], str]:
    """(possible, unverified module types, reason): a conservative check of the module structure.

    Not possible: a quantizable layer that runs more than once (its output is then not linear in its
    weights), BatchNorm in training mode, a leaf module known not to be piecewise linear (Tanh, GELU,
    LayerNorm, attention...), or a leaf module of an unknown type with parameters.
    Parameter-free leaf modules of unknown types and functional ops in `forward` are left to the numerical
    check (listed as unverified).
    """
    shared = [n for n, c in calls.items() if c > 1]
    if shared:
        return False, [], f"layers run more than once per forward (weights shared): {shared[:3]}"
    blocks = [(n, type(m).__name__) for n, m in model.named_modules() if type(m).__name__.endswith(TRANSFORMER_BLOCKS)]
    if blocks:  # e.g. Hugging Face LlamaAttention, LlamaRMSNorm
        kinds = sorted({k for _, k in blocks})
        return False, [], (
            f"attention or normalisation modules ({', '.join(kinds)}; first {blocks[0][0]!r}) make the output "
            "non-linear in the weights: the Gauss-Newton block is not the Hessian block"
        )
    unverified: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return False, [], f"BatchNorm {name!r} is in training mode"
        if any(True for _ in m.children()):
            if type(m) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
                unverified.add(type(m).__name__)  # its forward may apply functional ops
            continue
        if isinstance(m, NOT_PIECEWISE_LINEAR):
            return False, [], f"module {name!r} ({type(m).__name__}) is not piecewise linear"
        if isinstance(m, PIECEWISE_LINEAR):
            continue
        if isinstance(m, QuantizedLayer):
            return False, [], "the model is already wrapped for quantization"
        if any(True for _ in m.parameters(recurse=False)):
            return False, [], f"module {name!r} ({type(m).__name__}) is not known to be piecewise linear"
        unverified.add(type(m).__name__)
    return True, sorted(unverified), "structure ok"


def gn_numeric_check(
    model: nn.Module,
    modules: dict[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """Per layer, |v_lᵀ R_l v_l| / |v_lᵀ H_l v_l| on a few samples along a random direction v_l.

    R_l = Σ_c ∂ℓ/∂f_c ∇²_{W_l} f_c is what the Gauss-Newton block drops from the Hessian block H_l; it is
    exactly zero (autograd treats ReLU masks and pooling indices as constants) where the network is
    piecewise linear in W_l.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    names = list(modules)
    weights = [modules[n].weight for n in names]
    out: dict[str, float] = {}
    with only_weights_require_grad(model, modules):
        f = model(x)
        resid = (torch.softmax(f.detach(), 1) - F.one_hot(y, f.shape[1]).to(f.dtype)).detach()
        s = (f * resid).sum()
        g_s = torch.autograd.grad(s, weights, create_graph=True)
        g_loss = None
        for name, w, gs in zip(names, weights, g_s):
            v = _rademacher(w, gen)
            dropped = _vhv(gs, w, v)
            if dropped == 0:  # the piecewise-linear case: no need for the full term
                out[name] = 0.0
                continue
            if g_loss is None:
                loss = F.cross_entropy(f, y, reduction="sum")
                g_loss = dict(zip(names, torch.autograd.grad(loss, weights, create_graph=True)))
            full = _vhv(g_loss[name], w, v)
            out[name] = abs(dropped) / max(abs(full), 1e-300)
    return out


def _vhv(g: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> float:
    if not g.requires_grad:
        return 0.0
    (h,) = torch.autograd.grad((g * v).sum(), w, retain_graph=True, allow_unused=True)
    return 0.0 if h is None else float((h * v).double().sum())


# --- the method ------------------------------------------------------------------------------------------

_ESTIMATORS = ("auto", "gauss-newton", "hutchinson")


def _sub(progress: Progress, lo: float, hi: float) -> Progress:
    """`progress` mapped onto [lo, hi], never going backwards (estimates of the remaining work vary)."""
    done = [lo]

    def fn(frac: float, msg: str) -> None:
        done[0] = max(done[0], lo + (hi - lo) * min(max(frac, 0.0), 1.0))
        progress(done[0], msg)

    return fn


@register_method
class HessianMethod(SensitivityMethod):
    """HAWQ-V2/V3 Hessian-trace sensitivity (weights only); see the module docstring."""

    name = "hessian"
    supports_schemes = True  # ΔW = Q(W) − W from each option's own quantize-dequantize (schemes included)
    covers_activations = False
    needs_labels = False

    @dataclass
    class Config:
        """Settings; see the module docstring."""

        estimator: str = "auto"
        check: bool = True
        check_samples: int = 4
        check_rtol: float = 1e-3
        probing: str = "joint"
        tol: float = 0.05
        min_probes: int = 8
        max_probes: int = 200
        keep_graph: Any = "auto"
        probe_batch: int = 1
        gn_max_classes: int = 100
        gn_columns: int = 16

        def __post_init__(self) -> None:
            check_choice(self.estimator, _ESTIMATORS, "estimator")
            check_choice(self.probing, ("joint", "per-layer"), "probing")
            check_choice(self.keep_graph, ("auto", True, False), "keep_graph")
            for k in ("check_samples", "min_probes", "max_probes", "probe_batch", "gn_max_classes", "gn_columns"):
                check_positive(getattr(self, k), k, integer=True)
            if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol >= 0:
                raise BitsearchError(f"tol must be a number >= 0 (0: always run max_probes), got {self.tol!r}")
            check_positive(self.check_rtol, "check_rtol")
            if self.min_probes > self.max_probes:
                raise BitsearchError("min_probes must not exceed max_probes")

    @staticmethod
    def _gauss_newton_valid(ctx, modules, batches, prm) -> tuple[bool, dict[str, Any]]:
        """Whether the exact Gauss-Newton route gives the Hessian blocks here, and the evidence."""
        ok, unverified, reason = gn_structure_check(ctx.model, modules, {l.name: l.calls for l in ctx.layers})
        check: dict[str, Any] = {"structure": reason, "unverified_modules": unverified}
        xs = torch.cat([x for x, _ in batches])[: int(prm.get("check_samples", 4))]
        ys = torch.cat([y for _, y in batches])[: xs.shape[0]]
        if ok:
            with torch.no_grad():
                out_shape = tuple(ctx.model(xs).shape)
            if len(out_shape) != 2:
                ok, check["decision"] = (
                    False,
                    f"hutchinson: the output {out_shape} is not (N, classes) logits",
                )
        if ok and prm.get("check", True):
            rtol = float(prm.get("check_rtol", 1e-3))
            try:
                ratios = gn_numeric_check(ctx.model, modules, xs, ys, ctx.options.seed)
            except (RuntimeError, BitsearchError) as exc:  # e.g. an op without a double-backward formula
                ok, check["decision"] = (
                    False,
                    f"hutchinson: the numerical check failed ({type(exc).__name__}: {exc})",
                )
            else:
                worst = max(ratios.values())
                check.update(numeric_max_ratio=worst, numeric_rtol=rtol, numeric_samples=int(xs.shape[0]))
                if worst > rtol:
                    layer = max(ratios, key=ratios.get)
                    ok, check["decision"] = (
                        False,
                        (
                            f"hutchinson: layer {layer!r} has curvature the Gauss-Newton block drops "
                            f"({worst:.2g} of the block along a random direction)"
                        ),
                    )
        elif ok and unverified:
            ok = False
            check["decision"] = (
                f"hutchinson: module types {unverified} are unverified and the numerical check is off"
            )
        elif not ok:
            check.setdefault("decision", f"hutchinson: {reason}")
        if ok:
            check["decision"] = "gauss-newton: exact for this network"
        return ok, check

    def compute(self, ctx: SensitivityContext) -> SensitivityTable:
        prm = dict(ctx.options.params)
        estimator = prm.get("estimator", "auto")
        if estimator not in _ESTIMATORS:
            raise BitsearchError(f"hessian estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
        modules = ctx.modules()
        names = [l.name for l in ctx.layers]
        seed = ctx.options.seed
        progress = ctx.progress

        t0 = time.perf_counter()
        noise = weight_noise_sq(ctx, _sub(progress, 0.0, 0.05))
        t1 = time.perf_counter()
        batches, given = labels_for(ctx.model, ctx.batches())

        check: dict[str, Any] = {}
        use_gn = estimator == "gauss-newton"
        if estimator == "auto":
            use_gn, check = self._gauss_newton_valid(ctx, modules, batches, prm)
            progress(0.1, "Gauss-Newton validity checked")

        t2 = time.perf_counter()
        sub = _sub(progress, 0.1, 1.0)
        if use_gn:
            res = gauss_newton_traces(
                ctx.model, modules, batches,
                max_classes=int(prm.get("gn_max_classes", 100)), columns=int(prm.get("gn_columns", 16)),
                seed=seed, progress=sub,
            )  # fmt: skip
        else:
            res = hutchinson_traces(
                ctx.model, modules, batches,
                probing=prm.get("probing", "joint"), tol=float(prm.get("tol", 0.05)),
                min_probes=int(prm.get("min_probes", 8)), max_probes=int(prm.get("max_probes", 200)),
                keep_graph=prm.get("keep_graph", "auto"), probe_batch=int(prm.get("probe_batch", 1)),
                seed=seed, progress=sub,
            )  # fmt: skip
        t3 = time.perf_counter()
        res_by = dict(zip(res.names, range(len(res.names))))

        options = ctx.options.options
        values = np.zeros((len(names), len(options)))
        stderr = np.zeros_like(values)
        per_param: dict[str, float] = {}
        for i, layer in enumerate(ctx.layers):
            j = res_by[layer.name]
            t, se = res.trace[j] / layer.params, res.stderr[j] / layer.params
            per_param[layer.name] = float(t)
            for k, o in enumerate(options):
                values[i, k] = 0.5 * t * noise[layer.name][weight_option(o)]
                stderr[i, k] = 0.5 * se * noise[layer.name][weight_option(o)]
        progress(1.0, "done")
        estimator_name = res.estimator
        labels = "given" if given else "float model argmax"
        settings = {
            "estimator": estimator_name,
            "estimator_requested": estimator,
            "value": "0.5 * Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2 (HAWQ Omega / 2; weights only)",
            "loss": "mean cross-entropy over the sensitivity data",
            "labels": labels if not estimator_name.startswith("gauss-newton") else f"{labels} (unused by GN)",
        }
        if estimator_name == "hutchinson":
            settings.update({k: res.details[k] for k in ("probing", "tol", "keep_graph", "probe_batch")})
            settings.update(
                min_probes=int(prm.get("min_probes", 8)), max_probes=int(prm.get("max_probes", 200))
            )
        extra = {
            "estimator": estimator_name,
            "trace": res.as_dict(),
            "trace_stderr": {n: float(s) for n, s in zip(res.names, res.stderr)},
            "trace_per_param": per_param,
            "weight_noise_sq": {n: {weight_key(b): v for b, v in d.items()} for n, d in noise.items()},
            "probes": res.probes,
            "gn_check": check,
        }
        if res.details.get("probes_per_layer"):
            extra["probes_per_layer"] = dict(zip(res.names, res.details["probes_per_layer"]))
        passes = res.forward_passes + res.backward_passes + res.hvp_passes
        cost = {
            "passes": passes,
            "forward_passes": res.forward_passes,
            "backward_passes": res.backward_passes,
            "hvp_passes": res.hvp_passes,
            "seconds_weight_error": t1 - t0,
            "seconds_check": t2 - t1,
            "seconds_traces": t3 - t2,
        }
        return SensitivityTable(
            method=self.name, layers=list(ctx.layers), options=options, values=values, stderr=stderr,
            covers_activations=False, settings=settings, cost=cost, extra=extra,
        )  # fmt: skip
