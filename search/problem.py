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
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from quant.allocation import Allocation, LayerBits
from quant.cost import MAX_METRICS, SUM_METRICS, CostModel
from quant.errors import BitsearchError

from .budgets import (  # noqa: F401  (public here too)
    FEAS_RTOL,
    METRIC_ALIASES,
    Budget,
    InfeasibleBudget,
    canonical_metric,
    format_value,
    parse_budgets,
    parse_value,
)
from .constraints import Constraints

if TYPE_CHECKING:  # the problem only reads the table's fields; importing the package would pull torch methods
    from sensitivity.table import SensitivityTable


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
