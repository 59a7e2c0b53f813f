"""Sensitivity proxies: per layer and per bit option, the estimated increase of the task loss."""

from .base import (
    METHODS,
    SensitivityContext,
    SensitivityMethod,
    SensitivityOptions,
    compute_sensitivity,
    register_method,
)
from .table import SensitivityTable

# Importing a method module registers it.
from . import fisher, hessian, measured, orthogonality  # noqa: E402,F401

__all__ = [
    "METHODS",
    "SensitivityContext",
    "SensitivityMethod",
    "SensitivityOptions",
    "SensitivityTable",
    "compute_sensitivity",
    "register_method",
]
