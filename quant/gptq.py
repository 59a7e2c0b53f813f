"""GPTQ: error-compensated rounding of one layer's weights from its input Hessian (Frantar et al. 2023).

Rounding column j of W (rows × cols, the `weight.flatten(1)` layout) leaves an error that the columns not yet
quantized can absorb: with H = E[x xᵀ] the layer-output error is tr(ΔW H ΔWᵀ), and the optimal update of the
remaining columns is -err_j · H⁻¹[j, j:] / H⁻¹[j, j]. GPTQ processes columns in order, using the upper
Cholesky factor of H⁻¹ (numerically stable), and applies the updates lazily in blocks of `block_size` columns.

Any format of `quant.formats` can be used: at the first column of each group, the group's scales are fitted
on the *current* (already error-updated) weights, as the reference implementation does; per-channel and
per-tensor schemes fit their scales once, on the original weights. A legacy integer quantizer (already
calibrated, so its scales are fixed) is used through `fixed_params_rounding`.

Here H comes from the float model's calibration inputs (statistics gathered in one pass), not from the
partially quantized model's, which keeps one calibration pass for all layers and all options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BitsearchError
from .formats import WeightFormat, _blocks


@dataclass(frozen=True)
class GPTQConfig:
    """Damping (fraction of the mean diagonal of H added to it) and the lazy-update block size."""

    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if not (0.0 < self.damp <= 1.0):
            raise BitsearchError(f"gptq damping must be in (0, 1], got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise BitsearchError(f"gptq block size must be a positive integer, got {self.block_size!r}")


#: (group of current weights (rows, g)) -> params; (values (rows, k), params) -> dequantized values.
FitFn = Callable[[torch.Tensor], tuple]
QdqFn = Callable[[torch.Tensor, tuple], torch.Tensor]


def _hinv_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); raises a clear error if H is not PD."""
    h = h.clone()
    lam = damp * torch.mean(torch.diag(h))
    if not torch.isfinite(lam) or lam <= 0:
        lam = torch.tensor(damp, dtype=h.dtype)
    h.diagonal().add_(lam)
    for attempt in range(5):
        try:
            low = torch.linalg.cholesky(h)
            # H⁻¹ = L⁻ᵀ L⁻¹ by one triangular solve (several times faster than cholesky_inverse on CPU)
            linv = torch.linalg.solve_triangular(low, torch.eye(h.shape[0], dtype=h.dtype), upper=False)
            return torch.linalg.cholesky(linv.T @ linv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            h.diagonal().add_(lam * 10**attempt)
    raise BitsearchError("GPTQ: the input Hessian is not positive definite even after damping")


@torch.no_grad()
def gptq_rounding(
    w: torch.Tensor,
    h: torch.Tensor,
    fit: FitFn,
    qdq: QdqFn,
    group_size: int | None,
    config: GPTQConfig | None = None,
) -> torch.Tensor:
    """The GPTQ-rounded (dequantized) weight of `w` (rows, cols) for the input second moment `h` (cols, cols).

    `group_size`: columns sharing one set of params (None: fitted once on the original `w`).
    """
    cfg = config or GPTQConfig()
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise BitsearchError(f"GPTQ: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match")
    W = w.detach().double().clone()
    H = h.detach().double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _hinv_upper(H, cfg.damp)
    g = group_size if group_size and group_size < cols else None
    block = cfg.block_size if g is None else max(g, (cfg.block_size // g) * g)
    params = fit(W.float()) if g is None else None
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if g is not None and col % g == 0:
                params = fit(W1[:, i : i + g].float())  # the group lies inside this block (block % g == 0)
            q = qdq(W1[:, i : i + 1].float(), params).double()
            Q[:, col : col + 1] = q
            err = (W1[:, i : i + 1] - q) / U1[i, i]
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            E1[:, i : i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q.to(w.dtype)


def format_rounding(fmt: WeightFormat, w: torch.Tensor, clip_ratio: torch.Tensor | None = None):
    """(fit, qdq, group_size) for a `quant.formats` format; tensor-wide params come from the original `w`."""
    rows, cols = w.shape
    g = fmt.group_size(cols)
    tparams = fmt.tensor_params(w.float())
    ratio = None if clip_ratio is None else clip_ratio.reshape(rows, -1)

    def fit(group: torch.Tensor) -> tuple:
        r = None
        if ratio is not None:
            r = ratio[:, :1, None] if ratio.shape[1] == 1 else None  # per-group ratios are not tracked
        return fmt.fit(_blocks(group, group.shape[1]), tparams, r)

    def qdq(x: torch.Tensor, params: tuple) -> torch.Tensor:
        return fmt.qdq(x[:, None, :], params)[:, 0, :]

    return fit, qdq, (None if g >= cols else g)


def gptq_format(
    fmt: WeightFormat, w: torch.Tensor, h: torch.Tensor, config: GPTQConfig | None = None
) -> torch.Tensor:
    """GPTQ rounding of a 2-D weight in a `quant.formats` scheme."""
    fit, qdq, g = format_rounding(fmt, w)
    return gptq_rounding(w, h, fit, qdq, g, config)


def fixed_params_rounding(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, rows: int):
    """(fit, qdq) for a calibrated legacy integer quantizer: scales per row (or one), fixed."""
    s = scale.reshape(-1, 1).expand(rows, 1).float() if scale.dim() else scale.float().expand(rows, 1)
    z = zero_point.reshape(-1, 1).expand(rows, 1).float() if zero_point.dim() else zero_point.float().expand(rows, 1)

    def fit(_group: torch.Tensor) -> tuple:
        return (s, z)

    def qdq(x: torch.Tensor, params: tuple) -> torch.Tensor:
        sc, zp = params
        return (torch.clamp(torch.round(x / sc + zp), qmin, qmax) - zp) * sc

    return fit, qdq
