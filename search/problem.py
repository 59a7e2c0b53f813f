"""The allocation problem: a sensitivity table, a cost model, budgets and constraints, as plain matrices.

Every solver works on the same arrays, built here once:

* one *decision variable* per layer, except that the layers of a tie group share one variable;
* per variable and bit option (columns follow `AllocationProblem.options`): the objective (the summed
  sensitivity of the variable's layers, +inf where the option is not allowed) and every cost metric
  (`quant.cost.CostModel.option_table`, summed over the group, or maxed for peak activation memory);
* an `allowed` mask: options the table did not evaluate (NaN), per-layer restrictions, pins, and options
  whose own activation size already exceeds a peak-activation budget (a max over layers is met exactly when
  every layer meets it, so it needs no constraint row).

Budgets are upper limits (`metric <= limit`); all metrics are "smaller is cheaper". A choice is an integer
array with one option index per *layer* (`problem.options[choice[i]]` for layer i); solvers work per
variable and expand with `AllocationProblem.expand`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from quant.allocation import Allocation, LayerBits
from quant.cost import MAX_METRICS, SUM_METRICS, CostModel
from quant.errors import BitsearchError

if TYPE_CHECKING:  # the problem only reads the table's fields; importing the package would pull torch methods
    from sensitivity.table import SensitivityTable

#: Relative slack when checking a budget. Solvers add costs in different orders and MIP solvers accept
#: their own feasibility tolerance (~1e-7 of the normalised row); a millionth of a budget is meaningless.
FEAS_RTOL = 1e-6

# --- budgets ----------------------------------------------------------------------------------------------

#: Names accepted for each metric on the command line (case-insensitive, '-' reads as '_').
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "avg_weight_bits": ("avg_weight_bits", "avg_wbits", "wbits", "avg_bits", "weight_bits", "bits"),
    "weight_memory": ("weight_memory", "weight_mem", "wmem", "model_size", "size", "memory", "mem"),
    "bpw": ("bpw", "bits_per_weight", "effective_bits"),
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


# --- constraints ------------------------------------------------------------------------------------------


def _bits(b: "LayerBits | str | Mapping[str, Any]", where: str) -> LayerBits:
    if isinstance(b, LayerBits):
        return b
    if isinstance(b, Mapping):
        return LayerBits.from_dict(b, where=where)
    try:
        return LayerBits.parse(str(b))
    except BitsearchError as exc:
        raise BitsearchError(f"{where}: {exc}") from None


@dataclass
class Constraints:
    """What the search may not change, beyond the budgets.

    pinned:    layer -> the option it must take (`{"conv1": LayerBits(8, 8)}` or `{"conv1": "8/8"}`).
    pin_first / pin_last: pin the first / last layer in execution order (the table's order); see
               `Constraints.keep_first_last`, the usual "first and last layer at 8 bits" convention.
    ties:      groups of layers that must take the same option (e.g. layers that share an input quantizer).
    allowed:   layer -> the options it may take (a subset of the table's options).
    options:   the options every layer may take (None: all of the table's).

    A pinned option need not be one of the table's columns: it is added for that layer (its sensitivity is
    the table's value at the same weight bits when the table does not cover activations, else 0 — it is a
    constant and does not change which allocation is best).
    """

    pinned: dict[str, LayerBits] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)
    allowed: dict[str, list[LayerBits]] = field(default_factory=dict)
    options: list[LayerBits] | None = None
    pin_first: LayerBits | None = None
    pin_last: LayerBits | None = None

    def __post_init__(self) -> None:
        self.pinned = {str(n): _bits(b, f"pinned layer {n!r}") for n, b in dict(self.pinned).items()}
        self.ties = [tuple(str(n) for n in group) for group in self.ties]
        for group in self.ties:
            if len(group) < 1:
                raise BitsearchError("a tie group needs at least one layer")
        self.allowed = {
            str(n): [_bits(b, f"allowed options of {n!r}") for b in opts]
            for n, opts in dict(self.allowed).items()
        }
        for n, opts in self.allowed.items():
            if not opts:
                raise BitsearchError(f"layer {n!r} has an empty list of allowed options")
        if self.options is not None:
            self.options = [_bits(b, "allowed options") for b in self.options]
            if not self.options:
                raise BitsearchError("the list of allowed options is empty")
        if self.pin_first is not None:
            self.pin_first = _bits(self.pin_first, "pin_first")
        if self.pin_last is not None:
            self.pin_last = _bits(self.pin_last, "pin_last")

    @classmethod
    def keep_first_last(cls, bits: LayerBits | str = LayerBits(8, 8), **kwargs: Any) -> "Constraints":
        """Pin the first and the last layer at `bits` (W8A8 by default), as most papers do."""
        b = _bits(bits, "first/last bits")
        return cls(pin_first=b, pin_last=b, **kwargs)

    def resolve_pins(self, layer_names: Sequence[str]) -> dict[str, LayerBits]:
        """Every pin by layer name, with pin_first/pin_last resolved; conflicting pins are an error."""
        pins = dict(self.pinned)
        for name, b, what in (
            (layer_names[0], self.pin_first, "pin_first"),
            (layer_names[-1], self.pin_last, "pin_last"),
        ):
            if b is None:
                continue
            if name in pins and pins[name] != b:
                raise BitsearchError(
                    f"layer {name!r} is pinned to {pins[name].label()} and, by {what}, to {b.label()}"
                )
            pins[name] = b
        return pins

    def to_dict(self) -> dict[str, Any]:
        return {
            "pinned": {n: b.to_dict() for n, b in self.pinned.items()},
            "ties": [list(g) for g in self.ties],
            "allowed": {n: [b.to_dict() for b in opts] for n, opts in self.allowed.items()},
            "options": None if self.options is None else [b.to_dict() for b in self.options],
            "pin_first": None if self.pin_first is None else self.pin_first.to_dict(),
            "pin_last": None if self.pin_last is None else self.pin_last.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Constraints":
        d = dict(d or {})
        unknown = set(d) - {"pinned", "ties", "allowed", "options", "pin_first", "pin_last"}
        if unknown:
            raise BitsearchError(f"constraints: unknown field(s) {sorted(unknown)}")
        return cls(
            pinned=d.get("pinned") or {},
            ties=d.get("ties") or [],
            allowed=d.get("allowed") or {},
            options=d.get("options"),
            pin_first=d.get("pin_first"),
            pin_last=d.get("pin_last"),
        )


# --- the problem ------------------------------------------------------------------------------------------


def _few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(x) for x in list(names)[:n]) + (" …" if len(names) > n else "")


class AllocationProblem:
    """Sensitivity table + cost model + budgets + constraints, as matrices the solvers share.

    Attributes a solver reads (G variables × K options):
      options          the bit options (columns)
      objective        (G, K) float: summed sensitivity, +inf where not allowed
      costs[metric]    (G, K) float: the variable's contribution to `metric` (sum, or max for peak)
      allowed          (G, K) bool, including peak-activation budgets
      sum_budgets      budgets on additive metrics (constraint rows); max budgets are in `allowed`
    """

    def __init__(
        self,
        table: "SensitivityTable",
        cost: CostModel | None = None,
        budgets: "Iterable[str | Budget] | str | Budget | None" = None,
        constraints: Constraints | Mapping[str, Any] | None = None,
    ) -> None:
        self.table = table
        self.layer_names: list[str] = [layer.name for layer in table.layers]
        if not self.layer_names:
            raise BitsearchError("the sensitivity table has no layers")
        if len(set(self.layer_names)) != len(self.layer_names):
            raise BitsearchError("the sensitivity table names a layer twice")
        self.cost = cost if cost is not None else CostModel(table.layers)
        missing = [n for n in self.layer_names if n not in set(self.cost.layer_names)]
        extra = [n for n in self.cost.layer_names if n not in set(self.layer_names)]
        if missing or extra:
            raise BitsearchError(
                "the sensitivity table and the cost model describe different layers"
                + (f"; not in the cost model: {_few(missing)}" if missing else "")
                + (f"; not in the table: {_few(extra)}" if extra else "")
            )
        if constraints is None:
            constraints = Constraints()
        elif not isinstance(constraints, Constraints):
            constraints = Constraints.from_dict(constraints)
        self.constraints = constraints
        self.notes: list[str] = []
        self.objective_name = "sensitivity"
        self._build_layer_matrices()
        self._build_groups()
        self._build_var_matrices()
        self.budgets: list[Budget] = []
        self._set_budgets(parse_budgets(budgets))

    # --- construction ----------------------------------------------------------------------------------
    def _table_column(self, option: LayerBits) -> int | None:
        """The table column that gives `option`'s sensitivity (see `Constraints` for pinned extras)."""
        opts = list(self.table.options)
        if option in opts:
            return opts.index(option)
        if not self.table.covers_activations:
            # The values do not depend on activation bits: any column with the same weight side will do.
            same = [
                j
                for j, o in enumerate(opts)
                if o.weight_bits == option.weight_bits and o.weight_quantizer == option.weight_quantizer
            ]
            if same:
                return max(same, key=lambda j: opts[j].activation_bits)
        return None

    def _build_layer_matrices(self) -> None:
        names, cons = self.layer_names, self.constraints
        index = {n: i for i, n in enumerate(names)}
        pins = cons.resolve_pins(names)
        for what, keys in (("pinned", pins), ("allowed", cons.allowed)):
            unknown = [n for n in keys if n not in index]
            if unknown:
                raise BitsearchError(
                    f"{what} layer(s) not in the model: {_few(unknown)}; layers: {_few(names, 8)}"
                )
        unknown = [n for g in cons.ties for n in g if n not in index]
        if unknown:
            raise BitsearchError(f"tied layer(s) not in the model: {_few(unknown)}; layers: {_few(names, 8)}")

        table_opts = list(self.table.options)
        if len(set(table_opts)) != len(table_opts):
            raise BitsearchError("the sensitivity table lists an option twice")
        options = list(table_opts)
        for b in pins.values():
            if b not in options:
                options.append(b)  # an extra column, allowed only for the layers pinned to it
        self.options: list[LayerBits] = options
        L, K = len(names), len(options)

        values = np.asarray(self.table.values, dtype=np.float64)
        sens = np.full((L, K), np.nan)
        for j, o in enumerate(options):
            col = self._table_column(o)
            if col is not None:
                sens[:, j] = values[:, col]
        allowed = np.isfinite(sens)
        allowed[:, len(table_opts) :] = False
        if cons.options is not None:
            bad = [o.label() for o in cons.options if o not in table_opts]
            if bad:
                raise BitsearchError(
                    f"allowed option(s) {bad} are not in the sensitivity table "
                    f"(it has {[o.label() for o in table_opts]})"
                )
            cols = np.array([o in cons.options for o in options])
            allowed &= cols[None, :]
        for n, opts in cons.allowed.items():
            bad = [o.label() for o in opts if o not in table_opts]
            if bad:
                raise BitsearchError(
                    f"layer {n!r}: allowed option(s) {bad} are not in the sensitivity table "
                    f"(it has {[o.label() for o in table_opts]})"
                )
            row = np.array([o in opts for o in options])
            allowed[index[n]] &= row
        for n, b in pins.items():
            i, j = index[n], options.index(b)
            allowed[i] = False
            allowed[i, j] = True
            if not np.isfinite(sens[i, j]):
                self.notes.append(
                    f"no sensitivity for pinned layer {n!r} at {b.label()}: counted as 0 (a constant)"
                )
                sens[i, j] = 0.0
        empty = [names[i] for i in range(L) if not allowed[i].any()]
        if empty:
            raise BitsearchError(
                f"layer(s) {_few(empty)} have no option left: the table has no value for the options "
                "they are allowed (NaN), or the constraints exclude them all"
            )
        self.pins = pins
        self.layer_allowed = allowed
        # NaN cells are never allowed; 0 keeps sums over allowed cells free of NaN.
        self.layer_objective = np.where(allowed, np.nan_to_num(sens, nan=0.0), 0.0)
        self.layer_costs: dict[str, np.ndarray] = {}
        table = self.cost.option_table(options)
        order = [self.cost.layer_names.index(n) for n in names]
        for m, mat in table.items():
            self.layer_costs[m] = np.asarray(mat, dtype=np.float64)[order]

    def _build_groups(self) -> None:
        """Union-find over the tie groups; variables are numbered in order of their first layer."""
        names = self.layer_names
        index = {n: i for i, n in enumerate(names)}
        parent = list(range(len(names)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for group in self.constraints.ties:
            ids = [index[n] for n in group]
            for i in ids[1:]:
                a, b = find(ids[0]), find(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        roots = [find(i) for i in range(len(names))]
        var_of_root: dict[int, int] = {}
        var_of_layer = np.empty(len(names), dtype=np.int64)
        for i, r in enumerate(roots):
            var_of_layer[i] = var_of_root.setdefault(r, len(var_of_root))
        self.var_of_layer = var_of_layer
        self.groups: list[list[int]] = [[] for _ in range(len(var_of_root))]
        for i, v in enumerate(var_of_layer):
            self.groups[v].append(i)

    def _build_var_matrices(self) -> None:
        G, K = self.n_vars, len(self.options)
        v = self.var_of_layer
        allowed = np.ones((G, K), dtype=bool)
        np.logical_and.at(allowed, v, self.layer_allowed)
        bad = [g for g in range(G) if not allowed[g].any()]
        if bad:
            groups = [[self.layer_names[i] for i in self.groups[g]] for g in bad]
            raise BitsearchError(
                f"tied layers {groups[0]} have no option in common (pins, allowed options or missing "
                "sensitivities differ)"
            )
        obj = np.zeros((G, K))
        np.add.at(obj, v, self.layer_objective)
        self.structural_allowed = allowed
        self._objective_matrix = obj  # finite everywhere; `objective` puts +inf on disallowed cells
        self.costs: dict[str, np.ndarray] = {}
        for m, mat in self.layer_costs.items():
            out = np.zeros((G, K)) if m in SUM_METRICS else np.full((G, K), -np.inf)
            (np.add if m in SUM_METRICS else np.maximum).at(out, v, mat)
            self.costs[m] = out

    def _set_budgets(self, budgets: list[Budget]) -> None:
        for b in budgets:
            if b.metric not in self.costs:
                raise BitsearchError(
                    f"a {b.metric} budget needs the cost model to compute {b.metric}"
                    + (" (give it a latency table)" if b.metric == "latency" else "")
                )
        self.budgets = list(budgets)
        allowed = self.structural_allowed.copy()
        for b in self.max_budgets:
            allowed &= self.costs[b.metric] <= b.limit * (1 + FEAS_RTOL)
        self.allowed = allowed
        self.objective = np.where(allowed, self._objective_matrix, np.inf)

    # --- derived problems ----------------------------------------------------------------------------
    def with_budgets(self, budgets: "Iterable[str | Budget] | None") -> "AllocationProblem":
        """The same problem under other budgets (the matrices are shared, not rebuilt)."""
        p = copy.copy(self)
        p.notes = list(self.notes)
        p._set_budgets(parse_budgets(budgets))
        return p

    def with_budget(self, metric: str, limit: float) -> "AllocationProblem":
        """These budgets with the one on `metric` replaced (or added)."""
        b = Budget(metric, limit)
        return self.with_budgets([x for x in self.budgets if x.metric != b.metric] + [b])

    def without_budget(self, metric: str) -> "AllocationProblem":
        m = canonical_metric(metric)
        return self.with_budgets([b for b in self.budgets if b.metric != m])

    def retarget(self, metric: str, maximise: bool = False) -> "AllocationProblem":
        """This problem with `metric` (an additive one) as the objective instead of the sensitivity, and
        no budget on it: what the solvers minimise to find a budget's smallest feasible value."""
        m = canonical_metric(metric)
        if m not in SUM_METRICS:
            raise BitsearchError(f"{m} combines by max, not by sum: it cannot be a solver objective")
        if m not in self.costs:
            raise BitsearchError(f"the cost model cannot compute {m}")
        p = copy.copy(self)
        p.notes = list(self.notes)
        p.objective_name = ("-" if maximise else "") + m
        sign = -1.0 if maximise else 1.0
        p._objective_matrix = sign * self.costs[m]
        p.layer_objective = np.where(self.layer_allowed, sign * self.layer_costs[m], 0.0)
        p._set_budgets([b for b in self.budgets if b.metric != m])
        return p

    def feasibility(self) -> "AllocationProblem":
        """This problem with a zero objective: any feasible allocation is optimal."""
        p = copy.copy(self)
        p.notes = list(self.notes)
        p.objective_name = "feasibility"
        p._objective_matrix = np.zeros_like(self._objective_matrix)
        p.layer_objective = np.zeros_like(self.layer_objective)
        p._set_budgets(list(self.budgets))
        return p

    # --- sizes and views ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def n_vars(self) -> int:
        return len(self.groups)

    @property
    def n_options(self) -> int:
        return len(self.options)

    @property
    def metrics(self) -> list[str]:
        """The metrics this problem can compute (latency only with a latency table)."""
        return list(self.costs)

    @property
    def sum_budgets(self) -> list[Budget]:
        return [b for b in self.budgets if b.metric in SUM_METRICS]

    @property
    def max_budgets(self) -> list[Budget]:
        return [b for b in self.budgets if b.metric in MAX_METRICS]

    def budget(self, metric: str) -> Budget | None:
        m = canonical_metric(metric)
        return next((b for b in self.budgets if b.metric == m), None)

    def combinations(self) -> int:
        """How many allocations the constraints (and peak budgets) allow."""
        return math.prod(int(c) for c in self.allowed.sum(axis=1))

    def expand(self, var_choice: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-layer option indices from per-variable ones."""
        vc = np.asarray(var_choice, dtype=np.int64)
        if vc.shape != (self.n_vars,):
            raise BitsearchError(f"expected {self.n_vars} variable choices, got shape {vc.shape}")
        return vc[self.var_of_layer]

    def compress(self, choice: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-variable option indices from per-layer ones (tied layers must agree)."""
        c = self._check_choice(choice)
        vc = np.empty(self.n_vars, dtype=np.int64)
        vc[self.var_of_layer] = c
        if not np.array_equal(vc[self.var_of_layer], c):
            raise BitsearchError("tied layers take different options in this choice")
        return vc

    def _check_choice(self, choice: Sequence[int] | np.ndarray) -> np.ndarray:
        c = np.asarray(choice, dtype=np.int64)
        if c.shape != (self.n_layers,):
            raise BitsearchError(
                f"a choice has one option index per layer ({self.n_layers}), got shape {c.shape}"
            )
        if c.size and (c.min() < 0 or c.max() >= self.n_options):
            raise BitsearchError(f"option indices must be in [0, {self.n_options})")
        return c

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, choice: Sequence[int] | np.ndarray) -> tuple[float, dict[str, float]]:
        """(objective, every metric) of a per-layer choice; the objective is the summed sensitivity (or the
        retargeted metric)."""
        c = self._check_choice(choice)
        rows = np.arange(self.n_layers)
        objective = float(self.layer_objective[rows, c].sum())
        metrics: dict[str, float] = {}
        for m, mat in self.layer_costs.items():
            vals = mat[rows, c]
            metrics[m] = float(vals.sum() if m in SUM_METRICS else vals.max())
        return objective, metrics

    def violations(self, choice: Sequence[int] | np.ndarray) -> list[str]:
        """Why a choice is not acceptable (empty list: it is)."""
        c = self._check_choice(choice)
        out: list[str] = []
        bad = ~self.layer_allowed[np.arange(self.n_layers), c]
        for i in np.flatnonzero(bad)[:5]:
            out.append(f"layer {self.layer_names[i]!r} may not take {self.options[c[i]].label()}")
        for members in self.groups:
            if len(members) > 1 and len(set(c[members].tolist())) > 1:
                out.append(f"tied layers {[self.layer_names[i] for i in members]} take different options")
        _, metrics = self.evaluate(c)
        for b in self.budgets:
            if not b.holds(metrics[b.metric]):
                out.append(f"{b.metric} is {format_value(b.metric, metrics[b.metric])}, over {b}")
        return out

    def feasible(self, choice: Sequence[int] | np.ndarray) -> bool:
        return not self.violations(choice)

    def to_allocation(
        self, choice: Sequence[int] | np.ndarray, model: str | None = None, **metadata: Any
    ) -> Allocation:
        c = self._check_choice(choice)
        objective, metrics = self.evaluate(c)
        meta = {
            "predicted_loss": objective if self.objective_name == "sensitivity" else None,
            "metrics": metrics,
            "budgets": [b.to_dict() for b in self.budgets],
            "sensitivity_method": self.table.method,
            **metadata,
        }
        return Allocation(
            {n: self.options[j] for n, j in zip(self.layer_names, c.tolist())}, model=model, metadata=meta
        )

    def choice_of(self, allocation: Allocation | Mapping[str, LayerBits]) -> np.ndarray:
        """The per-layer choice of an allocation (its options must be columns of this problem)."""
        alloc = allocation if isinstance(allocation, Allocation) else Allocation(dict(allocation))
        alloc.check_layers(self.layer_names)
        out = np.empty(self.n_layers, dtype=np.int64)
        for i, n in enumerate(self.layer_names):
            b = alloc[n]
            if b not in self.options:
                raise BitsearchError(f"layer {n!r}: option {b.label()} is not one of this problem's options")
            out[i] = self.options.index(b)
        return out

    # --- feasibility and budget ranges ---------------------------------------------------------------
    def structural_min(self, metric: str) -> float:
        """The smallest value of `metric` under the constraints and the *other* budgets' masks, ignoring the
        other additive budgets (exact, by separability: a sum of row minima, or a max of row minima)."""
        m = canonical_metric(metric)
        mask = self.structural_allowed.copy()
        for b in self.max_budgets:
            if b.metric != m:
                mask &= self.costs[b.metric] <= b.limit * (1 + FEAS_RTOL)
        row_min = np.where(mask, self.costs[m], np.inf).min(axis=1)
        return float(row_min.sum() if m in SUM_METRICS else row_min.max())

    def check_budgets(self) -> None:
        """Raise `InfeasibleBudget` when some budget alone is below its smallest possible value."""
        # Peak budgets first: while one is impossible, the additive minima (taken over the options it
        # leaves) do not exist, and naming them would only confuse.
        for group in (self.max_budgets, self.sum_budgets):
            low = {b.metric: self.structural_min(b.metric) for b in group}
            bad = [b for b in group if not b.holds(low[b.metric])]
            if bad:
                break
        if bad:
            parts = [
                f"{b} is below the smallest possible {b.metric}, {format_value(b.metric, low[b.metric])}"
                for b in bad
            ]
            raise InfeasibleBudget(
                "no allocation meets the budget: " + "; ".join(parts) + self._constraint_hint(),
                {b.metric: low[b.metric] for b in bad},
                self.budgets,
            )

    def _constraint_hint(self) -> str:
        c = self.constraints
        if self.pins or c.allowed or c.options is not None or c.ties:
            return " (with the pins, ties and allowed options as given)"
        return ""

    def min_metric(self, metric: str, solver: str = "ilp") -> float | None:
        """The smallest value of `metric` over allocations that meet the constraints and every other budget
        (None when there is none). Exact with an exact solver: additive metrics are minimised by `solver`
        (ilp when `solver` optimises a proxy of its own), peak activation memory by bisection over its
        distinct per-layer values with exact feasibility checks."""
        m = canonical_metric(metric)
        p = self.without_budget(m)
        if m in MAX_METRICS:
            values = np.unique(p.costs[m][p.structural_allowed])
            best = None
            lo, hi = 0, len(values) - 1
            while lo <= hi:  # the feasible set only grows with the threshold
                mid = (lo + hi) // 2
                if p.with_budget(m, float(values[mid]))._any_feasible():
                    best, hi = float(values[mid]), mid - 1
                else:
                    lo = mid + 1
            return best
        if not p.sum_budgets:
            return p.structural_min(m) if p.allowed.any(axis=1).all() else None
        from .solvers import objective_solver, solve  # the solvers import this module

        try:
            return float(solve(p.retarget(m), objective_solver(solver), explain=False).objective)
        except InfeasibleBudget:
            return None

    def max_metric(self, metric: str, solver: str = "ilp") -> float | None:
        """The largest value of `metric` over feasible allocations (the dearest end of a Pareto sweep)."""
        m = canonical_metric(metric)
        p = self.without_budget(m)
        if m in MAX_METRICS:
            vals = p.costs[m]
            cells = np.argwhere(p.allowed)
            order = np.argsort(-vals[cells[:, 0], cells[:, 1]], kind="stable")
            for g, k in cells[order]:
                if p._any_feasible(fix=(int(g), int(k))):
                    return float(vals[g, k])
            return None
        if not p.sum_budgets:
            return float(np.where(p.allowed, p.costs[m], -np.inf).max(axis=1).sum())
        from .solvers import objective_solver, solve

        try:
            return float(
                -solve(p.retarget(m, maximise=True), objective_solver(solver), explain=False).objective
            )
        except InfeasibleBudget:
            return None

    def _any_feasible(self, fix: tuple[int, int] | None = None) -> bool:
        """Whether some allocation meets every budget (optionally with variable g fixed to option k).

        Exact: closed form with at most one additive budget, else an ilp feasibility solve."""
        p = self
        if fix is not None:
            p = copy.copy(self)
            g, k = fix
            structural = self.structural_allowed.copy()
            structural[g] = False
            structural[g, k] = self.structural_allowed[g, k]
            p.structural_allowed = structural
            p._set_budgets(list(self.budgets))
        if not p.allowed.any(axis=1).all():
            return False
        sums = p.sum_budgets
        if len(sums) <= 1:
            # At most one additive budget: the cheapest option of every row decides.
            return all(
                b.holds(float(np.where(p.allowed, p.costs[b.metric], np.inf).min(axis=1).sum())) for b in sums
            )
        from .solvers import solve

        try:
            solve(p.feasibility(), "ilp", explain=False)
            return True
        except InfeasibleBudget:
            return False

    def explain_infeasible(self, solver: str = "ilp") -> InfeasibleBudget:
        """The `InfeasibleBudget` for budgets that are feasible one by one but not together: for each, its
        smallest feasible value under the other budgets (exact with the ilp solver)."""
        minimums: dict[str, float | None] = {}
        parts = []
        for b in self.budgets:
            low = self.min_metric(b.metric, solver)
            if low is not None and b.holds(low):
                continue
            minimums[b.metric] = low
            if low is None:
                parts.append(f"{b}: the other budgets cannot all be met even without it")
            else:
                parts.append(
                    f"{b} is below the smallest {b.metric} possible under the other budgets, "
                    f"{format_value(b.metric, low)}"
                )
        if not parts:  # cannot happen with an exact solver; say what we know rather than nothing
            parts.append("the solver found no allocation although each budget can be met on its own")
        return InfeasibleBudget(
            "no allocation meets all the budgets together: " + "; ".join(parts) + self._constraint_hint(),
            minimums,
            self.budgets,
        )

    # --- uniform baselines -----------------------------------------------------------------------------
    def uniform_choices(self) -> list[tuple[LayerBits, np.ndarray]]:
        """Every uniform-precision allocation the constraints allow: one option for all layers, except that
        pinned layers keep their pin (the usual "W4, first/last at 8 bits" baseline). Peak budgets are not
        applied here; check the result with `feasible`."""
        out = []
        pinned = {self.layer_names.index(n): self.options.index(b) for n, b in self.pins.items()}
        for j, o in enumerate(self.options):
            choice = np.full(self.n_layers, j, dtype=np.int64)
            for i, k in pinned.items():
                choice[i] = k
            var_choice = np.empty(self.n_vars, dtype=np.int64)
            var_choice[self.var_of_layer] = choice
            if not np.array_equal(var_choice[self.var_of_layer], choice):
                continue  # a tie group mixes pinned and unpinned layers at different options
            if self.structural_allowed[np.arange(self.n_vars), var_choice].all():
                out.append((o, choice))
        # Pins make several columns give the same allocation (every column but the pins' own); keep one.
        seen: set[bytes] = set()
        unique = []
        for o, c in out:
            key = c.tobytes()
            if key not in seen:
                seen.add(key)
                unique.append((o, c))
        return unique

    def describe(self) -> str:
        return (
            f"{self.n_layers} layers ({self.n_vars} decision variables), {self.n_options} options, "
            f"objective {self.objective_name}, budgets: {', '.join(map(str, self.budgets)) or 'none'}"
        )
