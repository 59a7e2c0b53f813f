"""`SensitivityTable`: per layer and per candidate bit option, the estimated increase of the task loss.

The table is what the solvers read, so it carries everything they need without the model: the layers
(with their shapes, for the cost model), the options (columns), the values, and, where the method has one,
a standard error. It also records how it was made (method, settings, data, passes, seconds) so a stored
table can be trusted or recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from quant.allocation import LayerBits
from quant.errors import BitsearchError
from quant.jsonfile import JsonFile
from quant.layers import LayerInfo

TABLE_SCHEMA = "bitsearch.sensitivity"
TABLE_VERSION = 1


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in a.tolist()]


def _none_to_nan(rows: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    try:
        a = np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise BitsearchError(f"sensitivity table: {what} must be a matrix of numbers") from None
    if a.shape != shape:
        raise BitsearchError(f"sensitivity table: {what} has shape {a.shape}, expected {shape}")
    return a


@dataclass
class SensitivityTable(JsonFile):
    """values[i, j]: estimated loss increase when layer i alone takes options[j] (others in float)."""

    json_what = "sensitivity table"

    method: str
    layers: list[LayerInfo]
    options: list[LayerBits]
    values: np.ndarray  # (n_layers, n_options); NaN where an option was not evaluated
    stderr: np.ndarray | None = None  # same shape, or None when the method has no error estimate
    covers_activations: bool = False  # False: activation bits do not change the values (weights only)
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # {"name", "samples", "data_free", "labels"}
    cost: dict[str, Any] = field(default_factory=dict)  # {"passes", "seconds", ...}
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific per-layer quantities

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        shape = (len(self.layers), len(self.options))
        if self.values.shape != shape:
            raise BitsearchError(f"sensitivity values have shape {self.values.shape}, expected {shape}")
        if self.stderr is not None:
            self.stderr = np.asarray(self.stderr, dtype=np.float64)
            if self.stderr.shape != shape:
                raise BitsearchError(f"sensitivity stderr has shape {self.stderr.shape}, expected {shape}")

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    def index(self, layer: str, option: LayerBits) -> tuple[int, int]:
        try:
            return self.layer_names.index(layer), self.options.index(option)
        except ValueError:
            raise BitsearchError(f"no sensitivity entry for layer {layer!r} at {option.label()}") from None

    def value(self, layer: str, option: LayerBits) -> float:
        i, j = self.index(layer, option)
        return float(self.values[i, j])

    def layer_scores(self, option: LayerBits) -> dict[str, float]:
        j = self.options.index(option)
        return {n: float(self.values[i, j]) for i, n in enumerate(self.layer_names)}

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": TABLE_SCHEMA,
            "version": TABLE_VERSION,
            "method": self.method,
            "layers": [l.to_dict() for l in self.layers],
            "options": [o.to_dict() for o in self.options],
            "values": _nan_to_none(self.values),
            "stderr": None if self.stderr is None else _nan_to_none(self.stderr),
            "covers_activations": self.covers_activations,
            "settings": self.settings,
            "data": self.data,
            "cost": self.cost,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SensitivityTable":
        cls.check_header(d, TABLE_SCHEMA, TABLE_VERSION)
        try:
            layers = [LayerInfo.from_dict(l) for l in d["layers"]]
            options = [LayerBits.from_dict(o, where="option") for o in d["options"]]
        except (KeyError, TypeError) as exc:
            raise BitsearchError(f"sensitivity table: malformed layers/options ({exc})") from None
        shape = (len(layers), len(options))
        values = _none_to_nan(d.get("values", []), shape, "values")
        stderr = None if d.get("stderr") is None else _none_to_nan(d["stderr"], shape, "stderr")
        return cls(
            method=str(d.get("method", "")),
            layers=layers,
            options=options,
            values=values,
            stderr=stderr,
            covers_activations=bool(d.get("covers_activations", False)),
            settings=dict(d.get("settings") or {}),
            data=dict(d.get("data") or {}),
            cost=dict(d.get("cost") or {}),
            extra=dict(d.get("extra") or {}),
        )
