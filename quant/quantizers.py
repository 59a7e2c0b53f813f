"""Quantizers: small classes behind one interface, kept in a registry keyed by name.

A quantizer maps a float tensor onto an integer grid and back ("fake quantization"), with straight-through
gradients so the same objects serve post-training quantization and QAT. Uniform quantizers take their range
from calibration (`set_range`); ternary and binary quantizers derive their scale from the tensor itself.

Conventions:
- per-channel scales run along `ch_axis` (0 for Conv/Linear weights: output channels);
- symmetric signed weights use the narrow range [-(2^(b-1)-1), 2^(b-1)-1], so zero is exact and the grid is
  symmetric (2 bits is then {-1, 0, 1}, as TensorRT and ModelOpt do);
- bit-widths 16 and 32 mean "leave in float" (16 rounds through float16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .errors import BitsearchError
from .registry import Registry

#: Every quantizer by name; a second quantizer under a taken name is refused.
QUANTIZERS: Registry[type["Quantizer"]] = Registry("quantizer")

_EPS = 1e-12


def register_quantizer(cls: type["Quantizer"]) -> type["Quantizer"]:
    """Class decorator: make a quantizer available by its `name`."""
    return QUANTIZERS.register(cls)


def make_quantizer(name: str, bits: int, **kwargs) -> "Quantizer":
    if name not in QUANTIZERS:
        raise BitsearchError(f"unknown quantizer {name!r}; known: {sorted(QUANTIZERS)}")
    return QUANTIZERS[name](bits, **kwargs)


def round_ste(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """Round to nearest (or stochastically: floor(x + U[0,1)), unbiased) with an identity gradient."""
    r = torch.floor(x + torch.rand_like(x)) if stochastic else torch.round(x)
    return x + (r - x).detach()


class Quantizer(nn.Module):
    """Interface: `forward(x)` fake-quantizes; `quantize(x)` returns the integer grid values.

    Subclasses implement `levels()` and `qparams(lo, hi)` (uniform) or override `forward`/`quantize`.
    The functional forms (`qparams`, `fake_quant`) take explicit scales so clipping searches can try many
    ranges without touching the module's state.
    """

    name: ClassVar[str] = ""
    signed: ClassVar[bool] = True
    #: True when the scale comes from the tensor itself (ternary, binary, float): no calibration needed.
    self_calibrating: ClassVar[bool] = False
    min_bits: ClassVar[int] = 2

    def __init__(self, bits: int, per_channel: bool = False, ch_axis: int = 0, stochastic: bool = False):
        super().__init__()
        if not self.self_calibrating and not (self.min_bits <= bits <= 8):
            raise BitsearchError(f"{self.name} quantizer takes {self.min_bits}..8 bits, got {bits}")
        self.bits = int(bits)
        self.per_channel = per_channel
        self.ch_axis = ch_axis
        self.stochastic = stochastic
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.calibrated = self.self_calibrating

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, stochastic={self.stochastic}"

    # --- the grid -------------------------------------------------------------------------------
    def levels(self) -> tuple[int, int]:
        raise NotImplementedError

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point that cover the clipping range [lo, hi] (tensors of equal shape)."""
        raise NotImplementedError

    # --- state ----------------------------------------------------------------------------------
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo = torch.as_tensor(lo, dtype=torch.float32)
        hi = torch.as_tensor(hi, dtype=torch.float32)
        scale, zp = self.qparams(lo, hi)
        self.scale = scale.detach().clone()
        self.zero_point = zp.detach().clone()
        self.calibrated = True

    def reduce_dims(self, x: torch.Tensor) -> list[int]:
        """Dimensions a range statistic reduces over (all but the channel axis when per channel)."""
        if not self.per_channel:
            return list(range(x.dim()))
        return [d for d in range(x.dim()) if d != self.ch_axis % x.dim()]

    def minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self.reduce_dims(x)
        return x.amin(dim=dims), x.amax(dim=dims)

    def _bcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or not self.per_channel:
            return t
        shape = [1] * x.dim()
        shape[self.ch_axis % x.dim()] = -1
        return t.reshape(shape)

    # --- functional forms -----------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Fake-quantize with explicit (already broadcastable) scale and zero point; clipped STE."""
        qmin, qmax = self.levels()
        q = torch.clamp(round_ste(x / scale + zero_point, self.stochastic), qmin, qmax)
        return (q - zero_point) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise RuntimeError(f"{self.name} quantizer used before calibration (call set_range)")
        return self.fake_quant(x, self._bcast(self.scale, x), self._bcast(self.zero_point, x))

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integer grid values (int32) that `forward` dequantizes."""
        qmin, qmax = self.levels()
        s, z = self._bcast(self.scale, x), self._bcast(self.zero_point, x)
        v = x / s + z
        r = torch.floor(v + torch.rand_like(v)) if self.stochastic else torch.round(v)
        return torch.clamp(r, qmin, qmax).to(torch.int32)


@register_quantizer
class SymmetricQuantizer(Quantizer):
    """Signed, symmetric, zero point 0: the usual weight quantizer (per channel or per tensor)."""

    name = "int_sym"

    def levels(self) -> tuple[int, int]:
        q = 2 ** (self.bits - 1) - 1
        return -q, q

    def qparams(self, lo, hi):
        qmax = self.levels()[1]
        amax = torch.maximum(lo.abs(), hi.abs())
        return torch.clamp(amax / qmax, min=_EPS), torch.zeros_like(amax)


@register_quantizer
class UnsignedQuantizer(Quantizer):
    """Unsigned [0, 2^b - 1] with zero point 0: activations that are never negative (after ReLU)."""

    name = "uint"
    signed = False

    def levels(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def qparams(self, lo, hi):
        return torch.clamp(hi.clamp(min=0) / self.levels()[1], min=_EPS), torch.zeros_like(hi)


@register_quantizer
class AsymmetricQuantizer(Quantizer):
    """Affine [0, 2^b - 1] with an integer zero point, so that 0.0 is exactly representable."""

    name = "int_asym"
    signed = False

    def levels(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def qparams(self, lo, hi):
        qmax = self.levels()[1]
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = torch.clamp((hi - lo) / qmax, min=_EPS)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        return scale, zp


@register_quantizer
class TernaryQuantizer(Quantizer):
    """Ternary weight networks (Li et al. 2016): threshold 0.7·mean|w|, scale = mean |w| above it."""

    name = "ternary"
    self_calibrating = True
    threshold_ratio = 0.7

    def __init__(self, bits: int = 2, per_channel: bool = False, ch_axis: int = 0, stochastic: bool = False):
        super().__init__(2, per_channel, ch_axis, stochastic)

    def levels(self) -> tuple[int, int]:
        return -1, 1

    def _alpha_mask(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self.reduce_dims(w)
        a = w.abs()
        delta = self.threshold_ratio * a.mean(dim=dims, keepdim=True)
        mask = (a > delta).to(w.dtype)
        alpha = (a * mask).sum(dim=dims, keepdim=True) / mask.sum(dim=dims, keepdim=True).clamp(min=1)
        return alpha, mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha, mask = self._alpha_mask(w.detach())
        out = alpha * torch.sign(w.detach()) * mask
        return w + (out - w).detach()

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        _, mask = self._alpha_mask(w)
        return (torch.sign(w) * mask).to(torch.int32)

    @torch.no_grad()
    def step(self, w: torch.Tensor) -> torch.Tensor:
        """The scale α (per channel or per tensor) that multiplies the {-1, 0, 1} grid."""
        return self._alpha_mask(w)[0]


@register_quantizer
class BinaryQuantizer(Quantizer):
    """Binary weights as in XNOR-Net: α·sign(w), α = mean|w| per output channel.

    Its gradient is straight-through where |w| ≤ 1 (the hard-tanh STE of BinaryConnect/XNOR-Net).
    """

    name = "binary"
    self_calibrating = True

    def __init__(self, bits: int = 1, per_channel: bool = True, ch_axis: int = 0, stochastic: bool = False):
        super().__init__(1, per_channel, ch_axis, stochastic)

    def levels(self) -> tuple[int, int]:
        return -1, 1

    @staticmethod
    def _sign(w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = w.detach().abs().mean(dim=self.reduce_dims(w), keepdim=True)
        out = alpha * self._sign(w.detach())
        wc = torch.clamp(w, -1.0, 1.0)  # gradient 1 inside [-1, 1], 0 outside
        return wc + (out - wc).detach()

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return self._sign(w).to(torch.int32)


@register_quantizer
class FloatQuantizer(Quantizer):
    """16 or 32 bits: "leave in float". 16 rounds through float16 so its error is still simulated."""

    name = "float"
    self_calibrating = True

    def __init__(self, bits: int = 32, per_channel: bool = False, ch_axis: int = 0, stochastic: bool = False):
        if bits not in (16, 32):
            raise BitsearchError(f"float quantizer takes 16 or 32 bits, got {bits}")
        super().__init__(bits, per_channel, ch_axis, stochastic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= 32:
            return x
        return x + (x.detach().to(torch.float16).to(x.dtype) - x.detach())

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bits >= 32 else x.to(torch.float16)


if TYPE_CHECKING:
    from .formats import WeightFormat


class SchemeQuantizer(Quantizer):
    """A weight scheme of `quant.formats` (group INT, FP8, MXFP4, NVFP4) as a quantizer module.

    Scales come from the weight itself (block maxima, as the formats define them), optionally shrunk per
    block by a clipping ratio found at calibration (`clip_ratio`, integer schemes only). The forward pass is
    the format's exact fake quantization with a straight-through gradient. Weights are viewed as
    `w.flatten(1)` (rows × input elements), the layout the formats' groups run along.
    """

    name = "scheme"
    self_calibrating = True

    def __init__(self, scheme: "str | WeightFormat", clip_ratio: torch.Tensor | None = None):
        from .formats import parse_scheme

        fmt = parse_scheme(scheme)
        super().__init__(fmt.element_bits, per_channel=True)
        self.format = fmt
        self.register_buffer("clip_ratio", None if clip_ratio is None else clip_ratio.detach().clone())

    def extra_repr(self) -> str:
        return f"scheme={self.format.name!r}, clipped={self.clip_ratio is not None}"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = self.format.fake_quant(w.detach().flatten(1), self.clip_ratio).reshape(w.shape).to(w.dtype)
        return w + (out - w).detach()

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The stored element values: integer codes for INT schemes, grid values for the float ones."""
        from .formats import _blocks

        fmt = self.format
        w2 = w.detach().float().flatten(1)
        rows, cols = w2.shape
        b = _blocks(w2, fmt.group_size(cols))
        ratio = None if self.clip_ratio is None else self.clip_ratio.reshape(rows, -1, 1)
        codes = fmt.codes(b, fmt.fit(b, fmt.tensor_params(w2), ratio)).reshape(rows, -1)[:, :cols]
        codes = codes.reshape(w.shape)
        return codes.to(torch.int32) if fmt.family == "int" else codes


class FixedWeightQuantizer(Quantizer):
    """Returns a precomputed quantized weight (GPTQ's), while the weight is the one it was computed from.

    Once the weight changes (QAT steps), the stored result no longer applies and `fallback` (round to
    nearest in the same scheme) is used instead.
    """

    name = "fixed"
    self_calibrating = True

    def __init__(self, qweight: torch.Tensor, source: torch.Tensor, fallback: Quantizer):
        super().__init__(fallback.bits if fallback.bits <= 8 else 8, fallback.per_channel, fallback.ch_axis)
        if not isinstance(fallback, SchemeQuantizer):
            # On a calibrated grid (fixed scales) GPTQ's values are grid points up to float rounding of its own
            # arithmetic; re-expressing them through the grid's dequantization makes them exactly the values
            # the integer codes give (what an ONNX export reproduces bit for bit).
            with torch.no_grad():
                qweight = fallback(qweight.detach())
        self.register_buffer("qweight", qweight.detach().clone())
        self.fallback = fallback
        # The grid of a calibrated integer quantizer is the one GPTQ rounded onto: readers of scale and
        # zero point (exports) see it here, and `quantize` gives the exact integer codes of `qweight`.
        self.scale = fallback.scale.detach().clone()
        self.zero_point = fallback.zero_point.detach().clone()
        # the weight it was computed from: identity (pointer, version) answers quickly; a copy of the model
        # (deepcopy, export's frozen copy) has another pointer, so equal values are accepted too
        self.register_buffer("source", source.detach().clone(), persistent=False)
        self._source = (source.data_ptr(), source._version)

    def levels(self) -> tuple[int, int]:
        return self.fallback.levels()

    def extra_repr(self) -> str:
        return "rounding=gptq"

    def matches(self, w: torch.Tensor) -> bool:
        if w.shape != self.qweight.shape:
            return False
        if (w.data_ptr(), w._version) == self._source:
            return True
        with torch.no_grad():
            same = w.device == self.source.device and torch.equal(w.detach(), self.source.to(w.dtype))
        if same:
            self._source = (w.data_ptr(), w._version)
        return same

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.matches(w):
            return self.fallback(w)
        if not (torch.is_grad_enabled() and w.requires_grad):
            return self.qweight.to(w.dtype)  # exactly the grid values (w + (q - w) may differ by an ulp)
        return w + (self.qweight.to(w.dtype) - w).detach()

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Codes of the GPTQ weight: exact for calibrated integer grids; a scheme re-derives its block
        scales from the GPTQ weight (the scales GPTQ fitted on its updated weights are not kept)."""
        return self.fallback.quantize(self.qweight if self.matches(w) else w)
