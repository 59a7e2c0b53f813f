"""Bin Regularization (Han et al., "Improving Low-Precision Network Quantization via Bin Regularization",
ICCV 2021).

Each weight belongs to the bin of its nearest quantization level (weights beyond the grid to the end bins).
BR asks every bin to be sharp, ideally a Dirac delta on its level:

    L_BR = Σ_bins [ (mean(v_bin) - q_bin)² + var(v_bin) ]

with v the weights in grid units (w / step, the step detached: BR moves the weights toward the grid, not the
grid toward the weights) and q_bin the integer level. Working in grid units makes the loss independent of
each layer's (or channel's) step, so one λ serves every layer and per-channel steps pool naturally.

Normalisation (a choice the paper leaves open): per tensor, the sum over bins is divided by the number of
non-empty bins (so 2-bit and 8-bit layers weigh alike), and the model's loss is the mean over its quantized
weight tensors. The variance is the population variance (a bin of one weight has variance 0), computed in
two passes for accuracy. The trainer adds λ·L_BR to the task loss from step `binreg_start` on (the paper's
two-stage schedule: task loss alone first, then with BR).
"""

from __future__ import annotations

import torch
from torch import nn

from ..apply import quantized_layers
from ..quantizers import SymmetricQuantizer


def bin_regularization(v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """L_BR of one tensor given in grid units, with levels qmin..qmax (differentiable in `v`)."""
    v = v.reshape(-1)
    levels = qmax - qmin + 1
    idx = torch.round(v.detach()).clamp(qmin, qmax).long() - qmin
    counts = torch.bincount(idx, minlength=levels).to(v.dtype)
    nonempty = counts > 0
    c = counts.clamp(min=1)
    mean = torch.zeros(levels, dtype=v.dtype, device=v.device).index_add(0, idx, v) / c
    dev = v - mean[idx]
    var = torch.zeros(levels, dtype=v.dtype, device=v.device).index_add(0, idx, dev * dev) / c
    target = torch.arange(qmin, qmax + 1, dtype=v.dtype, device=v.device)
    per_bin = (mean - target) ** 2 + var
    return per_bin[nonempty].sum() / nonempty.sum().clamp(min=1)


def grid_of(quantizer: nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(w in grid units, qmin, qmax) for the quantizers BR understands; None for the others."""
    if hasattr(quantizer, "grid_values") and hasattr(quantizer, "grid_levels"):
        qmin, qmax = quantizer.grid_levels()
        return quantizer.grid_values(w), qmin, qmax
    if isinstance(quantizer, SymmetricQuantizer) and quantizer.calibrated:
        qmin, qmax = quantizer.levels()
        return w / quantizer._bcast(quantizer.scale, w), qmin, qmax
    return None


def binreg_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean L_BR over the quantized weight tensors of a fake-quantized `model` (None when there are none)."""
    losses = []
    for layer in quantized_layers(model).values():
        if layer.bits is None:
            continue
        g = grid_of(layer.weight_quant, layer.layer.weight)
        if g is not None:
            losses.append(bin_regularization(*g))
    if not losses:
        return None
    return torch.stack(losses).mean()
