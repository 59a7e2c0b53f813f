"""Learnable quantizers for QAT, registered beside the static ones (`quant.quantizers.QUANTIZERS`).

All three are `Quantizer` subclasses, so a `QuantizedLayer` holds them like any other quantizer, and
`make_quantizer("lsq", 4, ...)` builds them once `quant.qat` is imported.

`lsq` — Learned Step Size Quantization (Esser et al., ICLR 2020)
    v̂ = round(clip(v / s, -Q_N, Q_P)) · s with a learned step s (`nn.Parameter` named `scale`, one per tensor
    or one per output channel). Gradients (the paper's eq. 3, straight-through round):
        ∂v̂/∂v = 1 if -Q_N ≤ v/s ≤ Q_P else 0
        ∂v̂/∂s = round(v/s) - v/s inside, -Q_N below, Q_P above,
    and the step's gradient is scaled by g = 1/√(N·Q_P) through the value-preserving trick
    `s' = (s - s·g).detach() + s·g`, where N is the number of elements that share one step: the weights of
    one output channel (per channel) or of the tensor (per tensor), and, for activations, the features of
    one sample (`x[0].numel()`). Init as in the paper: s = 2⟨|v|⟩/√Q_P (`init_from_tensor`), or from a
    calibrated range (`set_range`).
    Grid: unsigned activations use [0, 2^b - 1] (Q_N = 0). Signed tensors use the project's narrow symmetric
    grid Q_N = Q_P = 2^(b-1) - 1 (as `int_sym`: zero exact, 2 bits = {-1, 0, 1}); `narrow=False` gives the
    paper's Q_N = 2^(b-1). Q_P, and so the init and the gradient scale, are the paper's either way.
    `asymmetric=True` (LSQ+, Bhalgat et al. 2020) adds a learned offset β (`nn.Parameter` named `offset`,
    gradient-scaled like s): x̂ = round(clamp((x - β)/s, 0, 2^b - 1))·s + β, all 2^b levels over [β, β + s·Q_P].
    The trainer uses it for activations that can be negative (a network's input), initialised from the
    calibrated `int_asym` range, i.e. exactly the PTQ quantizer; β is not forced onto a multiple of s, so an
    integer export rounds the zero point -β/s (an error below half a step).

`pact` — Parameterized Clipping Activation (Choi et al., 2018)
    y = clamp(x, 0, α), y_q = round(y · n/α) · α/n with n = 2^b - 1 and a learned clip α (`nn.Parameter`
    named `alpha`; init 6, a given value or a calibrated range). Straight-through round, so
        ∂y_q/∂x = 1 for 0 ≤ x < α, else 0;   ∂y_q/∂α = 1 for x ≥ α, else 0   (the paper's eq. 3).
    `residual_grad=True` also keeps the term the STE drops inside the range, ∂y_q/∂α = (round(y/Δ) - y/Δ)/n
    with Δ = α/n (the LSQ-like variant); it is off by default, as in the paper. An L2 penalty on α is the
    trainer's `pact_l2` (see `pact_l2_penalty`). PACT is for non-negative inputs (after ReLU): the trainer
    uses asymmetric LSQ (LSQ+) for inputs that can be negative (a network's first layer, say).

`dorefa` — DoReFa-Net weights (Zhou et al., 2016)
    w_q = m · (2·quantize_k(tanh(w) / (2·max|tanh(w)|) + ½) - 1),  quantize_k(r) = round((2^k - 1)·r)/(2^k - 1)
    with a straight-through round inside quantize_k; tanh and the max are differentiated as written (the max
    passes gradient to its arg-max element). The paper's w_q lies in [-1, 1]; m = max|w| (detached,
    recomputed each call, per tensor or per output channel with `per_channel=True`) puts it back on the
    weights' own scale, so that a pretrained layer keeps its output magnitude: for small weights tanh(w) ≈ w
    and w_q ≈ w. The grid has 2^k levels, symmetric, without zero ({-1, -⅓, ⅓, 1}·m at 2 bits).

Every learnable quantizer also implements `grid_values(w)` (w in grid units, differentiable in w, the step
detached) and `grid_levels()`, which Bin Regularization (`quant.qat.binreg`) reads, and `change_bits(b)`,
which re-initialises it in place for another bit-width keeping its clipping range (the step scales by
Q_P(old)/Q_P(new)), as the trainer's bit-width hook needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import BitsearchError
from ..quantizers import Quantizer, register_quantizer

_EPS = 1e-8


def grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """Return `t` unchanged in value, with its gradient multiplied by `g` (LSQ's gradient scaling)."""
    tg = t * g
    return (t - tg).detach() + tg


def _float_io(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Quantizer arithmetic runs in float32 (bf16 under autocast cannot hold a 256-level grid exactly)."""
    if x.dtype in (torch.float32, torch.float64):
        return x, x.dtype
    return x.float(), x.dtype


class _LSQFunction(torch.autograd.Function):
    """round(clamp(x / s, qmin, qmax)) · s with LSQ's gradients, in one fused node.

    Fusing saves the eager chain (divide, clamp, straight-through round, multiply) several passes over the
    activation in both directions. The backward evaluates the paper's piecewise gradient from what the
    forward keeps: v = x/s, the output (the next layer holds it anyway) and a one-byte mask of the elements
    inside the range (x itself is not kept, so in-place ops on the input after this node stay legal).
    With r = clamp(v):
        ∂L/∂x = g·[inside]
        ∂L/∂s = Σ g·(round(r) - r·[inside])   (round(v) - v inside, the clamped bound outside)
              = Σ g·out / s - Σ (g·[inside])·v.
    `s` is already broadcastable to `x`; the scale gradient is reduced to s's shape.
    """

    @staticmethod
    def forward(ctx, x, s, qmin: int, qmax: int):
        v = x / s
        r = torch.clamp(v, qmin, qmax)
        inside = r == v
        out = r.round_().mul_(s)
        ctx.save_for_backward(v, s, inside, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        v, s, inside, out = ctx.saved_tensors
        gx = torch.where(inside, grad, 0.0)  # (grad * inside would first convert the mask to float)
        gs = None
        if ctx.needs_input_grad[1]:
            if s.numel() == 1:
                gs = torch.vdot(grad.reshape(-1), out.reshape(-1)) / s - torch.vdot(gx.reshape(-1), v.reshape(-1))
            else:
                gs = (grad * out).sum_to_size(s.shape) / s - (gx * v).sum_to_size(s.shape)
            gs = gs.reshape(s.shape)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None


class _PACTFunction(torch.autograd.Function):
    """PACT: round(clamp(x, 0, α) · n/α) · α/n with the paper's gradients (optionally the residual term)."""

    @staticmethod
    def forward(ctx, x, alpha, n: int, residual: bool):
        step = alpha / n
        y = torch.minimum(torch.clamp(x, min=0), alpha)
        out = (y / step).round_().mul_(step)
        ctx.save_for_backward(x, alpha)
        ctx.n, ctx.residual = n, residual
        return out

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        above = x >= alpha
        inside = (x >= 0) & ~above
        gx = grad * inside
        ga = None
        if ctx.needs_input_grad[1]:
            ga = (grad * above).sum()
            if ctx.residual:
                step = alpha / ctx.n
                v = torch.clamp(x, min=0) / step
                ga = ga + (gx * (v.round() - v)).sum() / ctx.n
            ga = ga.reshape(alpha.shape)
        return (gx if ctx.needs_input_grad[0] else None), ga, None, None


class LearnableQuantizer(Quantizer):
    """Common interface of the QAT quantizers (see the module docstring)."""

    learnable = True

    def grid_levels(self) -> tuple[int, int]:
        return self.levels()

    def grid_values(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def change_bits(self, bits: int) -> None:
        raise NotImplementedError

    def spec(self) -> dict:
        """Constructor arguments, JSON-serialisable: enough to rebuild the module before loading its state."""
        raise NotImplementedError


@register_quantizer
class LSQQuantizer(LearnableQuantizer):
    """Learned step size (LSQ); `kind` is "weight" or "activation" (it picks N of the gradient scale)."""

    name = "lsq"

    def __init__(
        self,
        bits: int,
        per_channel: bool = False,
        ch_axis: int = 0,
        stochastic: bool = False,
        signed: bool = True,
        kind: str = "weight",
        channels: int = 1,
        narrow: bool = True,
        asymmetric: bool = False,
    ):
        if stochastic:
            raise BitsearchError("the lsq quantizer does not implement stochastic rounding")
        if kind not in ("weight", "activation"):
            raise BitsearchError(f"lsq kind must be 'weight' or 'activation', got {kind!r}")
        super().__init__(bits, per_channel, ch_axis, stochastic)
        self.asymmetric = bool(asymmetric)
        # `signed` shadows the class attribute: one class serves both. The asymmetric grid is unsigned.
        self.signed = bool(signed) and not self.asymmetric
        self.kind = kind
        self.narrow = bool(narrow)
        del self.scale  # the buffer becomes the learned parameter of the same name
        shape = (int(channels),) if per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape))
        if self.asymmetric:
            self.offset = nn.Parameter(torch.zeros(shape))
        self.calibrated = False

    def extra_repr(self) -> str:
        kind = "asymmetric" if self.asymmetric else ("signed" if self.signed else "unsigned")
        return f"bits={self.bits}, per_channel={self.per_channel}, {kind}, kind={self.kind}"

    def spec(self) -> dict:
        return {
            "name": self.name, "bits": self.bits, "per_channel": self.per_channel, "ch_axis": self.ch_axis,
            "signed": self.signed, "kind": self.kind, "channels": int(self.scale.numel()), "narrow": self.narrow,
            "asymmetric": self.asymmetric,
        }

    def levels(self) -> tuple[int, int]:
        if not self.signed:
            return 0, 2**self.bits - 1
        qp = 2 ** (self.bits - 1) - 1
        return (-qp if self.narrow else -(qp + 1)), qp

    @property
    def qp(self) -> int:
        return self.levels()[1]

    # --- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _set_scale(self, s: torch.Tensor) -> None:
        s = torch.as_tensor(s, dtype=torch.float32).to(self.scale.device).clamp(min=_EPS)
        if not self.per_channel:
            s = s.reshape(())
        if s.shape != self.scale.shape:
            self.scale = nn.Parameter(s.clone())  # only before an optimizer holds the old one
        else:
            self.scale.copy_(s)
        self.calibrated = True

    @torch.no_grad()
    def _set_offset(self, beta: torch.Tensor) -> None:
        beta = torch.as_tensor(beta, dtype=torch.float32).to(self.scale.device).reshape(self.scale.shape)
        if beta.shape != self.offset.shape:
            self.offset = nn.Parameter(beta.clone())
        else:
            self.offset.copy_(beta)

    def set_range(self, lo, hi) -> None:
        """Step from a calibrated clipping range: max(|lo|, |hi|)/Q_P (signed), hi/Q_P (unsigned), or
        (hi - lo)/Q_P with offset lo (asymmetric)."""
        lo = torch.as_tensor(lo, dtype=torch.float32)
        hi = torch.as_tensor(hi, dtype=torch.float32)
        if self.asymmetric:
            self._set_scale((hi - lo) / self.qp)
            self._set_offset(lo)
            return
        amax = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp(min=0)
        self._set_scale(amax / self.qp)

    @torch.no_grad()
    def init_from_tensor(self, x: torch.Tensor) -> None:
        """The paper's init, s = 2⟨|x|⟩/√Q_P (per channel for per-channel weights); for the asymmetric
        grid LSQ+'s min/max init, s = (max - min)/Q_P, offset = min."""
        x = x.detach().float()
        if self.asymmetric:
            if self.per_channel:
                lo, hi = x.amin(dim=self.reduce_dims(x)), x.amax(dim=self.reduce_dims(x))
            else:
                lo, hi = x.min(), x.max()
            self.set_range(lo, hi)
            return
        a = x.abs()
        mean = a.mean(dim=self.reduce_dims(a)) if self.per_channel else a.mean()
        self._set_scale(2 * mean / math.sqrt(self.qp))

    @torch.no_grad()
    def change_bits(self, bits: int) -> None:
        """Another bit-width, the same clipping range: s ← s · Q_P(old) / Q_P(new) (the offset stays)."""
        old = self.qp
        if not (self.min_bits <= bits <= 8):
            raise BitsearchError(f"{self.name} quantizer takes {self.min_bits}..8 bits, got {bits}")
        self.bits = int(bits)
        self.scale.mul_(old / self.qp)

    # --- forward ----------------------------------------------------------------------------------
    def _elements_per_step(self, x: torch.Tensor) -> int:
        if self.kind == "activation":
            return max(1, x[0].numel()) if x.dim() > 1 else max(1, x.numel())
        if self.per_channel:
            return max(1, x.numel() // max(1, x.shape[self.ch_axis % x.dim()]))
        return max(1, x.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise RuntimeError("lsq quantizer used before initialisation (set_range or init_from_tensor)")
        xf, dtype = _float_io(x)
        qmin, qmax = self.levels()
        g = 1.0 / math.sqrt(self._elements_per_step(x) * qmax)
        s = grad_scale(self.scale, g)
        if self.asymmetric:
            # LSQ+: x̂ = round(clamp((x - β)/s, 0, Q_P))·s + β; autograd gives ∂x̂/∂β = 1 outside the range,
            # 0 inside, and the step's gradient is LSQ's on x - β.
            beta = self._bcast(grad_scale(self.offset, g), xf)
            out = _LSQFunction.apply(xf - beta, self._bcast(s, xf), qmin, qmax) + beta
        else:
            out = _LSQFunction.apply(xf, self._bcast(s, xf), qmin, qmax)
        return out if out.dtype == dtype else out.to(dtype)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.levels()
        v = x.float()
        if self.asymmetric:
            v = v - self._bcast(self.offset, v)
        return torch.clamp(torch.round(v / self._bcast(self.scale, v)), qmin, qmax).to(torch.int32)

    def grid_values(self, w: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            w = w - self._bcast(self.offset.detach(), w)
        return w / self._bcast(self.scale.detach(), w)

    def step_size(self) -> torch.Tensor:
        return self.scale.detach()


def pact_l2_penalty(model: nn.Module) -> torch.Tensor | None:
    """Σ α² over the PACT quantizers of `model` (None when it has none)."""
    alphas = [m.alpha for m in model.modules() if isinstance(m, PACTQuantizer)]
    if not alphas:
        return None
    return torch.stack([a.reshape(()) ** 2 for a in alphas]).sum()


@register_quantizer
class PACTQuantizer(LearnableQuantizer):
    """PACT activation quantizer: unsigned [0, α] on 2^b levels with a learned clip α."""

    name = "pact"
    signed = False

    def __init__(
        self,
        bits: int,
        per_channel: bool = False,
        ch_axis: int = 0,
        stochastic: bool = False,
        alpha: float = 6.0,
        residual_grad: bool = False,
    ):
        if per_channel or stochastic:
            raise BitsearchError("the pact quantizer is per tensor and rounds to nearest")
        super().__init__(bits, False, ch_axis, False)
        if not alpha > 0:
            raise BitsearchError(f"pact alpha must be positive, got {alpha!r}")
        del self.scale  # the step is α/(2^b - 1): see step_size()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.residual_grad = bool(residual_grad)
        self.calibrated = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha):.4g}, residual_grad={self.residual_grad}"

    def spec(self) -> dict:
        return {"name": self.name, "bits": self.bits, "residual_grad": self.residual_grad}

    def levels(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def set_range(self, lo, hi) -> None:
        """α from a calibrated range (its upper end)."""
        with torch.no_grad():
            self.alpha.fill_(max(float(torch.as_tensor(hi).max()), _EPS))

    def change_bits(self, bits: int) -> None:
        if not (self.min_bits <= bits <= 8):
            raise BitsearchError(f"{self.name} quantizer takes {self.min_bits}..8 bits, got {bits}")
        self.bits = int(bits)  # α is the range: it stays

    def step_size(self) -> torch.Tensor:
        return self.alpha.detach() / self.levels()[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, dtype = _float_io(x)
        out = _PACTFunction.apply(xf, self.alpha, self.levels()[1], self.residual_grad)
        return out if out.dtype == dtype else out.to(dtype)

    def grid_values(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0) / self.step_size()

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        n = self.levels()[1]
        return torch.round(torch.clamp(x, min=0).minimum(self.alpha) / self.step_size()).clamp(0, n).to(torch.int32)


@register_quantizer
class DoReFaQuantizer(LearnableQuantizer):
    """DoReFa-Net weight quantizer (no learned parameter; the scale comes from the tensor itself)."""

    name = "dorefa"
    self_calibrating = True
    min_bits = 1

    def __init__(self, bits: int, per_channel: bool = False, ch_axis: int = 0, stochastic: bool = False):
        if not (1 <= int(bits) <= 8):
            raise BitsearchError(f"dorefa quantizer takes 1..8 bits, got {bits}")
        if stochastic:
            raise BitsearchError("the dorefa quantizer rounds to nearest")
        super().__init__(bits, per_channel, ch_axis, False)

    def spec(self) -> dict:
        return {"name": self.name, "bits": self.bits, "per_channel": self.per_channel, "ch_axis": self.ch_axis}

    def levels(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return t.amax(dim=self.reduce_dims(t), keepdim=True)
        return t.max()

    def _unit(self, w: torch.Tensor) -> torch.Tensor:
        """tanh(w) / (2·max|tanh(w)|) + ½, in [0, 1]."""
        t = torch.tanh(w)
        return t / (2 * self._max(t.abs()).clamp(min=_EPS)) + 0.5

    def change_bits(self, bits: int) -> None:
        if not (1 <= bits <= 8):
            raise BitsearchError(f"dorefa quantizer takes 1..8 bits, got {bits}")
        self.bits = int(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wf, dtype = _float_io(w)
        n = self.levels()[1]
        r = self._unit(wf) * n
        q = r + (torch.round(r) - r).detach()  # quantize_k with a straight-through round
        m = self._max(wf.detach().abs())
        out = (2 * q / n - 1) * m
        return out if out.dtype == dtype else out.to(dtype)

    def grid_values(self, w: torch.Tensor) -> torch.Tensor:
        return self._unit(w) * self.levels()[1]

    def step_size(self) -> torch.Tensor:
        return torch.tensor(2.0 / self.levels()[1])

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return torch.round(self._unit(w.float()) * self.levels()[1]).to(torch.int32)
