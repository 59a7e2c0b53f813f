"""Deployable artifacts of a quantized model or an allocation (one module per target format)."""
