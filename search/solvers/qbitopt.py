"""`qbitopt`: bit-widths re-allocated *during* quantization-aware training (QBitOpt, Peters et al., 2023).

QBitOpt does not search once and then train: it trains, and every `every_k` optimizer steps it re-estimates
cheap sensitivities from the training itself and re-solves the budgeted allocation problem with an exact
solver, so the network's bit-widths follow its sensitivities and every allocation it ever takes meets the
budgets exactly (no penalty term to tune, unlike the gradient-based bit-width learners).

Sensitivity (per layer l and option (b, a)), re-estimated from the trainer's own steps:

    S_l(b, a) = ½ Σ_i F̂_l,i · ΔW_l,i(b)²  +  A_l(a)

* F̂ is a running empirical-Fisher diagonal: an exponential moving average (decay `ema`) of the squared
  weight gradients the trainer has just computed (read from `weight.grad` after each optimizer step: no
  extra pass), times the batch size (a batch-mean gradient's square underestimates the per-sample Fisher by
  about that factor when gradient noise dominates; `batch_scale=False` turns this off);
* ΔW(b) = Q_b(W) − W for the *current* latent weights, with a per-channel symmetric quantizer clipped by
  `weight_clip` (the recipe's, "mse" by default; data-driven clips use the layer's calibration statistics):
  what the layer would reach at b bits, the same yardstick for every option, so a layer is not held at its
  current width merely because its learned quantizer fits that width;
* A_l(a): the activation part, only when the options differ in activation bits. The trainer exposes no input
  gradients, so it is estimated once before training (a per-sample Fisher pass, `sensitivity.fisher`) and
  kept; only the weight part tracks training.

Each update builds a `SensitivityTable` of these values, turns it into the budgeted problem with the user's
`problem_factory(table)`, solves it with "knapsack" (default) or "ilp", and switches the trainer to the new
allocation (its bit-width hook: `on_step` returns the Allocation) when it lowers the predicted loss by more
than `min_gain` (relative), or when the current allocation misses the budgets. Bits stop moving at
`freeze_at` (a fraction of the steps), so the final allocation is fine-tuned before the end.

    result, allocation = qbitopt_finetune(model, train, ["avg_wbits=3"], QATRecipe(steps=2000),
                                          every_k=100, eval_data=held_out)

Checkpoints: the trainer stores the current allocation, not this callback's running Fisher; a resumed run
re-warms it over `every_k` steps before the next update.

The registered solver `qbitopt` needs a model and training data (it trains); `solve(problem, "qbitopt")`
without them raises an error that points to `qbitopt_finetune`; with `model=` and `train_data=` options it runs
the fine-tuning on the problem's own table, cost, budgets and constraints (the table gives the starting
allocation) and returns the final allocation (`solver.result` keeps the QATResult).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quant.allocation import Allocation, LayerBits, is_float_bits
from quant.errors import BitsearchError

from ..problem import AllocationProblem, Constraints, parse_budgets
from .base import Capabilities, RawResult, Solver, register_solver

ProblemFactory = Callable[[Any], AllocationProblem]

EXACT_SOLVERS = ("knapsack", "ilp", "exhaustive")


class QBitOptCallback:
    """The QAT trainer callback that re-allocates bit-widths every `every_k` steps (see the module docstring).

    problem_factory  SensitivityTable -> AllocationProblem (the budgets and constraints to hold), e.g.
                     `lambda t: AllocationProblem(t, cost, ["avg_wbits=3"], constraints)`.
    layers, options  the quantizable layers (`quant.layers.discover_layers` of the float model, execution
                     order) and the bit options (table columns) to choose among.
    solver           "knapsack" or "ilp" (exact; "exhaustive" for tiny models).
    warmup_steps     no update before this step (default: every_k, so the running Fisher has k batches).
    freeze_at        fraction of the total steps after which bits no longer change (1.0: never freeze).
    activation_part  {layer: {str(activation_bits): value}}, needed when options differ in activation bits.

    `history` lists every update (step, predicted objective of the current allocation, the re-solve's optimum
    whether taken or not, changed layers); `updates` / `changes` count them; `calls` counts steps seen.
    """

    def __init__(
        self,
        problem_factory: ProblemFactory,
        every_k: int,
        layers: Sequence[Any],
        options: Sequence[LayerBits],
        solver: str = "knapsack",
        ema: float = 0.9,
        warmup_steps: int | None = None,
        freeze_at: float = 0.75,
        min_gain: float = 0.0,
        activation_part: dict[str, dict[str, float]] | None = None,
        weight_clip: str = "mse",
        weight_granularity: str = "per_channel",
        batch_scale: bool = True,
        printer: Callable[[str], None] | None = None,
    ):
        if not callable(problem_factory):
            raise BitsearchError("problem_factory must be a callable SensitivityTable -> AllocationProblem")
        if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
            raise BitsearchError(f"every_k must be a positive integer, got {every_k!r}")
        if solver not in EXACT_SOLVERS:
            raise BitsearchError(f"QBitOpt re-solves with an exact solver: one of {list(EXACT_SOLVERS)}, got {solver!r}")
        if not 0.0 <= ema < 1.0:
            raise BitsearchError(f"ema must be in [0, 1), got {ema!r}")
        if not 0.0 < freeze_at <= 1.0:
            raise BitsearchError(f"freeze_at must be in (0, 1], got {freeze_at!r}")
        if min_gain < 0:
            raise BitsearchError("min_gain must be non-negative")
        self.problem_factory = problem_factory
        self.every_k = every_k
        self.layers = list(layers)
        self.names = [layer.name for layer in self.layers]
        self.options = [o if isinstance(o, LayerBits) else LayerBits.parse(str(o)) for o in options]
        if not self.options:
            raise BitsearchError("QBitOpt needs at least one bit option")
        abits = {o.activation_bits for o in self.options}
        if len(abits) > 1:
            if activation_part is None:
                raise BitsearchError(
                    "the options differ in activation bits: give activation_part (e.g. a fisher table's "
                    "extra['activation_part']); the trainer exposes no input gradients to estimate it"
                )
            missing = [n for n in self.names if n not in activation_part]
            if missing:
                raise BitsearchError(f"activation_part lacks layer(s) {missing[:3]}")
        self.activation_part = activation_part
        self.solver = solver
        self.ema = float(ema)
        self.warmup_steps = every_k if warmup_steps is None else int(warmup_steps)
        self.freeze_at = float(freeze_at)
        self.min_gain = float(min_gain)
        self.weight_clip = weight_clip
        self.weight_granularity = weight_granularity
        self.batch_scale = bool(batch_scale)
        self.printer = printer
        self.fisher: dict[str, Any] = {}  # layer -> running mean of squared gradients (a tensor)
        self._ema_weight = 0.0  # for bias correction of the running mean
        self.calls = 0
        self.updates = 0
        self.changes = 0
        self.history: list[dict[str, Any]] = []
        self.last_table: Any = None
        self.last_problem: AllocationProblem | None = None
        self.result: Any = None
        self.seconds = 0.0

    # --- the hook ----------------------------------------------------------------------------------------
    def on_step(self, state: Any) -> Allocation | None:
        from quant.apply import quantized_layers

        self.calls += 1
        layers = quantized_layers(state.model)
        missing = [n for n in self.names if n not in layers]
        if missing:
            raise BitsearchError(f"QBitOpt: the trained model has no quantized layer(s) {missing[:3]}")
        self._accumulate(layers)
        total = max(1, int(state.total_steps))
        if state.step < self.warmup_steps or state.step % self.every_k != 0:
            return None
        if state.step > self.freeze_at * total or state.step >= total:
            return None
        return self._update(state, layers)

    def on_end(self, result: Any) -> None:
        self.result = result

    def _accumulate(self, layers: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self._ema_weight = self.ema * self._ema_weight + (1.0 - self.ema)
            for name in self.names:
                g = layers[name].layer.weight.grad
                if g is None:
                    continue
                g2 = g.detach().float().pow(2)
                prev = self.fisher.get(name)
                if prev is None:
                    # as if the earlier (missing) steps had contributed this batch: keeps the bias correction
                    self.fisher[name] = g2 * self._ema_weight
                else:
                    prev.mul_(self.ema).add_(g2, alpha=1.0 - self.ema)

    # --- sensitivities -----------------------------------------------------------------------------------
    def weight_errors(self, layers: dict[str, Any]) -> dict[str, dict[tuple[int, str | None], Any]]:
        """ΔW² per layer and weight option (weight bits, quantizer override) for the current latent weights."""
        import torch

        from quant.apply import DATA_CLIPS, QuantConfig, QuantizedLayer

        wopts = sorted({(o.weight_bits, o.weight_quantizer) for o in self.options}, key=lambda t: (t[0], t[1] or ""))
        out: dict[str, dict[tuple[int, str | None], Any]] = {}
        with torch.no_grad():
            for name in self.names:
                live = layers[name]
                clip = self.weight_clip
                if clip in DATA_CLIPS and live.stats is None:
                    clip = "mse"
                probe = QuantizedLayer(live.layer, name, QuantConfig(weight_clip=clip,
                                                                     weight_granularity=self.weight_granularity))
                probe.stats = live.stats
                w = live.layer.weight.detach()
                errs = {}
                for wb, wq in wopts:
                    probe.set_bits(LayerBits(wb, 32, wq))
                    errs[(wb, wq)] = (probe.weight_quant(w) - w).float().pow(2)
                out[name] = errs
        return out

    def table(self, state: Any, layers: dict[str, Any] | None = None) -> Any:
        """The sensitivity table of the model as it is now (see the module docstring)."""
        from quant.apply import quantized_layers
        from sensitivity.table import SensitivityTable

        layers = layers or quantized_layers(state.model)
        errs = self.weight_errors(layers)
        scale = float(getattr(state.trainer, "batch_size", 1)) if self.batch_scale and state is not None else 1.0
        corr = 1.0 / self._ema_weight if self._ema_weight > 0 else 1.0
        values = np.zeros((len(self.names), len(self.options)))
        weight_part: dict[str, dict[str, float]] = {}
        for i, name in enumerate(self.names):
            f = self.fisher.get(name)
            parts = {}
            for key, dw2 in errs[name].items():
                parts[key] = 0.0 if f is None else 0.5 * scale * corr * float((f * dw2).sum())
            weight_part[name] = {f"{k[0]}{'' if k[1] is None else ':' + k[1]}": v for k, v in parts.items()}
            for j, o in enumerate(self.options):
                v = parts[(o.weight_bits, o.weight_quantizer)]
                if self.activation_part is not None and not is_float_bits(o.activation_bits):
                    v += float(self.activation_part[name].get(str(o.activation_bits), 0.0))
                values[i, j] = v
        return SensitivityTable(
            method="qbitopt",
            layers=list(self.layers),
            options=list(self.options),
            values=values,
            covers_activations=self.activation_part is not None,
            settings={
                "value": "0.5*sum(F*dW^2) (+ fixed activation part); F: EMA of squared training gradients"
                + (" x batch size" if self.batch_scale else ""),
                "ema": self.ema,
                "weight_clip": self.weight_clip,
            },
            data={"name": "training batches", "samples": None, "data_free": False, "labels": True},
            extra={"weight_part": weight_part, "step": int(getattr(state, "step", 0) or 0)},
        )

    # --- the update ---------------------------------------------------------------------------------------
    def _update(self, state: Any, layers: dict[str, Any]) -> Allocation | None:
        from .base import solve

        t0 = time.perf_counter()
        table = self.table(state, layers)
        problem = self.problem_factory(table)
        if not isinstance(problem, AllocationProblem):
            raise BitsearchError("problem_factory must return an AllocationProblem")
        sol = solve(problem, self.solver, explain=False)
        current = problem.choice_of(state.allocation)
        cur_obj, _ = problem.evaluate(current)
        cur_ok = problem.feasible(current)
        same = np.array_equal(sol.choice, current)
        better = sol.objective < cur_obj - self.min_gain * abs(cur_obj) - 1e-15 * (1.0 + abs(cur_obj))
        switch = not same and (better or not cur_ok)
        changed = [n for n, a, b in zip(problem.layer_names, current, sol.choice) if a != b] if switch else []
        self.updates += 1
        self.last_table, self.last_problem = table, problem
        self.seconds += time.perf_counter() - t0
        rec = {
            "step": int(state.step),
            "objective_before": float(cur_obj),
            "objective_after": float(sol.objective if switch else cur_obj),
            # the re-solve's optimum even when it is not taken: how far the running sensitivities are from
            # moving the allocation (equal to objective_before when the current allocation is still optimal)
            "optimum": float(sol.objective),
            "optimum_differs": bool(not same),
            "changed": changed,
            "allocation": {n: problem.options[k].label() for n, k in
                           zip(problem.layer_names, (sol.choice if switch else current))},
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(rec)
        if not switch:
            return None
        self.changes += 1
        if self.printer is not None:
            moves = ", ".join(f"{n}->{rec['allocation'][n]}" for n in changed)
            self.printer(f"qbitopt step {state.step}: {moves} (predicted {cur_obj:.4g} -> {sol.objective:.4g})")
        assert sol.allocation is not None
        alloc = sol.allocation
        alloc.metadata["qbitopt"] = {"step": int(state.step), "updates": self.updates, "changes": self.changes}
        return alloc


# --- the one-call fine-tuning -------------------------------------------------------------------------------


def _train_xy(train_data: Any) -> tuple[Any, Any]:
    from zoo.data import as_dataset

    ds = as_dataset(train_data, "train_data")
    return ds.x, ds.y


def qbitopt_finetune(
    model: Any,
    train_data: Any,
    budgets: Any,
    recipe: Any = None,
    *,
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    activation_bits: Sequence[int] = (32,),
    constraints: Constraints | dict[str, Any] | None = None,
    cost: Any = None,
    every_k: int = 50,
    solver: str = "knapsack",
    initial: str | Allocation = "solve",
    ema: float = 0.9,
    freeze_at: float = 0.75,
    min_gain: float = 0.0,
    sensitivity_samples: int = 256,
    calibration: Any = None,
    eval_data: Any = None,
    callbacks: Any = None,
    checkpoint_dir: Any = None,
    resume_from: Any = None,
    printer: Callable[[str], None] | None = None,
) -> tuple[Any, Allocation]:
    """QAT with QBitOpt re-allocation; returns (QATResult, the final Allocation, within `budgets`).

    budgets: e.g. ["avg_wbits=3"] (see `search.Budget.parse`). recipe: a `QATRecipe` (default QATRecipe()).
    The options are weight_bits × activation_bits (32: float). initial: "solve" (the budgeted optimum of a
    per-sample Fisher table of the float model on `sensitivity_samples` training items), or an Allocation
    (over budget is allowed: the first update replaces it). cost: a CostModel (default: the model's layers,
    the recipe's weight granularity). The other arguments go to `quant.qat.finetune` or the callback.
    `resume_from` (a checkpoint of an interrupted run, e.g. in `checkpoint_dir`): training resumes there with
    the allocation it had reached; the callback's running Fisher re-warms over `every_k` steps, and `history`
    holds only the updates made after the resume (a caller that needs all of them keeps its own copy).
    """
    from quant.apply import QuantConfig
    from quant.cost import CostModel
    from quant.layers import discover_layers
    from quant.qat import QATRecipe, finetune
    from sensitivity import SensitivityOptions, compute_sensitivity

    from .base import solve

    recipe = recipe or QATRecipe()
    budget_list = parse_budgets(budgets)
    if not budget_list:
        raise BitsearchError("QBitOpt needs at least one budget (e.g. avg_wbits=3)")
    x, y = _train_xy(train_data)
    model = model.eval()
    layers = discover_layers(model, x[:2])
    options = [LayerBits(w, a) for w in weight_bits for a in activation_bits]
    if cost is None:
        cost = CostModel(layers, weight_granularity=recipe.weight_granularity)
    if constraints is not None and not isinstance(constraints, Constraints):
        constraints = Constraints.from_dict(constraints)

    def factory(table: Any) -> AllocationProblem:
        return AllocationProblem(table, cost, budget_list, constraints)

    need_acts = len(set(activation_bits)) > 1
    activation_part = None
    init_table = None
    if initial == "solve" or need_acts:
        clip = recipe.weight_clip
        sopts = SensitivityOptions(tuple(weight_bits), tuple(activation_bits), samples=sensitivity_samples,
                                   seed=recipe.seed, quant=QuantConfig(weight_clip=clip,
                                                                       weight_granularity=recipe.weight_granularity))
        init_table = compute_sensitivity(model, (x, y), "fisher", sopts)
        if need_acts:
            activation_part = init_table.extra.get("activation_part")
    if isinstance(initial, Allocation):
        start = initial
    elif initial == "solve":
        sol = solve(factory(init_table), solver)
        assert sol.allocation is not None
        start = sol.allocation
    else:
        raise BitsearchError("initial must be 'solve' or an Allocation")
    cb = QBitOptCallback(factory, every_k, layers, options, solver=solver, ema=ema, freeze_at=freeze_at,
                         min_gain=min_gain, activation_part=activation_part, weight_clip=recipe.weight_clip,
                         weight_granularity=recipe.weight_granularity, printer=printer)
    extra = [] if callbacks is None else (list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks])
    result = finetune(model, start, train_data, recipe, callbacks=[cb] + extra, calibration=calibration,
                      eval_data=eval_data, checkpoint_dir=checkpoint_dir, resume_from=resume_from)
    final = result.allocation
    check = cb.last_problem if cb.last_problem is not None else (factory(init_table) if init_table is not None else None)
    if check is not None:
        bad = check.violations(check.choice_of(final))
        if bad:
            raise BitsearchError(f"QBitOpt ended on an allocation outside the budgets: {bad[0]} (was never updated: "
                                 f"give every_k below {result.steps} * freeze_at)")
    final.metadata.setdefault("qbitopt", {})
    final.metadata["qbitopt"].update({"calls": cb.calls, "updates": cb.updates, "changes": cb.changes,
                                      "every_k": every_k, "solver": solver, "history": cb.history})
    return result, final


# --- the registered solver ---------------------------------------------------------------------------------


@dataclass
class QBitOptSettings:
    """The settings a search request gives QBitOpt (`solver.settings`); the model, training data, budgets and
    bit options come from the search itself. `recipe`: `QATRecipe` fields (steps, lr, ...)."""

    every_k: int = 50
    freeze_at: float = 0.75
    solver: str = "knapsack"
    ema: float = 0.9
    min_gain: float = 0.0
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:

        if isinstance(self.every_k, bool) or not isinstance(self.every_k, int) or self.every_k < 1:
            raise BitsearchError(f"every_k must be a positive integer, got {self.every_k!r}")
        if isinstance(self.freeze_at, bool) or not isinstance(self.freeze_at, (int, float)) or not 0 < self.freeze_at <= 1:
            raise BitsearchError(f"freeze_at must be in (0, 1], got {self.freeze_at!r}")
        if self.solver not in EXACT_SOLVERS:
            raise BitsearchError(f"QBitOpt re-solves with one of {list(EXACT_SOLVERS)}, got {self.solver!r}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 <= self.ema < 1:
            raise BitsearchError(f"ema must be in [0, 1), got {self.ema!r}")
        if isinstance(self.min_gain, bool) or not isinstance(self.min_gain, (int, float)) or self.min_gain < 0:
            raise BitsearchError(f"min_gain must be a non-negative number, got {self.min_gain!r}")
        if not isinstance(self.recipe, dict):
            raise BitsearchError("recipe must be an object of QATRecipe fields")
        r = self.qat_recipe()
        total = r.steps if r.steps is not None else None
        if total is not None and self.every_k >= total * self.freeze_at:
            raise BitsearchError(
                f"every_k ({self.every_k}) must be below steps x freeze_at ({total} x {self.freeze_at}), "
                "or QBitOpt never re-allocates"
            )

    def qat_recipe(self):
        from quant.qat import QATRecipe

        return QATRecipe.from_dict(self.recipe)


@register_solver
class QBitOptSolver(Solver):
    """QBitOpt as a solver entry: it trains, so it needs `model` and `train_data` (see the module docstring)."""

    name = "qbitopt"
    exact = False
    # It re-allocates during QAT: a search request runs it through `search.measured` with its training data.
    capabilities = Capabilities(needs_train=True, needs_labels=True)
    supports_objective = False
    Config = QBitOptSettings  # what a search request may set (the service passes model and data itself)

    def __init__(
        self,
        model: Any = None,
        train_data: Any = None,
        recipe: Any = None,
        every_k: int = 50,
        solver: str = "knapsack",
        ema: float = 0.9,
        freeze_at: float = 0.75,
        min_gain: float = 0.0,
        calibration: Any = None,
        eval_data: Any = None,
        printer: Callable[[str], None] | None = None,
    ):
        self.model, self.train_data, self.recipe = model, train_data, recipe
        self.every_k, self.inner, self.ema = every_k, solver, ema
        self.freeze_at, self.min_gain = freeze_at, min_gain
        self.calibration, self.eval_data, self.printer = calibration, eval_data, printer
        self.result: Any = None
        self.callback: QBitOptCallback | None = None

    def _solve(self, problem: AllocationProblem) -> RawResult:
        if self.model is None or self.train_data is None:
            raise BitsearchError(
                "the qbitopt solver re-allocates bit-widths during quantization-aware training, so it needs the "
                "model and training data: call search.solvers.qbitopt.qbitopt_finetune(model, train_data, "
                "budgets, recipe), or pass model=... and train_data=... (and recipe=...) as solver options"
            )
        from quant.qat import QATRecipe, finetune

        from .base import solve

        table = problem.table
        abits = {o.activation_bits for o in table.options}
        act = table.extra.get("activation_part") if len(abits) > 1 else None
        start = solve(problem, self.inner, explain=False).allocation
        assert start is not None
        recipe = self.recipe or QATRecipe()

        def factory(t: Any) -> AllocationProblem:
            return AllocationProblem(t, problem.cost, problem.budgets, problem.constraints)

        cb = QBitOptCallback(factory, self.every_k, table.layers, table.options, solver=self.inner, ema=self.ema,
                             freeze_at=self.freeze_at, min_gain=self.min_gain, activation_part=act,
                             weight_clip=recipe.weight_clip, weight_granularity=recipe.weight_granularity,
                             printer=self.printer)
        self.callback = cb
        self.result = finetune(self.model, start, self.train_data, recipe, callbacks=[cb],
                               calibration=self.calibration, eval_data=self.eval_data)
        choice = problem.choice_of(self.result.allocation)
        top1 = self.result.metrics.get("top1")
        notes = [f"qbitopt: {cb.updates} re-solves, {cb.changes} re-allocations in {self.result.steps} QAT steps"
                 + ("" if top1 is None else f"; QAT top1 {top1:.2f} %")]
        return RawResult(problem.compress(choice), notes=notes)


__all__ = ["QBitOptCallback", "QBitOptSettings", "QBitOptSolver", "qbitopt_finetune"]
