"""Quantizers, fake-quant wrapping of any model, layer discovery, calibration and the cost model."""

from .allocation import Allocation, LayerBits
from .apply import QuantConfig, QuantizedLayer, apply_allocation, quantized_layers, set_allocation
from .errors import BitsearchError
from .layers import LayerInfo, default_tie_groups, discover_layers
from .quantizers import QUANTIZERS, Quantizer, make_quantizer, register_quantizer

__all__ = [
    "Allocation",
    "BitsearchError",
    "LayerBits",
    "LayerInfo",
    "QUANTIZERS",
    "QuantConfig",
    "QuantizedLayer",
    "Quantizer",
    "apply_allocation",
    "default_tie_groups",
    "discover_layers",
    "make_quantizer",
    "quantized_layers",
    "register_quantizer",
    "set_allocation",
]
