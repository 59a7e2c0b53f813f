"""Deployable artifacts of a quantized model (one module per target format)."""
