"""Trace estimators of each layer's Hessian block (`hessian`'s two routes): the exact Gauss-Newton trace
and Hutchinson's randomised trace, with their convergence rules. See `sensitivity.hessian`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.errors import BitsearchError

from .plumbing import (
    _CACHE_BUDGET,
    Batch,
    Capture,
    PerSampleGrads,
    Progress,
    _no_progress,
    capture_forward,
    only_weights_require_grad,
)

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


