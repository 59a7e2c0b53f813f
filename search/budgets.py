"""Budgets: upper limits on a cost metric (`metric <= limit`), their names, units and parsing, and the error a
budget no allocation can meet raises."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from quant.cost import MAX_METRICS
from quant.errors import BitsearchError

#: Relative slack when checking a budget. Solvers add costs in different orders and MIP solvers accept
#: their own feasibility tolerance (~1e-7 of the normalised row); a millionth of a budget is meaningless.
FEAS_RTOL = 1e-6


# --- budgets ----------------------------------------------------------------------------------------------

#: Names accepted for each metric on the command line (case-insensitive, '-' reads as '_').
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "avg_weight_bits": ("avg_weight_bits", "avg_wbits", "wbits", "avg_bits", "weight_bits", "bits"),
    "weight_memory": ("weight_memory", "weight_mem", "wmem", "model_size", "size", "memory", "mem"),
    "bops": ("bops", "bitops", "bit_ops"),
    "peak_activation_memory": (
        "peak_activation_memory",
        "peak_act",
        "peak_activation",
        "peak_act_mem",
        "act_mem",
        "activation_memory",
    ),
    "latency": ("latency", "lat"),
}
_ALIAS_TO_METRIC = {alias: m for m, aliases in METRIC_ALIASES.items() for alias in aliases}

# Units, lower-cased. Memory is counted in bits internally; every "b" in a memory unit is a *byte*
# (64KB, 64kb and 64KiB are all bytes), so bits must be spelled out ("bit", "kbit").
_MEMORY_UNITS = {
    "": 1.0,
    "bit": 1.0,
    "bits": 1.0,
    "kbit": 1e3,
    "kibit": 1024.0,
    "mbit": 1e6,
    "mibit": 1024.0**2,
    "b": 8.0,
    "byte": 8.0,
    "bytes": 8.0,
    "kb": 8e3,
    "kib": 8 * 1024.0,
    "mb": 8e6,
    "mib": 8 * 1024.0**2,
    "gb": 8e9,
    "gib": 8 * 1024.0**3,
}
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_LATENCY_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_BITS_UNITS = {"": 1.0, "b": 1.0, "bit": 1.0, "bits": 1.0}

_VALUE_RE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-zµ]*)\s*$")


def canonical_metric(name: str) -> str:
    """The `quant.cost.METRICS` name for `name` or one of its aliases."""
    key = str(name).strip().lower().replace("-", "_")
    if key in _ALIAS_TO_METRIC:
        return _ALIAS_TO_METRIC[key]
    known = "; ".join(f"{m} ({', '.join(a for a in al if a != m)})" for m, al in METRIC_ALIASES.items())
    raise BitsearchError(f"unknown budget metric {name!r}; known (aliases in brackets): {known}")


def parse_value(metric: str, text: str) -> float:
    """A budget value in internal units: bits (memory), BOPs, bits per weight, seconds (latency)."""
    m = _VALUE_RE.match(str(text))
    if not m:
        raise BitsearchError(
            f"cannot read the {metric} budget {text!r}: expected a number with an optional unit"
        )
    number, unit = float(m.group(1)), m.group(2).lower()
    if metric in ("weight_memory", "peak_activation_memory"):
        table, hint = _MEMORY_UNITS, "bit, kbit, B, KB, KiB, MB, MiB, GB, GiB (no unit: bits)"
    elif metric == "bops":
        unit = (
            unit[: -len("bops")]
            if unit.endswith("bops")
            else unit[: -len("bop")]
            if unit.endswith("bop")
            else unit
        )
        table, hint = _SI, "K, M, G, T (SI), optionally followed by BOPs, e.g. 1.2G or 1.2e9"
    elif metric == "latency":
        table, hint = _LATENCY_UNITS, "s, ms, us, ns (no unit: seconds)"
    else:
        table, hint = _BITS_UNITS, "bits per weight, e.g. 3 or 3.5bits"
    if unit not in table:
        raise BitsearchError(f"unknown unit {m.group(2)!r} in the {metric} budget {text!r}; use {hint}")
    value = number * table[unit]
    if not math.isfinite(value) or value <= 0:
        raise BitsearchError(f"the {metric} budget must be a positive number, got {text!r}")
    return value


def format_value(metric: str, value: float) -> str:
    """`value` (internal units) the way a person would write it."""
    if value is None or not math.isfinite(value):
        return str(value)
    if metric in ("weight_memory", "peak_activation_memory"):
        nbytes = value / 8
        for unit, size in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
            if nbytes >= size:
                return f"{nbytes / size:.4g} {unit} ({value:.0f} bits)"
        return f"{nbytes:.4g} B ({value:.0f} bits)"
    if metric == "bops":
        return f"{value:.4g} BOPs"
    if metric == "latency":
        return f"{value * 1e3:.4g} ms"
    return f"{value:.4g} bits"


@dataclass(frozen=True)
class Budget:
    """An upper limit on one metric of `quant.cost.METRICS`, in internal units (bits, BOPs, seconds)."""

    metric: str
    limit: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", canonical_metric(self.metric))
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float, np.floating, np.integer)):
            raise BitsearchError(f"the {self.metric} budget must be a number, got {self.limit!r}")
        limit = float(self.limit)
        if not math.isfinite(limit) or limit <= 0:
            raise BitsearchError(f"the {self.metric} budget must be a positive number, got {self.limit!r}")
        object.__setattr__(self, "limit", limit)

    @classmethod
    def parse(cls, text: "str | Budget") -> "Budget":
        """`"avg_wbits=3"`, `"bops=1.2e9"` / `"bops=1.2G"`, `"weight_memory=64KiB"`, `"peak_act=16KB"`,
        `"latency=2ms"`. Memory without a unit is in bits; see `METRIC_ALIASES` for the accepted names."""
        if isinstance(text, Budget):
            return text
        s = str(text)
        sep = "<=" if "<=" in s else "=" if "=" in s else ":" if ":" in s else None
        if sep is None:
            raise BitsearchError(f"a budget looks like metric=value (e.g. avg_wbits=3), got {text!r}")
        name, _, value = s.partition(sep)
        metric = canonical_metric(name)
        return cls(metric, parse_value(metric, value))

    @property
    def is_max(self) -> bool:
        """True for metrics that combine by max over layers (peak activation memory)."""
        return self.metric in MAX_METRICS

    def holds(self, value: float) -> bool:
        return value <= self.limit * (1 + FEAS_RTOL)

    def __str__(self) -> str:
        return f"{self.metric} <= {format_value(self.metric, self.limit)}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
        return cls(d["metric"], d["limit"])


def parse_budgets(budgets: "Iterable[str | Budget] | str | Budget | None") -> list[Budget]:
    if budgets is None:
        return []
    if isinstance(budgets, (str, Budget)):
        budgets = [budgets]
    out = [Budget.parse(b) for b in budgets]
    seen: dict[str, Budget] = {}
    for b in out:
        if b.metric in seen:
            raise BitsearchError(f"two budgets on {b.metric}: {seen[b.metric]} and {b}; give one")
        seen[b.metric] = b
    return out


class InfeasibleBudget(BitsearchError):
    """No allocation meets the budgets; `minimums[metric]` is the smallest feasible value of each budget
    that was asked for too low (exact, under the constraints and the other budgets), or None where there is
    none (the other budgets are already infeasible among themselves)."""

    def __init__(self, message: str, minimums: dict[str, float | None], budgets: Sequence[Budget]):
        super().__init__(message)
        self.minimums = minimums
        self.budgets = list(budgets)

    def __reduce__(self):  # keep the figures when a worker process hands the error back
        return (self.__class__, (str(self), self.minimums, self.budgets))


