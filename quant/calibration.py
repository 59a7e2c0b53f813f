"""Clipping-range methods and the calibration statistics they read.

A clipping method maps a 2-D tensor `x` (rows are channels; one row for per-tensor) to a range `(lo, hi)`
per row for a given quantizer. Methods are registered by name like the quantizers:

- `minmax`: the observed extremes;
- `percentile`: the p-th percentile of |x| (symmetric) or of each tail;
- `mse`: grid search of the range that minimises the quantization MSE of `x` itself;
- `aciq`: Banner et al.'s analytic clipping, from a Laplace or Gaussian fit (whichever fits better);
- `output_mse`: grid search that minimises the error of the *layer output*, E[(ΔW·x)²] = ΔW Σ ΔWᵀ with the
  second moment Σ of the layer's input patches; only for weights, needs calibration data;
- `auto`: per channel, the best of all the above by the output error (by weight MSE without data).

The output error is what the network sees; the weight MSE ignores which weights meet large inputs, which is
why weight-MSE clipping can lose to plain min-max at 3 bits while output-MSE does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BitsearchError
from .quantizers import Quantizer

# Analytic clipping factors of the ACIQ paper (Banner et al. 2019), α = factor × b (Laplace) or × σ (Gauss).
_ACIQ_LAPLACE = {1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89, 9: 11.16}
_ACIQ_GAUSS = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92, 9: 4.2}

_GRID = torch.linspace(0.1, 1.0, 91)


@dataclass
class ClipContext:
    """What a clipping method may use besides the tensor: options and the input statistics of a layer."""

    percentile: float = 99.99
    # Output-error weighting for weights viewed as (out_channels, d): either a full (d, d) second moment
    # shared by all rows, or a per-row diagonal (rows, d). None: no data (weight MSE is used instead).
    input_cov: torch.Tensor | None = None
    input_diag: torch.Tensor | None = None


ClipMethod = Callable[[torch.Tensor, Quantizer, ClipContext], tuple[torch.Tensor, torch.Tensor]]
CLIP_METHODS: dict[str, ClipMethod] = {}


def register_clip(name: str) -> Callable[[ClipMethod], ClipMethod]:
    def deco(fn: ClipMethod) -> ClipMethod:
        CLIP_METHODS[name] = fn
        return fn

    return deco


def clip_range(
    method: str, x: torch.Tensor, quantizer: Quantizer, ctx: ClipContext | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range of each row of `x` (2-D) for `quantizer` by `method`."""
    if method not in CLIP_METHODS:
        raise BitsearchError(f"unknown clipping method {method!r}; known: {sorted(CLIP_METHODS)}")
    x = x.detach().float()
    if x.dim() != 2:
        raise ValueError("clip_range takes a 2-D tensor (channels × values)")
    return CLIP_METHODS[method](x, quantizer, ctx or ClipContext())


def _fq_rows(x: torch.Tensor, q: Quantizer, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fake-quantize each row of x with its own range, deterministically (no STE, no stochastic rounding)."""
    scale, zp = q.qparams(lo, hi)
    qmin, qmax = q.levels()
    return (torch.clamp(torch.round(x / scale[:, None] + zp[:, None]), qmin, qmax) - zp[:, None]) * scale[:, None]


@register_clip("minmax")
def _minmax(x, q, ctx):
    return x.amin(1), x.amax(1)


def _quantile_rows(x: torch.Tensor, p: float) -> torch.Tensor:
    # torch.quantile refuses very large inputs; a strided subsample keeps the estimate and the cost sane.
    n = x.shape[1]
    if n > 2_000_000 // max(1, x.shape[0]):
        step = math.ceil(n / max(1, 2_000_000 // max(1, x.shape[0])))
        x = x[:, ::step]
    return torch.quantile(x, p, dim=1)


@register_clip("percentile")
def _percentile(x, q, ctx):
    p = min(max(ctx.percentile, 50.0), 100.0) / 100.0
    lo, hi = x.amin(1), x.amax(1)
    if q.signed:
        a = _quantile_rows(x.abs(), p)
        return torch.maximum(-a, lo), torch.minimum(a, hi)
    return torch.maximum(_quantile_rows(x, 1 - p), lo), torch.minimum(_quantile_rows(x, p), hi)


def _grid_search(x, q, err_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by each ratio of the grid; keep per row the one with the smallest error."""
    lo0, hi0 = x.amin(1), x.amax(1)
    best = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r in _GRID.tolist():
        lo, hi = lo0 * r, hi0 * r
        err = err_fn(_fq_rows(x, q, lo, hi) - x)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


@register_clip("mse")
def _mse(x, q, ctx):
    return _grid_search(x, q, lambda d: d.pow(2).mean(1))


def output_error(delta: torch.Tensor, ctx: ClipContext) -> torch.Tensor:
    """E[(Δw_c · x)²] per row c: the layer-output MSE a weight error causes (weight MSE without data)."""
    if ctx.input_cov is not None and ctx.input_cov.shape[0] == delta.shape[1]:
        return ((delta @ ctx.input_cov) * delta).sum(1)
    if ctx.input_diag is not None and ctx.input_diag.shape[-1] == delta.shape[1]:
        return (delta.pow(2) * ctx.input_diag).sum(1)
    return delta.pow(2).mean(1)


@register_clip("output_mse")
def _output_mse(x, q, ctx):
    return _grid_search(x, q, lambda d: output_error(d, ctx))


@register_clip("aciq")
def _aciq(x, q, ctx):
    mu = x.mean(1, keepdim=True)
    b = (x - mu).abs().mean(1)  # Laplace scale (maximum likelihood with the mean as centre)
    sigma = x.std(1, unbiased=False).clamp(min=1e-12)
    # Pick the family by log-likelihood, per tensor (a per-row choice is too noisy on small rows).
    ll_laplace = (-torch.log(2 * b.clamp(min=1e-12)) - 1).mean()
    ll_gauss = (-0.5 * torch.log(2 * math.pi * sigma**2) - 0.5).mean()
    # An unsigned grid spends all its levels on one side: as many levels as b+1 bits over ±α.
    bits = q.bits if q.signed else q.bits + 1
    bits = min(max(bits, 1), 9)
    alpha = _ACIQ_LAPLACE[bits] * b if ll_laplace >= ll_gauss else _ACIQ_GAUSS[bits] * sigma
    lo, hi = x.amin(1), x.amax(1)
    m = mu.squeeze(1)
    return torch.maximum(m - alpha, lo), torch.minimum(m + alpha, hi)


@register_clip("auto")
def _auto(x, q, ctx):
    candidates = [CLIP_METHODS[m](x, q, ctx) for m in ("minmax", "percentile", "mse", "aciq", "output_mse")]
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_lo, best_hi = candidates[0]
    best_lo, best_hi = best_lo.clone(), best_hi.clone()
    for lo, hi in candidates:
        err = output_error(_fq_rows(x, q, lo, hi) - x, ctx)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


# --- statistics of a layer's input, gathered in one calibration pass -------------------------------

#: Above this patch size the full second moment (d × d) is replaced by its diagonal.
MAX_COV_DIM = 4096


@dataclass
class InputStats:
    """Running statistics of one layer's input over the calibration batches.

    `patch_*` are over the vectors that one weight row multiplies (an unfolded Conv2d patch, a Linear input),
    so that E[Δw·x] and E[(Δw·x)²] are exact for the calibration data; for other layer kinds only
    per-input-channel moments are kept and broadcast over the kernel (border effects ignored).
    """

    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    sample: list[torch.Tensor] = field(default_factory=list)  # flat random subsample of input values
    sample_budget: int = 1 << 18
    patch_n: int = 0
    patch_sum: torch.Tensor | None = None  # (d,)
    patch_sq: torch.Tensor | None = None  # (d, d) or (d,) when d > MAX_COV_DIM
    chan_n: int = 0
    chan_sum: torch.Tensor | None = None  # (C_in,)
    chan_sq: torch.Tensor | None = None  # (C_in,)
    max_cov_dim: int = MAX_COV_DIM  # above this patch size only the diagonal of E[x xᵀ] is kept

    def values(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(1)

    def _add_sample(self, x: torch.Tensor, batches_hint: int = 8) -> None:
        flat = x.detach().reshape(-1)
        per_batch = max(1, self.sample_budget // batches_hint)
        have = sum(s.numel() for s in self.sample)
        take = min(per_batch, self.sample_budget - have, flat.numel())
        if take <= 0:
            return
        idx = torch.randint(0, flat.numel(), (take,), generator=_gen(flat.numel()))
        self.sample.append(flat[idx].float().clone())

    def update(self, layer: nn.Module, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.count += x.shape[0]
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self._add_sample(x)
        patches = _patches(layer, x)
        if patches is not None:
            d = patches.shape[1]
            s = patches.sum(0)
            self.patch_sum = s if self.patch_sum is None else self.patch_sum + s
            sq = patches.T @ patches if d <= self.max_cov_dim else patches.pow(2).sum(0)
            self.patch_sq = sq if self.patch_sq is None else self.patch_sq + sq
            self.patch_n += patches.shape[0]
        else:
            c = x.transpose(0, 1).reshape(x.shape[1], -1)
            self.chan_sum = c.sum(1) if self.chan_sum is None else self.chan_sum + c.sum(1)
            cs = c.pow(2).sum(1)
            self.chan_sq = cs if self.chan_sq is None else self.chan_sq + cs
            self.chan_n += c.shape[1]

    # Moments in the weight's (rows, d) layout --------------------------------------------------
    def weight_moments(self, layer: nn.Module) -> tuple[torch.Tensor | None, ClipContext]:
        """(E[x] per weight element in (rows, d) or (d,) layout, a ClipContext carrying E[x xᵀ])."""
        if self.patch_n:
            mean = self.patch_sum / self.patch_n
            sq = self.patch_sq / self.patch_n
            if sq.dim() == 2:
                return mean, ClipContext(input_cov=sq)
            return mean, ClipContext(input_diag=sq)
        if self.chan_n:
            mean_c = self.chan_sum / self.chan_n
            sq_c = self.chan_sq / self.chan_n
            return _expand_channels(layer, mean_c), ClipContext(input_diag=_expand_channels(layer, sq_c))
        return None, ClipContext()


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed % (2**31))
    return g


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Input vectors (n, d) in the layout of `layer.weight.flatten(1)`, or None where that is not one matrix."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if type(layer) is nn.Conv2d and layer.groups == 1 and isinstance(layer.padding, tuple):
        p = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    if type(layer) is nn.Conv1d and layer.groups == 1 and isinstance(layer.padding, tuple):
        x2 = x.unsqueeze(2)
        p = F.unfold(
            x2, (1, layer.kernel_size[0]), dilation=(1, layer.dilation[0]),
            padding=(0, layer.padding[0]), stride=(1, layer.stride[0]),
        )
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    return None


def _expand_channels(layer: nn.Module, per_in_channel: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel statistic onto `weight.flatten(1)` (rows, d), honouring groups."""
    w = layer.weight
    k = math.prod(w.shape[2:])
    if isinstance(layer, nn.ConvTranspose2d):
        # weight (C_in, C_out/g, kh, kw): flatten(1) rows are input channels.
        return per_in_channel[:, None].expand(w.shape[0], w.shape[1] * k).contiguous()
    groups = getattr(layer, "groups", 1)
    rows, cin_g = w.shape[0], w.shape[1]
    out_per_group = rows // groups
    dev = per_in_channel.device
    group = torch.arange(rows, device=dev) // out_per_group
    chans = group[:, None] * cin_g + torch.arange(cin_g, device=dev)[None, :]  # (rows, cin_g)
    return per_in_channel[chans].repeat_interleave(k, dim=1)


def calibrate_activation(quantizer: Quantizer, stats: InputStats, method: str, percentile: float) -> None:
    """Set an activation quantizer's range from the layer's input statistics."""
    if quantizer.self_calibrating:
        return
    vals = stats.values()
    extremes = torch.tensor([stats.min, stats.max], dtype=vals.dtype, device=vals.device)
    vals = torch.cat([vals, extremes])  # keep the true extremes in the sample
    lo, hi = clip_range(method, vals[None, :], quantizer, ClipContext(percentile=percentile))
    quantizer.set_range(lo[0], hi[0])
