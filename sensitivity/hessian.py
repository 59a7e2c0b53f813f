"""`hessian`: HAWQ-V2/V3 sensitivity from per-layer Hessian traces.

For layer l with n_l weights and the weight error ΔW_l(b) = Q_b(W_l) − W_l of its deployed quantizer,

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

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.allocation import LayerBits, is_float_bits
from quant.apply import DATA_CLIPS, QuantizedLayer, _layer_forward, collect_statistics, wrap_model
from quant.errors import BitsearchError

from quant.registry import check_choice, check_positive

from .base import SensitivityContext, SensitivityMethod, register_method
from .table import SensitivityTable

Batch = tuple[torch.Tensor, torch.Tensor | None]
Progress = Callable[[float, str], None]

#: Elements of per-sample gradients materialised at once (chunks of samples keep memory bounded).
_PER_SAMPLE_BUDGET = 1 << 24
#: Elements of unfolded conv patches the Gauss-Newton route keeps between its backward passes (all layers).
_CACHE_BUDGET = 1 << 27


def _no_progress(frac: float, msg: str) -> None:
    pass


# --- model plumbing shared with `fisher` ---------------------------------------------------------------


@contextmanager
def only_weights_require_grad(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, exactly the quantizable layers' weights require grad (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


class Capture:
    """Forward hooks that keep every call's input and output of the given modules.

    With ``alias_inputs`` each module gets a private alias of its input, so a gradient taken with respect to
    ``inputs[name][i]`` is the part flowing through that module only (not through other consumers). With
    ``clone_outputs`` the network continues on a copy of each output, so in-place ops downstream (e.g.
    ``ReLU(inplace=True)`` right after a conv) cannot overwrite the captured output; `capture_forward` turns
    it on only when such an op is detected.
    """

    def __init__(
        self, modules: dict[str, nn.Module], alias_inputs: bool = False, clone_outputs: bool = False
    ):
        self.modules = modules
        self.alias_inputs = alias_inputs
        self.clone_outputs = clone_outputs
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:  # noqa: PYI034
        for name, m in self.modules.items():
            if self.alias_inputs:
                self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def outputs_modified(self) -> bool:
        """Whether an in-place op changed a captured output after its module returned it."""
        return any(t._version != v for t, v in self._versions)

    @staticmethod
    def _pre(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if not torch.is_tensor(x):
            return None
        xa = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        return (xa, *args[1:])

    def _post(self, name: str):
        def fn(module: nn.Module, args: tuple, out: Any) -> Any:
            self.inputs[name].append(args[0])
            self.outputs[name].append(out)
            if torch.is_tensor(out):
                self._versions.append((out, out._version))
                if self.clone_outputs:
                    return out.clone()
            return None

        return fn


def capture_forward(
    model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, alias_inputs: bool = False
) -> tuple[torch.Tensor, Capture]:
    """`model(x)` with every call of `modules` captured (see `Capture`)."""
    with Capture(modules, alias_inputs) as cap:
        f = model(x)
    if cap.outputs_modified():
        del cap, f
        with Capture(modules, alias_inputs, clone_outputs=True) as cap:
            f = model(x)
    return f, cap


def _unfold_supported(layer: nn.Module) -> bool:
    return type(layer) in (nn.Conv1d, nn.Conv2d)


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Conv input patches (N, groups, D_g, L) in the layout of ``weight.flatten(1)``; None if unsupported."""
    if type(layer) is nn.Conv1d:
        x = x.unsqueeze(2)
        k, s, d = (1, layer.kernel_size[0]), (1, layer.stride[0]), (1, layer.dilation[0])
        rp = layer._reversed_padding_repeated_twice
        pad = [rp[0], rp[1], 0, 0]
    elif type(layer) is nn.Conv2d:
        k, s, d = layer.kernel_size, layer.stride, layer.dilation
        pad = list(layer._reversed_padding_repeated_twice)
    else:
        return None
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        if mode == "constant" and pad[0] == pad[1] and pad[2] == pad[3]:
            a = F.unfold(x, k, dilation=d, padding=(pad[2], pad[0]), stride=s)
        else:
            a = F.unfold(F.pad(x, pad, mode=mode), k, dilation=d, stride=s)
    else:
        a = F.unfold(x, k, dilation=d, stride=s)
    n, dd, length = a.shape
    return a.reshape(n, layer.groups, dd // layer.groups, length)


class PerSampleGrads:
    """Per-sample weight gradients of one layer from its inputs and output gradients, call by call.

    Linear and Conv1d/Conv2d use a batched matrix product of the output gradient with the input (patches);
    other layer kinds vmap the layer's own vector-Jacobian product over the samples. Conv patches are kept
    between uses while they are small, else unfolded again per chunk of samples (bounded memory).

    `sq_norms` gives the per-sample squared gradient norms. With `norm_uses` (how many output gradients will
    be asked for) it may instead use the Gram matrix of the input patches: ‖g Aᵀ‖² = ⟨g, g K⟩ with K = AᵀA
    over positions, which costs O·L² per use instead of O·L·D (cheaper where positions L < patch size D,
    e.g. late conv stages and Linear layers).
    """

    def __init__(
        self,
        layer: nn.Module,
        inputs: Sequence[torch.Tensor],
        norm_uses: int = 0,
        cache_limit: int | None = None,
    ):
        self.layer = layer
        self.shape = tuple(layer.weight.shape)
        self.numel = layer.weight.numel()
        self.inputs = [x.detach() for x in inputs]
        self.kind = (
            "linear" if isinstance(layer, nn.Linear) else "unfold" if _unfold_supported(layer) else "vmap"
        )
        n = self.inputs[0].shape[0]
        first = self._prepare(self.inputs[0][:1])
        self.per_sample = first.numel()  # prepared elements per sample and call
        need = n * self.per_sample * len(self.inputs)
        cache = self.kind == "linear" or need <= (
            2 * _PER_SAMPLE_BUDGET if cache_limit is None else cache_limit
        )
        self.cached = [self._prepare(x) for x in self.inputs] if cache else None
        self.cached_elems = need if cache and self.kind != "linear" else 0
        self.gram: torch.Tensor | None = None
        if norm_uses and len(self.inputs) == 1 and self.kind != "vmap":
            a = first if first.dim() == 4 else first.transpose(1, 2).unsqueeze(1)  # linear: (1, 1, D, L)
            groups, d, length = a.shape[1], a.shape[2], a.shape[3]
            out = self.shape[0] // groups
            bmm_cost = norm_uses * out * length * d
            gram_cost = length * length * (norm_uses * out + d)
            if groups == 1 and gram_cost < bmm_cost and n * length * length <= _PER_SAMPLE_BUDGET:
                parts = []
                for sl in self.chunks(n):
                    a = self._patches(0, sl)
                    a2 = a[:, 0] if a.dim() == 4 else a.transpose(1, 2)  # (n, D, L)
                    parts.append(torch.bmm(a2.transpose(1, 2), a2))
                self.gram = torch.cat(parts)  # (n, L, L)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, x.shape[-1])  # (n, L, D)
        if self.kind == "unfold":
            return _unfold(self.layer, x)  # (n, groups, D_g, L)
        return x

    def _patches(self, call: int, sl: slice) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[call][sl]
        return self._prepare(self.inputs[call][sl])

    def chunks(self, n: int) -> list[slice]:
        step = max(1, _PER_SAMPLE_BUDGET // max(1, self.numel + self.per_sample))
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    def grads(self, gouts: Sequence[torch.Tensor], sl: slice) -> torch.Tensor:
        """(n, *weight.shape): the per-sample weight gradients of samples `sl`, summed over calls."""
        total = None
        for call, g in enumerate(gouts):
            a, g = self._patches(call, sl), g[sl]
            n = a.shape[0]
            if self.kind == "linear":
                gg = g.reshape(n, -1, g.shape[-1])
                out = torch.bmm(gg.transpose(1, 2), a)
            elif self.kind == "unfold":
                groups = a.shape[1]
                gg = g.reshape(n, groups, -1, a.shape[-1])
                out = torch.matmul(gg, a.transpose(-1, -2))
            else:
                out = self._vmap_grads(a, g)
            out = out.reshape(n, *self.shape)
            total = out if total is None else total + out
        assert total is not None
        return total

    def sq_norms(self, gouts: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N,) float64: the squared Frobenius norm of every sample's weight gradient."""
        n = gouts[0].shape[0]
        if self.gram is not None:
            g = gouts[0]
            length = self.gram.shape[-1]
            if self.kind == "linear":
                gg = g.reshape(n, length, -1).transpose(1, 2)  # (n, O, L)
            else:
                gg = g.reshape(n, -1, length)
            return (torch.bmm(gg, self.gram) * gg).sum((1, 2)).double()
        parts = [self.grads(gouts, sl).flatten(1).double().pow(2).sum(1) for sl in self.chunks(n)]
        return torch.cat(parts)

    def _vmap_grads(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        layer, w = self.layer, self.layer.weight.detach()

        def one(xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            _, vjp = torch.func.vjp(lambda ww: _layer_forward(layer, xi[None], ww, None), w)
            return vjp(gi[None])[0]

        return torch.func.vmap(one)(x, g)


def labels_for(
    model: nn.Module, batches: list[Batch]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
    """Batches with labels: the given ones, or the float model's argmax predictions (second value False)."""
    if all(y is not None for _, y in batches):
        return [(x, y) for x, y in batches], True  # type: ignore[misc]
    out = []
    with torch.no_grad():
        for x, _ in batches:
            out.append((x, model(x).argmax(1)))
    return out, False


# --- trace estimators ------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    """Per-layer Hessian traces (of the mean loss over the data) and how they were obtained."""

    estimator: str
    names: list[str]
    trace: np.ndarray
    stderr: np.ndarray
    probes: int  # Hutchinson probes (per layer for per-layer probing); columns for Gauss-Newton
    hvp_passes: int = 0  # double-backward passes
    backward_passes: int = 0
    forward_passes: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {n: float(t) for n, t in zip(self.names, self.trace)}


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    r = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8)
    return (r.to(like.dtype) * 2 - 1).to(like.device)


def gauss_newton_traces(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[Batch],
    max_classes: int = 100,
    columns: int = 16,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> TraceResult:
    """Per-layer traces of the Gauss-Newton diagonal blocks of the mean cross-entropy (labels unused).

    Exact (stderr 0) with at most `max_classes` output classes: one backward pass per class per batch.
    Above that, `columns` random combinations of the Hessian's square-root columns per batch (unbiased).
    Equals the Hessian's diagonal-block trace where the network is piecewise linear in each layer's weights.
    """
    names = list(modules)
    total_n = sum(int(x.shape[0]) for x, _ in batches)
    sums = np.zeros(len(names))
    col_sums: list[np.ndarray] = []  # Monte-Carlo: per-column totals (for the standard error)
    gen = torch.Generator().manual_seed(seed)
    mc = False
    n_back = n_fwd = 0
    n_cols = 0
    with only_weights_require_grad(model, modules):
        for bi, (x, _) in enumerate(batches):
            f, cap = capture_forward(model, modules, x)
            n_fwd += 1
            if f.dim() != 2:
                raise BitsearchError(
                    f"the Gauss-Newton trace needs (N, classes) logits, got {tuple(f.shape)}"
                )
            missing = [n for n in names if not cap.outputs[n]]
            if missing:
                raise BitsearchError(f"layers did not run in the forward pass: {missing[:3]}")
            c = f.shape[1]
            p = torch.softmax(f.detach().double(), dim=1)
            sp = p.sqrt()
            if c <= max_classes:
                cols = []
                for k in range(c):
                    u = -sp[:, k : k + 1] * p
                    u[:, k] += sp[:, k] * 1.0
                    cols.append(u)
                n_cols = c
            else:
                mc = True
                cols = []
                for _ in range(columns):
                    r = _rademacher(p, gen)
                    cols.append(sp * r - p * (sp * r).sum(1, keepdim=True))
                n_cols = columns
                while len(col_sums) < columns:
                    col_sums.append(np.zeros(len(names)))
            psg, room = {}, _CACHE_BUDGET  # conv patches kept across the columns, within a total budget
            for name in names:
                psg[name] = PerSampleGrads(modules[name], cap.inputs[name], len(cols), cache_limit=room)
                room -= psg[name].cached_elems
            outs = [o for name in names for o in cap.outputs[name]]
            for j, u in enumerate(cols):
                gz = torch.autograd.grad(f, outs, grad_outputs=u.to(f.dtype), retain_graph=j + 1 < len(cols))
                n_back += 1
                pos = 0
                for li, name in enumerate(names):
                    k_calls = len(cap.outputs[name])
                    g_l = gz[pos : pos + k_calls]
                    pos += k_calls
                    acc = float(psg[name].sq_norms(g_l).sum())
                    sums[li] += acc
                    if mc:
                        col_sums[j][li] += acc
                progress((bi + (j + 1) / len(cols)) / len(batches), f"Gauss-Newton traces: batch {bi + 1}")
            del cap, f, psg, outs
    trace = sums / total_n / (columns if mc else 1)
    stderr = np.zeros(len(names))
    if mc and columns > 1:
        per_col = np.array(col_sums) / total_n
        stderr = per_col.std(axis=0, ddof=1) / math.sqrt(columns)
    return TraceResult(
        estimator="gauss-newton-mc" if mc else "gauss-newton-exact",
        names=names,
        trace=trace,
        stderr=stderr,
        probes=n_cols,
        backward_passes=n_back,
        forward_passes=n_fwd,
    )


def _batch_grads(model, weights, x, y, total_n, create_graph=True):
    loss = F.cross_entropy(model(x), y, reduction="sum") / total_n
    return torch.autograd.grad(loss, weights, create_graph=create_graph)


def hutchinson_traces(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    probing: str = "joint",
    tol: float = 0.05,
    min_probes: int = 8,
    max_probes: int = 200,
    keep_graph: bool | str = "auto",
    probe_batch: int = 1,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> TraceResult:
    """Hutchinson estimates of the per-layer Hessian traces of the mean cross-entropy over `batches`.

    ``probing="joint"``: every probe covers all layers at once (one HVP over all weights per probe, then
    v_lᵀ(Hv)_l per layer); ``"per-layer"``: each layer's block is probed alone (L HVPs per probe round).
    Stops once every layer's standard error (std of the per-probe estimates / √k) is at most `tol` times its
    mean, after at least `min_probes` and at most `max_probes` probes. `probe_batch` > 1 vmaps that many
    probes through one double-backward pass (cheaper per probe for small models).
    """
    if probing not in ("joint", "per-layer"):
        raise BitsearchError(f"probing must be 'joint' or 'per-layer', got {probing!r}")
    if max_probes < 1 or min_probes < 1 or probe_batch < 1:
        raise BitsearchError("min_probes, max_probes and probe_batch must be positive")
    min_probes = min(min_probes, max_probes)
    names = list(modules)
    total_n = sum(int(x.shape[0]) for x, _ in batches)
    gen = torch.Generator().manual_seed(seed)
    weights = [modules[n].weight for n in names]
    if keep_graph == "auto":
        keep_graph = total_n <= 1024 and _activation_elems(model, modules, batches[0][0]) * total_n <= 2e8
    counts = {"hvp": 0, "bwd": 0, "fwd": 0}

    with only_weights_require_grad(model, modules):
        kept = None
        if keep_graph:
            kept = []
            for x, y in batches:
                kept.append(_batch_grads(model, weights, x, y, total_n))
                counts["fwd"] += 1
                counts["bwd"] += 1

        def hvp(vs: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
            """(H v) on the layers `idx` for P probes vs[i] of shape (P, *weight.shape), zero elsewhere."""
            out = [torch.zeros_like(v) for v in vs]
            ws = [weights[i] for i in idx]
            for bi, (x, y) in enumerate(batches):
                if kept is not None:
                    gs = [kept[bi][i] for i in idx]
                else:
                    gs = list(_batch_grads(model, ws, x, y, total_n))
                    counts["fwd"] += 1
                    counts["bwd"] += 1
                if vs[0].shape[0] == 1:
                    hv = [
                        h[None]
                        for h in torch.autograd.grad(
                            gs, ws, [v[0] for v in vs], retain_graph=kept is not None
                        )
                    ]
                else:
                    hv = torch.autograd.grad(gs, ws, vs, retain_graph=kept is not None, is_grads_batched=True)
                counts["hvp"] += 1
                for o, h in zip(out, hv):
                    o += h
            return out

        def probes(w: torch.Tensor, p: int) -> torch.Tensor:
            return torch.stack([_rademacher(w, gen) for _ in range(p)])

        def run(idx: list[int], label: str, frac0: float, span: float) -> np.ndarray:
            est: list[np.ndarray] = []
            while len(est) < max_probes:
                p = min(probe_batch, max_probes - len(est))
                vs = [probes(weights[i], p) for i in idx]
                hv = hvp(vs, idx)
                per = torch.stack(
                    [(v * h).flatten(1).double().sum(1) for v, h in zip(vs, hv)], 1
                )  # (p, layers)
                est.extend(per.numpy())
                done, frac = _converged(np.array(est), tol, min_probes)
                progress(
                    frac0 + span * max(frac, len(est) / max_probes), f"Hutchinson: {label} probe {len(est)}"
                )
                if done:
                    break
            return np.array(est)

        if probing == "joint":
            e = run(list(range(len(weights))), "joint", 0.0, 1.0)
            n_probes = e.shape[0]
            trace = e.mean(0)
            stderr = e.std(0, ddof=1) / math.sqrt(n_probes) if n_probes > 1 else np.full(len(names), np.nan)
            per_layer_probes = [n_probes] * len(names)
        else:
            trace = np.zeros(len(names))
            stderr = np.zeros(len(names))
            per_layer_probes = []
            for li in range(len(weights)):
                e1 = run([li], names[li], li / len(weights), 1 / len(weights))[:, 0]
                trace[li] = e1.mean()
                stderr[li] = e1.std(ddof=1) / math.sqrt(len(e1)) if len(e1) > 1 else np.nan
                per_layer_probes.append(len(e1))
            n_probes = int(max(per_layer_probes))
    return TraceResult(
        estimator="hutchinson",
        names=names,
        trace=trace,
        stderr=stderr,
        probes=n_probes,
        hvp_passes=counts["hvp"],
        backward_passes=counts["bwd"],
        forward_passes=counts["fwd"],
        details={
            "probing": probing,
            "probes_per_layer": per_layer_probes,
            "keep_graph": bool(keep_graph),
            "tol": tol,
            "probe_batch": probe_batch,
        },
    )


def _converged(est: np.ndarray, tol: float, min_probes: int) -> tuple[bool, float]:
    k = est.shape[0]
    if k < 2:
        return False, 0.0
    mean = est.mean(0)
    se = est.std(0, ddof=1) / math.sqrt(k)
    rel = float(np.max(se / np.maximum(np.abs(mean), 1e-300)))
    # Fraction of the way there: se shrinks like 1/√k, so k·(rel/tol)² probes are needed in all.
    need = k * (rel / tol) ** 2 if tol > 0 else float("inf")
    return (k >= min_probes and rel <= tol), min(1.0, k / max(need, 1.0))


@torch.no_grad()
def _activation_elems(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> int:
    """Elements of the quantizable layers' outputs per sample: a rough size of the autograd graph."""
    with Capture(modules) as cap:
        model(x[:1])
    return sum(o.numel() for outs in cap.outputs.values() for o in outs if torch.is_tensor(o))


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
    nn.MultiheadAttention, nn.RNNBase, nn.Bilinear, nn.GLU,
)  # fmt: skip


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


# --- the deployed weight error ---------------------------------------------------------------------------


def quantizer_wrappers(ctx: SensitivityContext, statistics: bool) -> dict[str, QuantizedLayer]:
    """`QuantizedLayer`s for every layer of a private copy of the model, calibrated on the context's data
    when `statistics` (the original model is untouched)."""
    cfg = ctx.options.quant
    qmodel = copy.deepcopy(ctx.model).eval()
    wrappers = wrap_model(qmodel, cfg)
    if statistics:
        collect_statistics(qmodel, wrappers, ctx.x, cfg)
    missing = [l.name for l in ctx.layers if l.name not in wrappers]
    if missing:
        raise BitsearchError(f"layers not found in the wrapped model: {missing[:3]}")
    return wrappers


@torch.no_grad()
def weight_error(q: QuantizedLayer, bits: int) -> torch.Tensor:
    """Q_b(W) − W as `QuantizedLayer.set_bits` realises `bits` weight bits (float32 activations)."""
    q.set_bits(LayerBits(bits, 32))
    w = q.layer.weight.detach()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # stochastic rounding, if configured, is then reproducible
        return q.weight_quant(w) - w


def weight_noise_sq(
    ctx: SensitivityContext, progress: Progress = _no_progress
) -> dict[str, dict[int, float]]:
    """‖Q_b(W_l) − W_l‖² for every layer and weight-bit option of the context."""
    bits = ctx.options.weight_bits
    need_stats = ctx.options.quant.weight_clip in DATA_CLIPS and any(not is_float_bits(b) for b in bits)
    wrappers = quantizer_wrappers(ctx, need_stats)
    out: dict[str, dict[int, float]] = {}
    for i, layer in enumerate(ctx.layers):
        q = wrappers[layer.name]
        out[layer.name] = {b: float(weight_error(q, b).double().pow(2).sum()) for b in bits}
        progress((i + 1) / len(ctx.layers), f"weight quantization error: {layer.name}")
    return out


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
            check_positive(self.tol, "tol")
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
                values[i, k] = 0.5 * t * noise[layer.name][o.weight_bits]
                stderr[i, k] = 0.5 * se * noise[layer.name][o.weight_bits]
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
            "weight_noise_sq": {n: {str(b): v for b, v in d.items()} for n, d in noise.items()},
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
