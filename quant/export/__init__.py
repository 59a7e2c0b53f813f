"""Exports of a quantized model or an allocation to deployment formats."""
