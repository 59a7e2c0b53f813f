"""Weight formats ("schemes"): integer per channel or per group, FP8 E4M3, MXFP4/MXFP8, NVFP4, and the rest.

A layer's bit option is a weight scheme plus activation bits. A scheme is named by a stable string
(`parse_scheme("int4-g128")`) and realised by one class of the `FORMATS` registry with a config dataclass that
validates its settings:

=====================  ========================================================================================
name                   meaning
=====================  ========================================================================================
``int{b}``             signed integer, b ∈ 2..8, one fp16 scale per output channel, symmetric narrow range
``int{b}-asym``        the same with an integer zero point per channel (grid [0, 2^b - 1])
``int{b}-g{g}``        one fp16 scale per group of g ∈ {16, 32, 64, 128, 256} consecutive input elements
``int{b}-g{g}-asym``   group scale and a b-bit zero point per group (GPTQ/AWQ layout)
``fp8-e4m3``           OCP FP8 E4M3 (max 448) elements, one fp32 scale per output channel
``fp8-e4m3-tensor``    the same with one fp32 scale for the whole tensor
``mxfp4``              OCP MX: E2M1 elements, one E8M0 (power-of-two) scale per 32 input elements
``mxfp8``              OCP MX: E4M3 elements, one E8M0 scale per 32
``nvfp4``              E2M1 elements, one FP8 E4M3 scale per 16 input elements and one fp32 tensor scale
``ternary``            {-α, 0, α} (TWN), ``binary`` ±α (XNOR), ``fp16`` / ``fp32``: the legacy options
=====================  ========================================================================================

Layout: a weight is viewed as `weight.flatten(1)`, rows × cols (rows = output channels for Conv/Linear, cols =
the input elements one row multiplies); groups and blocks run along cols, and a last partial group is padded
with zeros (which never changes a block maximum). `storage_bits(rows, cols)` is the exact storage of the
quantized tensor *including* scales and zero points, so bits per weight = storage / (rows·cols): int4-g128 with
fp16 scales stores 4 + 16/128 = 4.125, mxfp4 4 + 8/32 = 4.25, nvfp4 4 + 8/16 = 4.5 plus 32 bits per tensor.

Fake quantization here is exact and deterministic (round half to even on the element grid, as the MX and
CUDA conversions do; scales rounded to their storage type); `quant.quantizers.SchemeQuantizer` adds the
straight-through gradient for QAT. Every format splits into `fit` (the scales of a block of columns) and `qdq`
(quantize-dequantize values with given scales), so GPTQ (`quant.gptq`) can quantize column by column.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from .errors import BitsearchError

FORMATS: dict[str, type["WeightFormat"]] = {}

GROUP_SIZES = (16, 32, 64, 128, 256)


def register_format(cls: type["WeightFormat"]) -> type["WeightFormat"]:
    """Class decorator: make a weight format family available by its `family` name."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} has no family name")
    FORMATS[cls.family] = cls
    return cls


# --- minifloat element types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Minifloat:
    """A small IEEE-like float without infinities (OCP FP8 E4M3 "FN", FP4 E2M1): saturating, round half even."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emax(self) -> int:
        """The exponent of the largest normal value (2 for E2M1, 8 for E4M3): the MX spec's emax_elem."""
        return math.frexp(self.max_value)[1] - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest representable value (ties to even mantissa); magnitudes above the max saturate."""
        a = x.abs().clamp(max=self.max_value)
        _, e = torch.frexp(a)  # a = m·2^e with m in [0.5, 1): floor(log2 a) = e - 1
        e = (e - 1).clamp(min=1 - self.bias).to(a.dtype)  # below the smallest normal: the subnormal step
        step = torch.exp2(e - self.man_bits)
        q = (torch.round(a / step) * step).clamp(max=self.max_value)
        return torch.copysign(q, x)

    def values(self) -> list[float]:
        """Every non-negative finite value of the format, ascending (from its bit patterns)."""
        out = set()
        for ebits in range(2**self.exp_bits):
            for m in range(2**self.man_bits):
                if ebits == 0:
                    v = m / 2**self.man_bits * 2.0 ** (1 - self.bias)
                else:
                    v = (1 + m / 2**self.man_bits) * 2.0 ** (ebits - self.bias)
                if v <= self.max_value:
                    out.add(v)
        return sorted(out)


E2M1 = Minifloat("e2m1", 2, 1, 1, 6.0)
E4M3 = Minifloat("e4m3", 4, 3, 7, 448.0)
ELEMENTS = {"fp4": E2M1, "fp8": E4M3}


def _to_fp16(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales to float16 storage, keeping them positive and finite."""
    return s.clamp(min=2.0**-24, max=65504.0).to(torch.float16).to(s.dtype)


def _blocks(w: torch.Tensor, g: int) -> torch.Tensor:
    """(rows, cols) -> (rows, ceil(cols/g), g), the last group zero-padded."""
    rows, cols = w.shape
    nb = -(-cols // g)
    pad = nb * g - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, nb, g)


# --- the interface ---------------------------------------------------------------------------------------


class WeightFormat:
    """One weight scheme: element grid, scale layout, exact fake quantization and exact storage cost."""

    family: ClassVar[str] = ""
    Config: ClassVar[type]
    #: True when a clipping search (`clip_ratio`) may shrink the scale (integer grids); the block-float
    #: formats take their scale from the block maximum by definition.
    clippable: ClassVar[bool] = False

    def __init__(self, config: Any):
        self.config = config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightFormat) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- naming ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        raise NotImplementedError

    @classmethod
    def parse(cls, name: str) -> "WeightFormat | None":
        """An instance when `name` spells a scheme of this family, else None."""
        return None

    @classmethod
    def standard_names(cls) -> list[str]:
        return []

    @property
    def element_bits(self) -> int:
        """Bits per element: the option's `weight_bits` slot."""
        raise NotImplementedError

    # --- cost -------------------------------------------------------------------------------------
    def group_size(self, cols: int) -> int:
        """Input elements that share one scale (cols for per-channel and per-tensor)."""
        return cols

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact bits to store a rows × cols weight in this format, scales and zero points included."""
        raise NotImplementedError

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.storage_bits(rows, cols) / (rows * cols)

    # --- quantization -------------------------------------------------------------------------------
    def tensor_params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters fixed for the whole tensor (NVFP4's and per-tensor FP8's scale)."""
        return {}

    def fit(self, blocks: torch.Tensor, tparams: dict, clip_ratio: torch.Tensor | None = None) -> tuple:
        """The scales (and zero points) of blocks (rows, nb, g), each shaped (rows, nb, 1)."""
        raise NotImplementedError

    def qdq(self, x: torch.Tensor, params: tuple) -> torch.Tensor:
        """Quantize-dequantize x (rows, nb, k) with params broadcast over its last dim.

        The default suits the scaled-element formats (FP8, MX, NVFP4): params[0] is the decoded scale."""
        return self.codes(x, params) * params[0]

    def codes(self, x: torch.Tensor, params: tuple) -> torch.Tensor:
        """The stored element values (integer codes or grid values) for x, shaped like x."""
        raise NotImplementedError

    @torch.no_grad()
    def fake_quant(self, w: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Exact fake quantization of a 2-D weight (rows, cols); `clip_ratio` (rows, nb) shrinks scales."""
        if w.dim() != 2:
            raise ValueError("fake_quant takes a 2-D weight (rows × input elements)")
        w = w.float()
        rows, cols = w.shape
        g = self.group_size(cols)
        b = _blocks(w, g)
        ratio = None if clip_ratio is None else clip_ratio.reshape(rows, -1, 1)
        out = self.qdq(b, self.fit(b, self.tensor_params(w), ratio))
        return out.reshape(rows, -1)[:, :cols]

    @torch.no_grad()
    def search_clip(self, w: torch.Tensor, col_weight: torch.Tensor | None = None, grid: int = 20) -> torch.Tensor | None:
        """Per block, the clipping ratio in [0.5, 1] minimising Σ col_weight·(Δw)² (weight MSE without one)."""
        if not self.clippable:
            return None
        w = w.float()
        rows, cols = w.shape
        g = self.group_size(cols)
        b = _blocks(w, g)
        cw = None
        if col_weight is not None:
            cw = _blocks(col_weight.float().expand(rows, cols).contiguous(), g)
        tp = self.tensor_params(w)
        best = torch.full(b.shape[:2], float("inf"))
        best_r = torch.ones(b.shape[:2])
        for r in torch.linspace(1.0, 0.5, grid + 1).tolist():
            ratio = torch.full((rows, b.shape[1], 1), r)
            d = (self.qdq(b, self.fit(b, tp, ratio)) - b).pow(2)
            err = (d * cw).sum(-1) if cw is not None else d.sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        return best_r

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, **asdict(self.config)}


# --- integer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntConfig:
    bits: int
    group_size: int | None = None  # None: one scale per output channel
    symmetric: bool = True
    scale_bits: int = 16  # fp16 scales

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise BitsearchError(f"an integer scheme takes 2..8 bits, got {self.bits!r}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise BitsearchError(f"group size must be one of {list(GROUP_SIZES)} (or none), got {self.group_size!r}")
        if self.scale_bits not in (16, 32):
            raise BitsearchError(f"scale_bits must be 16 (fp16) or 32 (fp32), got {self.scale_bits!r}")


_INT_RE = re.compile(r"^int([2-8])(?:-g(\d+))?(-asym)?$")


@register_format
class IntFormat(WeightFormat):
    """Signed symmetric (narrow range, zero exact) or asymmetric integer, per channel or per group."""

    family = "int"
    Config = IntConfig
    clippable = True
    config: IntConfig

    @property
    def name(self) -> str:
        c = self.config
        s = f"int{c.bits}" + (f"-g{c.group_size}" if c.group_size else "") + ("" if c.symmetric else "-asym")
        return s + ("" if c.scale_bits == 16 else f"-s{c.scale_bits}")

    @classmethod
    def parse(cls, name: str) -> "IntFormat | None":
        m = _INT_RE.match(name)
        if not m:
            return None
        return cls(IntConfig(int(m.group(1)), int(m.group(2)) if m.group(2) else None, m.group(3) is None))

    @classmethod
    def standard_names(cls) -> list[str]:
        out = []
        for b in (2, 3, 4, 8):
            for g in (None, 32, 64, 128):
                for sym in (True, False):
                    out.append(cls(IntConfig(b, g, sym)).name)
        return out

    @property
    def element_bits(self) -> int:
        return self.config.bits

    def group_size(self, cols: int) -> int:
        return self.config.group_size or cols

    def storage_bits(self, rows: int, cols: int) -> int:
        c = self.config
        groups = rows * -(-cols // self.group_size(cols))
        per_group = c.scale_bits + (0 if c.symmetric else c.bits)  # b-bit integer zero point when asymmetric
        return rows * cols * c.bits + groups * per_group

    def levels(self) -> tuple[int, int]:
        b = self.config.bits
        return (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) if self.config.symmetric else (0, 2**b - 1)

    def fit(self, blocks, tparams, clip_ratio=None):
        qmin, qmax = self.levels()
        r = 1.0 if clip_ratio is None else clip_ratio
        if self.config.symmetric:
            amax = blocks.abs().amax(-1, keepdim=True) * r
            scale = amax / qmax
            zp = torch.zeros_like(scale)
        else:
            lo = blocks.amin(-1, keepdim=True).clamp(max=0) * r
            hi = blocks.amax(-1, keepdim=True).clamp(min=0) * r
            scale = (hi - lo) / qmax
        scale = _to_fp16(scale) if self.config.scale_bits == 16 else scale.clamp(min=1e-30)
        if not self.config.symmetric:
            zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
        return scale, zp

    def codes(self, x, params):
        scale, zp = params
        qmin, qmax = self.levels()
        return torch.clamp(torch.round(x / scale) + zp, qmin, qmax)

    def qdq(self, x, params):
        scale, zp = params
        return (self.codes(x, params) - zp) * scale


# --- FP8 -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FP8Config:
    granularity: str = "per_channel"  # or "per_tensor"
    scale_bits: int = 32  # fp32 scales, as compressed-tensors and vLLM store them

    def __post_init__(self) -> None:
        if self.granularity not in ("per_channel", "per_tensor"):
            raise BitsearchError(f"FP8 granularity must be per_channel or per_tensor, got {self.granularity!r}")
        if self.scale_bits not in (16, 32):
            raise BitsearchError(f"scale_bits must be 16 or 32, got {self.scale_bits!r}")


@register_format
class FP8Format(WeightFormat):
    """OCP FP8 E4M3 elements (max 448, no infinities) with an fp32 scale per channel or per tensor."""

    family = "fp8"
    Config = FP8Config
    config: FP8Config

    @property
    def name(self) -> str:
        return "fp8-e4m3" + ("" if self.config.granularity == "per_channel" else "-tensor")

    @classmethod
    def parse(cls, name: str) -> "FP8Format | None":
        if name in ("fp8-e4m3", "fp8"):
            return cls(FP8Config("per_channel"))
        if name == "fp8-e4m3-tensor":
            return cls(FP8Config("per_tensor"))
        return None

    @classmethod
    def standard_names(cls) -> list[str]:
        return ["fp8-e4m3", "fp8-e4m3-tensor"]

    @property
    def element_bits(self) -> int:
        return 8

    def storage_bits(self, rows: int, cols: int) -> int:
        scales = rows if self.config.granularity == "per_channel" else 1
        return rows * cols * 8 + scales * self.config.scale_bits

    def tensor_params(self, w):
        if self.config.granularity == "per_tensor":
            return {"amax": w.abs().amax()}
        return {}

    def fit(self, blocks, tparams, clip_ratio=None):
        if "amax" in tparams:
            amax = tparams["amax"].expand(blocks.shape[0], blocks.shape[1], 1)
        else:
            amax = blocks.abs().amax(-1, keepdim=True)
        scale = amax / E4M3.max_value
        if self.config.scale_bits == 16:
            scale = _to_fp16(scale)
        return (torch.where(scale > 0, scale, torch.ones_like(scale)),)

    def codes(self, x, params):
        return E4M3.quantize(x / params[0])


# --- MX (OCP Microscaling) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MXConfig:
    element: str = "fp4"  # "fp4" (E2M1) or "fp8" (E4M3)
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise BitsearchError(f"MX element must be one of {sorted(ELEMENTS)}, got {self.element!r}")
        if self.block_size != 32:
            raise BitsearchError("the OCP MX formats have a block size of 32")


@register_format
class MXFormat(WeightFormat):
    """OCP MX v1.0: a shared E8M0 scale X = 2^(floor(log2 amax) - emax_elem) per 32 elements."""

    family = "mx"
    Config = MXConfig
    config: MXConfig

    @property
    def name(self) -> str:
        return f"mx{self.config.element}"

    @classmethod
    def parse(cls, name: str) -> "MXFormat | None":
        if name in ("mxfp4", "mxfp8"):
            return cls(MXConfig(name[2:]))
        return None

    @classmethod
    def standard_names(cls) -> list[str]:
        return ["mxfp4", "mxfp8"]

    @property
    def elem(self) -> Minifloat:
        return ELEMENTS[self.config.element]

    @property
    def element_bits(self) -> int:
        return self.elem.bits

    def group_size(self, cols: int) -> int:
        return self.config.block_size

    def storage_bits(self, rows: int, cols: int) -> int:
        return rows * cols * self.element_bits + rows * -(-cols // self.config.block_size) * 8

    def fit(self, blocks, tparams, clip_ratio=None):
        amax = blocks.abs().amax(-1, keepdim=True)
        _, e = torch.frexp(amax)
        shared = (e - 1 - self.elem.emax).clamp(-127, 127).to(blocks.dtype)
        scale = torch.where(amax > 0, torch.exp2(shared), torch.ones_like(amax))
        return (scale,)

    def codes(self, x, params):
        return self.elem.quantize(x / params[0])


# --- NVFP4 -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NVFP4Config:
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.block_size != 16:
            raise BitsearchError("NVFP4 has a block size of 16")


@register_format
class NVFP4Format(WeightFormat):
    """NVIDIA NVFP4: E2M1 elements, an E4M3 scale per 16, an fp32 tensor scale S = amax / (6·448).

    Block scale s = E4M3(amax_block / (6·S)); an element is E2M1(x / (s·S)) and decodes to q·s·S.
    """

    family = "nvfp4"
    Config = NVFP4Config

    @property
    def name(self) -> str:
        return "nvfp4"

    @classmethod
    def parse(cls, name: str) -> "NVFP4Format | None":
        return cls(NVFP4Config()) if name == "nvfp4" else None

    @classmethod
    def standard_names(cls) -> list[str]:
        return ["nvfp4"]

    @property
    def element_bits(self) -> int:
        return 4

    def group_size(self, cols: int) -> int:
        return 16

    def storage_bits(self, rows: int, cols: int) -> int:
        return rows * cols * 4 + rows * -(-cols // 16) * 8 + 32

    def tensor_params(self, w):
        amax = w.abs().amax()
        return {"tensor_scale": amax / (E2M1.max_value * E4M3.max_value)}

    def fit(self, blocks, tparams, clip_ratio=None):
        ts = tparams.get("tensor_scale")
        if ts is None:
            ts = blocks.abs().amax() / (E2M1.max_value * E4M3.max_value)
        if float(ts) == 0.0:
            return (torch.zeros(blocks.shape[0], blocks.shape[1], 1),)
        amax = blocks.abs().amax(-1, keepdim=True)
        s = E4M3.quantize(amax / (E2M1.max_value * ts))
        return (s * ts,)

    def codes(self, x, params):
        eff = params[0]
        safe = torch.where(eff > 0, eff, torch.ones_like(eff))
        return torch.where(eff > 0, E2M1.quantize(x / safe), torch.zeros_like(x))


# --- the legacy options, so every option has a scheme name -----------------------------------------------


@dataclass(frozen=True)
class LegacyConfig:
    kind: str  # "ternary", "binary", "fp16", "fp32"

    def __post_init__(self) -> None:
        if self.kind not in ("ternary", "binary", "fp16", "fp32"):
            raise BitsearchError(f"unknown legacy scheme {self.kind!r}")


@register_format
class LegacyFormat(WeightFormat):
    """Ternary (TWN, 2-bit slot), binary (XNOR, α per channel) and float: fp16 and fp32 weights."""

    family = "legacy"
    Config = LegacyConfig
    config: LegacyConfig

    @property
    def name(self) -> str:
        return self.config.kind

    @classmethod
    def parse(cls, name: str) -> "LegacyFormat | None":
        return cls(LegacyConfig(name)) if name in ("ternary", "binary", "fp16", "fp32") else None

    @classmethod
    def standard_names(cls) -> list[str]:
        return ["ternary", "binary", "fp16", "fp32"]

    @property
    def element_bits(self) -> int:
        return {"ternary": 2, "binary": 1, "fp16": 16, "fp32": 32}[self.config.kind]

    def storage_bits(self, rows: int, cols: int) -> int:
        k = self.config.kind
        scales = rows * 32 if k in ("ternary", "binary") else 0  # fp32 α per output channel
        return rows * cols * self.element_bits + scales

    @torch.no_grad()
    def fake_quant(self, w, clip_ratio=None):
        from .quantizers import make_quantizer  # quantizers import this module

        k = self.config.kind
        if k == "fp32":
            return w.float().clone()
        if k == "fp16":
            return w.to(torch.float16).float()
        return make_quantizer(k, self.element_bits, per_channel=True)(w.float())


# --- lookup ----------------------------------------------------------------------------------------------

_CACHE: dict[str, WeightFormat] = {}


def parse_scheme(name: str) -> WeightFormat:
    """The format a scheme name spells (case-insensitive), or a BitsearchError listing the known names."""
    if isinstance(name, WeightFormat):
        return name
    if not isinstance(name, str):
        raise BitsearchError(f"a scheme name must be a string, got {name!r}")
    key = name.strip().lower()
    if key in _CACHE:
        return _CACHE[key]
    for cls in FORMATS.values():
        try:
            fmt = cls.parse(key)
        except BitsearchError as exc:
            raise BitsearchError(f"weight scheme {name!r}: {exc}") from None
        if fmt is not None:
            _CACHE[key] = fmt
            return fmt
    raise BitsearchError(
        f"unknown weight scheme {name!r}; known: int<b>[-g<g>][-asym] (b 2..8, g in {list(GROUP_SIZES)}), "
        + ", ".join(n for cls in FORMATS.values() if cls.family != "int" for n in cls.standard_names())
    )


def is_scheme_name(name: str) -> bool:
    try:
        parse_scheme(name)
    except BitsearchError:
        return False
    return True


def standard_schemes() -> list[str]:
    """The scheme names documented as stable (a selection; every int<b>-g<g> combination also parses)."""
    return [n for cls in FORMATS.values() for n in cls.standard_names()]
