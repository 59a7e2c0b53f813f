"""Quantizers, fake-quant wrapping of any model, layer discovery, calibration and the cost model."""

from .allocation import Allocation, LayerBits
from .apply import QuantConfig, QuantizedLayer, apply_allocation, quantized_layers, set_allocation
from .errors import BitsearchError
from .formats import FORMATS, WeightFormat, parse_scheme, register_format, standard_schemes
from .layers import LayerInfo, default_tie_groups, discover_layers
from .quantizers import QUANTIZERS, Quantizer, SchemeQuantizer, make_quantizer, register_quantizer

__all__ = [
    "Allocation",
    "BitsearchError",
    "FORMATS",
    "LayerBits",
    "LayerInfo",
    "QUANTIZERS",
    "QuantConfig",
    "QuantizedLayer",
    "Quantizer",
    "SchemeQuantizer",
    "WeightFormat",
    "apply_allocation",
    "default_tie_groups",
    "discover_layers",
    "make_quantizer",
    "parse_scheme",
    "quantized_layers",
    "register_format",
    "register_quantizer",
    "set_allocation",
    "standard_schemes",
]
