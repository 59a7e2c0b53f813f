"""Fake-quantize any model for an `Allocation`: one call, a config dataclass, the original untouched.

    qmodel = apply_allocation(model, allocation, calibration=batches, config=QuantConfig(weight_clip="auto"))

Each quantizable layer is replaced by a `QuantizedLayer` that quantizes its input activation and its weight.
Calibration statistics are gathered once; `QuantizedLayer.set_bits` then re-derives the quantizers for any
other bit option without another pass over the data, which the sensitivity and search stages rely on.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import Allocation, LayerBits, is_float_bits
from .calibration import CLIP_METHODS, ClipContext, InputStats, calibrate_activation, clip_range
from .errors import BitsearchError
from .gptq import GPTQConfig, fixed_params_rounding, format_rounding, gptq_rounding
from .layers import is_quantizable
from .quantizers import QUANTIZERS, FixedWeightQuantizer, FloatQuantizer, Quantizer, SchemeQuantizer, make_quantizer

DATA_CLIPS = ("output_mse", "auto")  # weight clipping methods that need calibration data
WEIGHT_ROUNDINGS = ("nearest", "gptq")
#: With GPTQ rounding, full input second moments are kept up to this patch size (LLM MLPs reach 14k).
GPTQ_MAX_COV_DIM = 16384


@dataclass
class QuantConfig:
    """How an allocation's bit-widths are realised. JSON-serialisable; every field has a sane default."""

    weight_quantizer: str = "int_sym"
    weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    weight_clip: str = "minmax"
    activation_quantizer: str = "auto"  # "auto": unsigned when the calibrated input is never negative
    activation_clip: str = "minmax"
    percentile: float = 99.99
    #: add E[ΔW·x] to the output of every layer that `bias_correction_applies` to (see there)
    bias_correction: bool = False
    stochastic_rounding: bool = False
    calibration_samples: int = 256
    batch_size: int = 64
    #: "nearest" (round to nearest after clipping) or "gptq" (error-compensated, needs calibration data; a
    #: weight that is also an embedding table is rounded to nearest: `gptq_applies`)
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128

    def __post_init__(self) -> None:
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise BitsearchError(
                f"unknown weight_rounding {self.weight_rounding!r}; known: {list(WEIGHT_ROUNDINGS)}"
            )
        GPTQConfig(self.gptq_damp, self.gptq_block_size)  # validates both
        if self.weight_quantizer not in QUANTIZERS:
            raise BitsearchError(f"unknown weight quantizer {self.weight_quantizer!r}; known: {sorted(QUANTIZERS)}")
        if self.activation_quantizer != "auto" and self.activation_quantizer not in QUANTIZERS:
            raise BitsearchError(
                f"unknown activation quantizer {self.activation_quantizer!r}; known: auto, {sorted(QUANTIZERS)}"
            )
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise BitsearchError("weight_granularity must be 'per_channel' or 'per_tensor'")
        for what, m in (("weight_clip", self.weight_clip), ("activation_clip", self.activation_clip)):
            if m not in CLIP_METHODS:
                raise BitsearchError(f"unknown {what} {m!r}; known: {sorted(CLIP_METHODS)}")
        if self.activation_clip in DATA_CLIPS:
            raise BitsearchError(f"activation_clip {self.activation_clip!r} is for weights only")
        if not 50.0 <= self.percentile <= 100.0:
            raise BitsearchError("percentile must be within [50, 100]")
        if self.calibration_samples < 1 or self.batch_size < 1:
            raise BitsearchError("calibration_samples and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BitsearchError(f"unknown quantization option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


#: How a search realises every allocation when calibration data exist, unless its `quant` settings say
#: otherwise: output-MSE weight clipping, GPTQ error-compensated rounding (not on a tied output head:
#: `gptq_applies`), MSE activation clipping and bias correction (on convolutions and layers with a bias only:
#: `bias_correction_applies`). Against round-to-nearest with min-max activations it is better or level on
#: ResNet-20 and the zoo's digits-cnn / digits-mlp at W2-W4 and W3A4/W4A4 (bench/ptq_recipes.py); GPTQ alone
#: lifts ResNet-20 W2 from 28 % to 53 % and W3 by 2.2 points. Data-free searches keep `QuantConfig()`'s defaults.
SEARCH_PTQ_DEFAULTS: dict[str, Any] = {
    "weight_clip": "auto",
    "weight_rounding": "gptq",
    "activation_clip": "mse",
    "bias_correction": True,
}


def search_quant_config(settings: dict[str, Any] | None, calibration_available: bool = True) -> "QuantConfig":
    """The QuantConfig of a search: the user's settings over `SEARCH_PTQ_DEFAULTS` (over QuantConfig's own
    defaults without calibration data, since the recipe needs them)."""
    base = dict(SEARCH_PTQ_DEFAULTS) if calibration_available else {}
    return QuantConfig.from_dict({**base, **(settings or {})})


def bias_correction_applies(layer: nn.Module) -> bool:
    """Whether bias correction may touch `layer`: a layer that already has a bias (the correction is folded
    into it), or a convolution, whose runtimes always take a bias input (the ONNX QDQ export writes the
    correction as the Conv's bias; ResNet-20's bias-less convs gain +0.1 to +4.1 points from it,
    bench/ptq_recipes.py). A Linear without a bias gets none: adding one changes the graph, and the LLM
    formats that describe such projections (llama.cpp tensor types, compressed-tensors, Hugging Face
    `quantization_config`) cannot carry it, so a search that priced it would report a model no runtime runs."""
    return getattr(layer, "bias", None) is not None or not isinstance(layer, nn.Linear)


def gptq_applies(q: "QuantizedLayer") -> bool:
    """Whether GPTQ rounding may realise `q`'s weight: not when the weight is also an embedding table (a tied
    output head). GPTQ moves each row's rounding error into directions the head's inputs rarely use, but an
    embedding lookup reads the rows as they are: on zoo:tiny-llama's held-out text, GPTQ on the tied head
    took uniform int2-g64 from perplexity 10.9 to 27.1 (bench/llm_schemes.py). Such a weight is rounded to
    nearest under the same clipping."""
    return not q.weight_tied


def _layer_forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(
            x, w, b, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
        )
    return layer._conv_forward(x, w, b)  # Conv1d/2d/3d, padding modes included


class QuantizedLayer(nn.Module):
    """A quantizable layer with an input-activation quantizer and a weight quantizer."""

    def __init__(self, layer: nn.Module, name: str, config: QuantConfig):
        super().__init__()
        self.layer = layer
        self.name = name
        self.config = config
        self.stats: InputStats | None = None
        self.observing = False
        self.bits: LayerBits | None = None
        self.input_quant: Quantizer = FloatQuantizer(32)
        self.weight_quant: Quantizer = FloatQuantizer(32)
        self.register_buffer("bias_correction", None)
        #: the weight is also an embedding table (a tied output head); set by `wrap_model`
        self.weight_tied = False
        self._wq_cache: tuple[int, torch.Tensor] | None = None
        # Derived weight quantizers by option, for the current statistics and weight version: searches and
        # refinement switch a layer between a few options thousands of times, and output-MSE clipping and
        # GPTQ rounding cost far more than the forward pass they feed.
        self._wq_memo: dict[tuple, Quantizer] = {}
        self._wq_memo_stats: InputStats | None = None  # the statistics the memo was derived from

    def extra_repr(self) -> str:
        return f"name={self.name!r}, bits={self.bits.label() if self.bits else None}"

    # --- configuration ----------------------------------------------------------------------------
    def _make_weight_quantizer(self, bits: LayerBits) -> Quantizer:
        per_channel = self.config.weight_granularity == "per_channel"
        kw = dict(per_channel=per_channel, ch_axis=0, stochastic=self.config.stochastic_rounding)
        if is_float_bits(bits.weight_bits):
            return FloatQuantizer(bits.weight_bits)
        if bits.scheme is not None:
            return SchemeQuantizer(bits.scheme)
        if bits.weight_quantizer == "ternary":
            return make_quantizer("ternary", 2, **kw)
        if bits.weight_bits == 1 or bits.weight_quantizer == "binary":
            return make_quantizer("binary", 1, **{**kw, "per_channel": True})
        return make_quantizer(self.config.weight_quantizer, bits.weight_bits, **kw)

    def _make_input_quantizer(self, bits: LayerBits) -> Quantizer:
        if is_float_bits(bits.activation_bits):
            return FloatQuantizer(bits.activation_bits)
        name = self.config.activation_quantizer
        if name == "auto":
            if self.stats is None:
                raise BitsearchError(f"layer {self.name!r}: activation quantization needs calibration data")
            name = "uint" if self.stats.min >= 0 else "int_asym"
        return make_quantizer(name, bits.activation_bits, stochastic=False)

    @torch.no_grad()
    def set_bits(self, bits: LayerBits) -> None:
        """Quantize this layer at `bits`, deriving ranges from the stored calibration statistics."""
        if bits == self.bits:
            return
        cfg = self.config
        w = self.layer.weight.detach()
        if self._wq_memo_stats is not self.stats:
            self._wq_memo, self._wq_memo_stats = {}, self.stats
        memo_key = (bits, w.data_ptr(), w._version)
        memo = None if cfg.stochastic_rounding else self._wq_memo.get(memo_key)
        if memo is not None:
            self._finish_set_bits(bits, w, memo)
            return
        wq = self._make_weight_quantizer(bits)
        mean, ctx = (self.stats.weight_moments(self.layer) if self.stats else (None, ClipContext()))
        ctx.percentile = cfg.percentile
        data_ctx = ctx
        if isinstance(wq, SchemeQuantizer) and wq.format.clippable and cfg.weight_clip != "minmax":
            wq.clip_ratio = wq.format.search_clip(w.flatten(1).cpu(), _column_weight(ctx, w))
        if not wq.self_calibrating:
            if cfg.weight_clip in DATA_CLIPS and self.stats is None:
                raise BitsearchError(f"weight_clip {cfg.weight_clip!r} needs calibration data")
            rows = w.flatten(1) if wq.per_channel else w.reshape(1, -1)
            if not wq.per_channel:
                ctx = ClipContext(percentile=cfg.percentile)  # per-row moments do not apply to one row
            lo, hi = clip_range(cfg.weight_clip, rows, wq, ctx)
            wq.set_range(lo if wq.per_channel else lo[0], hi if wq.per_channel else hi[0])
        wq.to(w.device)
        if cfg.weight_rounding == "gptq" and not is_float_bits(bits.weight_bits) and gptq_applies(self):
            wq = self._gptq(w, wq, data_ctx)
        if not cfg.stochastic_rounding:
            if len(self._wq_memo) >= 64 or any(k[0] != "input" and k[1:] != memo_key[1:] for k in self._wq_memo):
                self._wq_memo.clear()  # other weights: the old entries no longer apply
            self._wq_memo[memo_key] = wq
        self._finish_set_bits(bits, w, wq)

    def _finish_set_bits(self, bits: LayerBits, w: torch.Tensor, wq: Quantizer) -> None:
        """Install weight quantizer `wq` for `bits`, then the input quantizer and bias correction."""
        cfg = self.config
        self.weight_quant = wq
        iq_key = ("input", bits.activation_bits)  # the input quantizer depends on the statistics alone
        iq = self._wq_memo.get(iq_key)
        if iq is None:
            iq = self._make_input_quantizer(bits)
            if not iq.self_calibrating:
                calibrate_activation(iq, self.stats, cfg.activation_clip, cfg.percentile)
            iq = iq.to(w.device)
            self._wq_memo[iq_key] = iq
        self.input_quant = iq
        self.bias_correction = None
        corrects = cfg.bias_correction and not is_float_bits(bits.weight_bits)
        if corrects and bias_correction_applies(self.layer):
            mean = self.stats.weight_moments(self.layer)[0] if self.stats else None
            if mean is None:
                raise BitsearchError("bias_correction needs calibration data")
            self.bias_correction = self._output_shift(wq(w) - w, mean)
        self.bits = bits
        self._wq_cache = None

    def _gptq(self, w: torch.Tensor, wq: Quantizer, ctx: ClipContext) -> Quantizer:
        """GPTQ-round the weight for `wq`'s scheme; ternary/binary (self-defined scales) stay as they are."""
        cfg = self.config
        if self.stats is None:
            raise BitsearchError(f"layer {self.name!r}: weight_rounding 'gptq' needs calibration data")
        if ctx.input_cov is None:
            raise BitsearchError(
                f"layer {self.name!r}: weight_rounding 'gptq' needs the full input second moment, which is "
                f"kept for Linear and ungrouped Conv1d/Conv2d layers with at most {GPTQ_MAX_COV_DIM} inputs "
                f"per output; use weight_rounding 'nearest' for this model"
            )
        w2 = w.flatten(1).float().cpu()
        h = ctx.input_cov.float().cpu()
        gcfg = GPTQConfig(cfg.gptq_damp, cfg.gptq_block_size)
        if isinstance(wq, SchemeQuantizer):
            fit, qdq, g = format_rounding(wq.format, w2)
        elif not wq.self_calibrating:
            qmin, qmax = wq.levels()
            fit, qdq = fixed_params_rounding(wq.scale.cpu(), wq.zero_point.cpu(), qmin, qmax, w2.shape[0])
            g = None
        else:
            return wq
        q = gptq_rounding(w2, h, fit, qdq, g, gcfg).reshape(w.shape).to(w.device, w.dtype)
        return FixedWeightQuantizer(q, self.layer.weight, wq).to(w.device)

    def _output_shift(self, delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
        """E[ΔW·x]: the expected shift of each output channel that the weight error causes."""
        if isinstance(self.layer, nn.ConvTranspose2d):
            if self.layer.groups != 1:
                return None  # rare; left uncorrected rather than approximated wrongly
            # mean is (C_in, d) broadcast per input row; sum rows and kernel positions per output channel.
            m = mean[:, :1].reshape(-1, 1, *([1] * (delta.dim() - 2)))
            return -(delta * m).sum(dim=[0, *range(2, delta.dim())])
        d2 = delta.flatten(1)
        shift = d2 @ mean if mean.dim() == 1 else (d2 * mean).sum(1)
        return -shift

    # --- forward --------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return self.weight_quant(w)
        # Weights are constant in evaluation: quantize once per weight version.
        if self._wq_cache is None or self._wq_cache[0] != w._version:
            with torch.no_grad():
                self._wq_cache = (w._version, self.weight_quant(w))
        return self._wq_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            if self.stats is None:
                gptq = self.config.weight_rounding == "gptq"
                self.stats = InputStats(max_cov_dim=GPTQ_MAX_COV_DIM) if gptq else InputStats()
            self.stats.update(self.layer, x)
            return self.layer(x)
        if self.bits is None:
            return self.layer(x)
        b = self.layer.bias
        if self.bias_correction is not None:
            b = self.bias_correction if b is None else b + self.bias_correction
        return _layer_forward(self.layer, self.input_quant(x), self.quantized_weight(), b)


def _column_weight(ctx: ClipContext, w: torch.Tensor) -> torch.Tensor | None:
    """E[x²] per input element of `w.flatten(1)` (1-D or per row), to weight a scheme's clipping search."""
    d = w.flatten(1).shape[1]
    if ctx.input_cov is not None and ctx.input_cov.shape[0] == d:
        return torch.diagonal(ctx.input_cov).float().cpu()
    if ctx.input_diag is not None and ctx.input_diag.shape[-1] == d:
        return ctx.input_diag.float().cpu()
    return None


# --- model-level helpers ---------------------------------------------------------------------------


def iter_batches(data: Any, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Input batches from a tensor, a dataset with `.x`, or an iterable of tensors / (x, y) tuples."""
    if data is None:
        return
    if hasattr(data, "x") and torch.is_tensor(getattr(data, "x")):
        data = data.x
    seen = 0
    if torch.is_tensor(data):
        for i in range(0, data.shape[0], batch_size):
            if limit is not None and seen >= limit:
                return
            xb = data[i : i + batch_size]
            if limit is not None:
                xb = xb[: limit - seen]
            seen += xb.shape[0]
            yield xb
        return
    for item in data:
        xb = item[0] if isinstance(item, (tuple, list)) else item
        if not torch.is_tensor(xb):
            raise BitsearchError(f"calibration batches must be tensors, got {type(xb).__name__}")
        if limit is not None:
            if seen >= limit:
                return
            xb = xb[: limit - seen]
        seen += xb.shape[0]
        yield xb


def wrap_model(model: nn.Module, config: QuantConfig) -> dict[str, QuantizedLayer]:
    """Replace every quantizable module of `model` in place by a QuantizedLayer; returns them by name.

    A module reachable under several names (shared weights) gets one wrapper, named by its first path.
    """
    wrappers: dict[int, QuantizedLayer] = {}
    for name, module in model.named_modules():
        if is_quantizable(module) and id(module) not in wrappers:
            wrappers[id(module)] = QuantizedLayer(module, name, config)
    if not wrappers:
        raise BitsearchError("the model has no quantizable layer")
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for w in wrappers.values():
        w.weight_tied = id(w.layer.weight) in embedding_weights
    for parent in list(model.modules()):
        if isinstance(parent, QuantizedLayer):
            continue
        # _modules, not named_children(): the latter hides a second name of the same module.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in wrappers:
                setattr(parent, child_name, wrappers[id(child)])
    return {w.name: w for w in wrappers.values()}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantizedLayer)}


@torch.no_grad()
def collect_statistics(model: nn.Module, layers: dict[str, QuantizedLayer], data: Any, config: QuantConfig) -> int:
    """One pass over the calibration data in float, recording every wrapped layer's input statistics."""
    for q in layers.values():
        q.observing, q.stats = True, None
    n = 0
    was_training = model.training
    device = next((p.device for p in model.parameters()), None)  # calibration data may live elsewhere
    model.eval()
    try:
        for xb in iter_batches(data, config.batch_size, config.calibration_samples):
            model(xb if device is None else xb.to(device))
            n += xb.shape[0]
    finally:
        for q in layers.values():
            q.observing = False
        model.train(was_training)
    if n == 0:
        raise BitsearchError("the calibration data are empty")
    return n


def weights_need_data(config: QuantConfig) -> bool:
    """Whether realising integer weight options under `config` needs calibration statistics."""
    return config.weight_clip in DATA_CLIPS or config.weight_rounding == "gptq" or config.bias_correction


def needs_calibration(allocation: Allocation, config: QuantConfig) -> bool:
    acts = any(not is_float_bits(b.activation_bits) for b in allocation.layers.values())
    gptq = config.weight_rounding == "gptq" and any(
        not is_float_bits(b.weight_bits) for b in allocation.layers.values()
    )
    return acts or gptq or config.weight_clip in DATA_CLIPS or config.bias_correction


def set_allocation(model: nn.Module, allocation: Allocation) -> None:
    """Re-quantize an already wrapped and calibrated model for another allocation (no data pass)."""
    layers = quantized_layers(model)
    allocation.check_layers(layers)
    for name, q in layers.items():
        q.set_bits(allocation[name])


def apply_allocation(
    model: nn.Module,
    allocation: Allocation,
    calibration: Any = None,
    config: QuantConfig | None = None,
) -> nn.Module:
    """A fake-quantized copy of `model` for `allocation`; `model` itself is left untouched.

    `calibration`: input batches (tensor, dataset with `.x`, or iterable of tensors / (x, y) tuples); needed
    when any activation is quantized, for data-driven weight clipping and for bias correction.
    """
    config = config or QuantConfig()
    qmodel = copy.deepcopy(model)
    layers = wrap_model(qmodel, config)
    allocation.check_layers(layers)
    if needs_calibration(allocation, config):
        if calibration is None:
            raise BitsearchError(
                "calibration data are needed (quantized activations, data-driven clipping or bias correction)"
            )
        collect_statistics(qmodel, layers, calibration, config)
    for name, q in layers.items():
        q.set_bits(allocation[name])
    return qmodel.eval()
