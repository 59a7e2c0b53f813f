"""The fake-quant layers of a QAT run: building each layer's learnable quantizers from the calibrated static
ones, and switching a layer's bits mid-run (the bit-width hook). A mixin of `QATTrainer`: it uses the
trainer's `model`, `recipe`, `allocation`, `calibration` and optimizer (see `quant.qat.trainer`)."""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import Allocation, LayerBits, is_float_bits
from ..apply import DATA_CLIPS, QuantizedLayer, collect_statistics, quantized_layers
from ..calibration import ClipContext, calibrate_activation, clip_range
from ..errors import BitsearchError
from ..quantizers import FixedWeightQuantizer, FloatQuantizer, Quantizer, SymmetricQuantizer, make_quantizer
from .quantizers import DoReFaQuantizer, LearnableQuantizer, LSQQuantizer, PACTQuantizer


def _static_range(q: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range [lo, hi] a calibrated static quantizer covers."""
    qmin, qmax = q.levels()
    return (qmin - q.zero_point) * q.scale, (qmax - q.zero_point) * q.scale


class LayerQuantizers:
    """Quantizer construction and re-bitting for `QATTrainer`."""

    def _static_weight_quantizer(self, layer: QuantizedLayer, bits: LayerBits) -> Quantizer:
        """What `QuantizedLayer.set_bits` would build for the weights (data clips fall back to mse without stats)."""
        wq = layer._make_weight_quantizer(bits)
        if not wq.self_calibrating:
            clip, ctx = self.config.weight_clip, ClipContext(percentile=self.config.percentile)
            if clip in DATA_CLIPS:
                if layer.stats is not None and wq.per_channel:
                    _, ctx = layer.stats.weight_moments(layer.layer)
                    ctx.percentile = self.config.percentile
                else:
                    clip = "mse"
            w = layer.layer.weight.detach()
            rows = w.flatten(1) if wq.per_channel else w.reshape(1, -1)
            lo, hi = clip_range(clip, rows, wq, ctx)
            wq.set_range(lo if wq.per_channel else lo[0], hi if wq.per_channel else hi[0])
        return wq.to(layer.layer.weight.device)

    def _weight_quantizer(self, layer: QuantizedLayer, bits: LayerBits, static: Quantizer | None) -> Quantizer:
        r = self.recipe
        w = layer.layer.weight.detach()
        if is_float_bits(bits.weight_bits):
            return FloatQuantizer(bits.weight_bits)
        if bits.weight_quantizer in ("ternary", "binary") or bits.weight_bits == 1 or r.weight_quantizer == "int_sym":
            if static is None or static.bits != bits.weight_bits or static.name != layer._make_weight_quantizer(bits).name:
                static = self._static_weight_quantizer(layer, bits)
            return static
        per_channel = r.weight_granularity == "per_channel"
        if r.weight_quantizer == "dorefa":
            return DoReFaQuantizer(bits.weight_bits, per_channel=per_channel)
        q = LSQQuantizer(
            bits.weight_bits, per_channel=per_channel, signed=True, kind="weight",
            channels=w.shape[0] if per_channel else 1,
        )
        if r.init == "paper":
            q.init_from_tensor(w)
        else:
            if not isinstance(static, SymmetricQuantizer) or static.bits != bits.weight_bits:
                static = self._static_weight_quantizer(layer, bits)
            q._set_scale(static.scale)  # int_sym and narrow LSQ share Q_P: the same step
        return q

    def _input_quantizer(self, layer: QuantizedLayer, bits: LayerBits, static: Quantizer | None) -> Quantizer:
        r = self.recipe
        if is_float_bits(bits.activation_bits):
            return FloatQuantizer(bits.activation_bits)
        if static is None or static.self_calibrating or static.bits != bits.activation_bits:
            static = layer._make_input_quantizer(bits)
            calibrate_activation(static, layer.stats, self.config.activation_clip, self.config.percentile)
        if r.activation_quantizer == "static":
            return static
        signed = static.name != "uint"
        lo, hi = _static_range(static)
        if r.activation_quantizer == "pact" and not signed:
            if r.pact_alpha is not None:
                alpha = r.pact_alpha
            elif r.init == "paper":
                alpha = 6.0
            else:
                alpha = max(float(hi), 1e-6)
            return PACTQuantizer(bits.activation_bits, alpha=alpha)
        q = LSQQuantizer(bits.activation_bits, signed=signed, kind="activation", asymmetric=signed)
        if r.init == "paper" and layer.stats is not None:
            q.init_from_tensor(layer.stats.values())
        else:
            q.set_range(lo, hi)
        return q

    @torch.no_grad()
    def _adopt_ptq(self, layer: QuantizedLayer) -> Quantizer:
        """init "ptq": make `layer`'s float parts the PTQ realisation `apply_allocation` built, so that QAT
        starts from the model the search measured. The latent weight becomes the PTQ weight (GPTQ-rounded,
        dequantized: a grid point of the PTQ scales, which LSQ's steps then take over), and a bias correction
        is folded into the layer's bias (created when the layer has none), which trains like any bias.
        Returns the static weight quantizer whose scales the learnable one starts from."""
        wq = layer.weight_quant
        grid = wq.fallback if isinstance(wq, FixedWeightQuantizer) else wq
        # Integer grids only (ternary, binary and schemes keep their weights), and not a weight that is also an
        # embedding table (a tied head): the lookup would read the rounded rows, which PTQ never does.
        if isinstance(grid, SymmetricQuantizer):
            if not layer.weight_tied:
                w = layer.layer.weight
                w.copy_(wq(w.detach()).to(w.dtype))
            wq = grid
        bc = layer.bias_correction
        if bc is not None:
            b = layer.layer.bias
            if b is None:
                layer.layer.bias = nn.Parameter(bc.detach().clone().to(layer.layer.weight.dtype))
            else:
                b.add_(bc.to(b.dtype))
        layer.bias_correction = None
        return wq

    def _install(self, layer: QuantizedLayer, bits: LayerBits, static_w=None, static_a=None) -> None:
        device = layer.layer.weight.device
        layer.weight_quant = self._weight_quantizer(layer, bits, static_w).to(device)
        layer.input_quant = self._input_quantizer(layer, bits, static_a).to(device)
        layer.bias_correction = None
        layer.bits = bits
        layer._wq_cache = None

    def set_allocation(self, allocation: Allocation) -> list[str]:
        """Switch to `allocation` (see the module docstring); returns the names of the changed layers."""
        if not isinstance(allocation, Allocation):
            raise BitsearchError(f"set_allocation takes an Allocation, got {type(allocation).__name__}")
        layers = quantized_layers(self.model)
        allocation.check_layers(layers)
        changed = [n for n, layer in layers.items() if layer.bits != allocation[n]]
        if not changed:
            self.allocation = allocation
            return []
        need_stats = [
            n for n in changed
            if not is_float_bits(allocation[n].activation_bits)
            and is_float_bits(layers[n].bits.activation_bits)
            and layers[n].stats is None
        ]
        if need_stats:
            calib = self._calibration_inputs()
            if torch.is_tensor(calib):
                calib = self._to_device(calib)
            training = self.model.training
            collect_statistics(self.model, {n: layers[n] for n in need_stats}, calib, self.config)
            if training:
                self._train_mode()  # collect_statistics restores plain train(), which would unfreeze BN
        reset: list[nn.Parameter] = []
        for n in changed:
            reset += self._rebits(layers[n], allocation[n])
        self.allocation = allocation
        self._refresh_param_groups(reset)
        for layer in layers.values():
            layer._wq_cache = None
        self.history.append({"step": self.step, "allocation_changed": changed})
        return changed

    def _rebits(self, layer: QuantizedLayer, new: LayerBits) -> list[nn.Parameter]:
        old = layer.bits
        reset: list[nn.Parameter] = []
        device = layer.layer.weight.device

        def plain_int(bits: int, override: str | None = None) -> bool:
            return not is_float_bits(bits) and bits >= 2 and override not in ("ternary", "binary")

        if (old.weight_bits, old.weight_quantizer) != (new.weight_bits, new.weight_quantizer):
            wq = layer.weight_quant
            if plain_int(old.weight_bits, old.weight_quantizer) and plain_int(new.weight_bits, new.weight_quantizer):
                if isinstance(wq, LearnableQuantizer):
                    wq.change_bits(new.weight_bits)
                    reset += list(wq.parameters())
                else:
                    lo, hi = _static_range(wq)
                    nq = make_quantizer(wq.name, new.weight_bits, per_channel=wq.per_channel, ch_axis=wq.ch_axis)
                    nq.set_range(lo, hi)
                    layer.weight_quant = nq.to(device)
            else:
                layer.weight_quant = self._weight_quantizer(layer, new, None).to(device)
        if old.activation_bits != new.activation_bits:
            iq = layer.input_quant
            if plain_int(old.activation_bits) and plain_int(new.activation_bits):
                if isinstance(iq, LearnableQuantizer):
                    iq.change_bits(new.activation_bits)
                    reset += list(iq.parameters())
                else:
                    lo, hi = _static_range(iq)
                    nq = make_quantizer(iq.name, new.activation_bits)
                    nq.set_range(lo, hi)
                    layer.input_quant = nq.to(device)
            else:
                layer.input_quant = self._input_quantizer(layer, new, None).to(device)
        layer.bits = new
        return reset
