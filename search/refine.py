"""Interaction-aware refinement: a budget-preserving local search measured in the quantized network.

Every sensitivity method prices each layer alone in an otherwise float network, and the solver adds those
prices up. At low bit-widths the real losses interact, so the solver's allocation is a starting point, not
an answer. `refine` improves it by measurement:

1. **Measure in context.** With every layer at its *current* option, each decision variable (a layer, or a
   tie group) is moved one step up and one step down (weight bits, or activation bits) and the increase of
   the mean per-item KL(FP32 ‖ quantized) on the *tuning* data is measured — ExLlamaV3's optimizer does the
   same between quantized models. Quantizing a layer cannot change what ran before it, so the network is
   run once up to that layer (the prefix, already quantized at the current options) and only the suffix
   is re-run per move (`sensitivity.measured.PrefixCache`).
2. **Swap.** Moves that fit the budgets alone, and pairs (raise one variable, lower another) that stay within
   *every* budget (and the pins, ties and allowed options of the problem), are ranked by their predicted
   change of KL (the sum of the two measured changes).
3. **Verify.** The best few are measured for real, one full pass each: a move is kept only if the mean KL
   on the tuning data falls *and* the ranking metric on the guard (selection) data does not fall (top-1
   with labels, top-1 agreement with FP32 without). Rounds repeat while a round keeps a move, within an
   explicit measurement budget (`max_passes`, in full forward passes over the tuning data; a guard pass
   counts as its share of items).

KL to FP32 needs no labels, so the tuning data can be the calibration data: the selection data then only
guard (they can reject a move, never propose one), which keeps the later paired test on them nearly free of
selection bias. Works for weight and activation bits alike (an option's activation bits are one more axis
of steps).

Language models (token data, `zoo.tokens`): the KL is the mean per-token KL over the tuning windows' target
tokens and the guard is the mean per-sequence NLL (log-perplexity) on the selection windows, the metric the
paired selection ranks them by (`_TokenObjective`). When the options are named weight schemes, which share
element widths, a step follows the variable's weight storage including scales (`_scheme_neighbours`). The
prefix cache holds for decoder blocks too: a move of a layer in block i replays the cached embeddings, the
rotary tables, blocks < i and the modules of block i that ran before that layer, and re-runs the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quant.allocation import Allocation, is_float_bits
from quant.errors import BitsearchError

from .problem import AllocationProblem


@dataclass
class RefineConfig:
    """Settings of the refinement stage (validated).

    The measurement budget is in full forward passes over the tuning data (a guard pass counts as its share
    of items). Left unset it is sized to the model: `passes_per_variable` × the number of decision variables,
    because one round measures about two moves per variable and the number of rounds needed to reach a
    point where no move helps grows with the number of variables too; a fixed budget either stops large
    models after one round or wastes passes on small ones.
    """

    enabled: bool = True
    max_passes: float | None = None  # None: passes_per_variable × number of decision variables
    passes_per_variable: float = 10.0
    max_rounds: int = 8
    verify_per_round: int = 4  # candidate moves measured for real per round
    batch_size: int = 256
    #: the one-step moves are ranked on the first this many tuning items (a ranking only: every kept move
    #: is verified on all of them); None: all
    measure_samples: int | None = 128

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise BitsearchError("refine.enabled must be true or false")
        for name in ("max_rounds", "verify_per_round", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BitsearchError(f"refine.{name} must be a positive integer, got {v!r}")
        for name in ("max_passes", "passes_per_variable"):
            v = getattr(self, name)
            if v is None and name == "max_passes":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise BitsearchError(f"refine.{name} must be a positive number, got {v!r}")
            setattr(self, name, float(v))
        m = self.measure_samples
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise BitsearchError(f"refine.measure_samples must be a positive integer or null, got {m!r}")

    def budget_for(self, n_vars: int) -> float:
        """The measurement budget (passes over the tuning data) for a problem with `n_vars` variables."""
        if self.max_passes is not None:
            return self.max_passes
        return self.passes_per_variable * max(1, int(n_vars))

    @classmethod
    def from_dict(cls, d: Any) -> RefineConfig:
        if d is None:
            return cls()
        if isinstance(d, bool):
            return cls(enabled=d)
        if not isinstance(d, dict):
            raise BitsearchError("refine settings must be an object or true/false")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise BitsearchError(f"unknown refine setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "max_passes": self.max_passes,
            "passes_per_variable": self.passes_per_variable,
            "max_rounds": self.max_rounds,
            "verify_per_round": self.verify_per_round,
            "batch_size": self.batch_size,
            "measure_samples": self.measure_samples,
        }


@dataclass
class RefineResult:
    allocation: Allocation
    choice: np.ndarray
    start: np.ndarray
    steps: list[dict[str, Any]]  # kept moves, in order
    kl_start: float  # mean KL to FP32 on the tuning data
    kl_end: float
    guard_metric: str | None  # "top1" / "agreement" ("loss" for token data) on the guard data, or None
    guard_start: float | None
    guard_end: float | None
    cost: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "kl_start": self.kl_start,
            "kl_end": self.kl_end,
            "guard_metric": self.guard_metric,
            "guard_start": self.guard_start,
            "guard_end": self.guard_end,
            "cost": self.cost,
            "stopped": self.stopped,
        }


def _neighbours(problem: AllocationProblem, g: int, j: int) -> list[int]:
    """Allowed options one step from option j for variable g: next weight bits up/down at the same
    activation bits, and next activation bits up/down at the same weight bits."""
    opts = problem.options
    cur = opts[j]
    allowed = [k for k in range(len(opts)) if problem.allowed[g, k] and k != j]
    out: list[int] = []
    for axis in ("weight_bits", "activation_bits"):
        other = "activation_bits" if axis == "weight_bits" else "weight_bits"
        same = [
            k
            for k in allowed
            if getattr(opts[k], other) == getattr(cur, other)
            and opts[k].weight_quantizer == cur.weight_quantizer
            and getattr(opts[k], axis) != getattr(cur, axis)
        ]
        up = [k for k in same if getattr(opts[k], axis) > getattr(cur, axis)]
        down = [k for k in same if getattr(opts[k], axis) < getattr(cur, axis)]
        if up:
            out.append(min(up, key=lambda k: getattr(opts[k], axis)))
        if down:
            out.append(max(down, key=lambda k: getattr(opts[k], axis)))
    return out


#: Relative tolerance under which two options' weight storage counts as the same cost level.
_COST_RTOL = 1e-9


def _has_schemes(problem: AllocationProblem) -> bool:
    """Whether the problem's options include named weight schemes (int-g, FP8, MXFP4, NVFP4...)."""
    return any(o.scheme is not None for o in problem.options)


def _scheme_neighbours(problem: AllocationProblem, g: int, j: int) -> list[int]:
    """Allowed options one step from option j for variable g when the options are weight *schemes*.

    Schemes share element widths (int4-g128, int4-g64, MXFP4, NVFP4 all store 4-bit elements), so "one step"
    in weight bits is not defined by `weight_bits`: the options at the same activation bits are ordered by
    the variable's weight storage (`costs["weight_memory"]`, scales and zero points included, i.e. its bpw),
    and a step goes to every option at the nearest cost level above, at the nearest level below, and to the
    other options at the current level (e.g. int4-g64 ↔ MXFP4, both 4.25 bpw). Activation steps are as in
    `_neighbours`: the next activation bits up/down with the same weight scheme.
    """
    opts = problem.options
    cur = opts[j]
    allowed = [k for k in range(len(opts)) if problem.allowed[g, k] and k != j]
    storage = problem.costs["weight_memory"][g]
    here = float(storage[j])

    def level(k: int) -> int:  # -1 below, 0 same, +1 above the current storage
        d = float(storage[k]) - here
        return 0 if abs(d) <= _COST_RTOL * max(abs(here), 1.0) else (1 if d > 0 else -1)

    same_act = [k for k in allowed if opts[k].activation_bits == cur.activation_bits]
    out = [k for k in same_act if level(k) == 0]
    up = [k for k in same_act if level(k) > 0]
    down = [k for k in same_act if level(k) < 0]
    if up:
        lo = min(float(storage[k]) for k in up)
        out += [k for k in up if float(storage[k]) <= lo * (1 + _COST_RTOL)]
    if down:
        hi = max(float(storage[k]) for k in down)
        out += [k for k in down if float(storage[k]) >= hi * (1 - _COST_RTOL)]
    same_weights = [
        k
        for k in allowed
        if (opts[k].weight_bits, opts[k].weight_quantizer, opts[k].scheme)
        == (cur.weight_bits, cur.weight_quantizer, cur.scheme)
        and opts[k].activation_bits != cur.activation_bits
    ]
    act_up = [k for k in same_weights if opts[k].activation_bits > cur.activation_bits]
    act_down = [k for k in same_weights if opts[k].activation_bits < cur.activation_bits]
    if act_up:
        out.append(min(act_up, key=lambda k: opts[k].activation_bits))
    if act_down:
        out.append(max(act_down, key=lambda k: opts[k].activation_bits))
    return out


def _guard_worse(metric: str | None, new: float, current: float) -> bool:
    """Whether the guard metric got worse: larger is better for top-1/agreement, smaller for "loss"."""
    return new > current if metric == "loss" else new < current


@dataclass
class _TokenObjective:
    """The refinement's figures on token data (a causal language model's next-token logits, N×vocab×(T−1)).

    Objective: the mean per-token KL(FP ‖ quantized) over the target tokens of the tuning windows. Each
    sequence's mean KL over its target tokens is weighted by its share of tokens (`weights`, mean 1), so the
    mean over sequences is the mean over tokens even when padding shortens some windows. Guard: the mean
    per-sequence NLL on the guard (selection) windows, the ranking metric the paired selection uses for
    language models (`search.selection`, "loss": smaller is better).
    """

    targets: torch.Tensor  # (N, T−1) next-token targets of the tuning data, IGNORE at padding
    weights: torch.Tensor  # (N,) float64: target tokens of each sequence / their mean
    guard_metric: str = "loss"

    @classmethod
    def of(cls, tune: Any, guard: Any) -> _TokenObjective | None:
        from zoo.tokens import IGNORE, is_token_data

        if not is_token_data(tune):
            if guard is not None and is_token_data(guard):
                raise BitsearchError("refine: the guard data are token ids but the tuning data are not")
            return None
        if guard is not None and not is_token_data(guard):
            raise BitsearchError("refine: the tuning data are token ids but the guard data are not")
        if guard is not None and guard.y is None:
            raise BitsearchError("refine: the guard token data have no next-token targets")
        x = tune.x
        y = tune.y if tune.y is not None else torch.where(x[:, 1:] >= 0, x[:, 1:], torch.full_like(x[:, 1:], IGNORE))
        counts = (y != IGNORE).sum(1).double()
        if not bool((counts > 0).any()):
            raise BitsearchError("refine: the tuning token data have no target token")
        return cls(y, counts / counts.mean())

    def item_kl(self, logits: torch.Tensor, ref_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-sequence KL of the tuning rows `rows`, token-weighted (their mean is the per-token mean)."""
        from sensitivity.measured import per_sample_metric

        per = per_sample_metric(logits, ref_logits, self.targets[rows], "kl")
        return per * self.weights[rows]

    @staticmethod
    def guard_value(result: Any) -> float:
        return float(result.per_sample["ce"].mean())


def refine(
    problem: AllocationProblem,
    start: Allocation | np.ndarray,
    model: torch.nn.Module,
    calibration: Any,
    tune_data: Any,
    guard_data: Any = None,
    quant_config: Any = None,
    settings: RefineConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    measuring: Any = None,
) -> RefineResult:
    """Refine `start` (feasible for `problem`, whose budgets are the ones to keep) by measured local search.

    `calibration`: data for the quantizers' statistics. `tune_data`: where the KL to FP32 is measured (no
    labels needed; the calibration data will do). `guard_data`: the selection data; a move that lowers the
    ranking metric there is not kept (None: no guard). Returns the refined allocation and what it cost.
    `measuring`: a `search.pareto.MeasuringModel` of the same model, calibration data and config, whose
    wrapped copy (and the quantizers it has derived) and FP32 logits to share with later measurements;
    `model`, `calibration` and `quant_config` are then taken from it. The passes counted are the same.
    """
    from quant.apply import needs_calibration, set_allocation
    from sensitivity.measured import PrefixCache, _logits, per_sample_metric
    from zoo.data import as_dataset
    from zoo.evaluate import predict
    from zoo.lm_eval import predict_tokens

    from .pareto import MeasuringModel

    t0, cpu0 = time.perf_counter(), time.process_time()
    cfg = settings or RefineConfig()
    measuring = measuring or MeasuringModel(model, calibration, quant_config)
    model, calibration, config = measuring.model, measuring.calibration, measuring.config
    progress = progress or (lambda f, m: None)
    choice = problem.choice_of(start) if isinstance(start, Allocation) else np.asarray(start, dtype=np.int64)
    bad = problem.violations(choice)
    if bad:
        raise BitsearchError(f"refine: the starting allocation is not feasible: {'; '.join(bad[:3])}")
    start_choice = choice.copy()
    tune = as_dataset(tune_data, "tune_data")
    guard = as_dataset(guard_data, "guard_data") if guard_data is not None else None
    n_tune = len(tune)
    max_passes = cfg.budget_for(problem.n_vars)

    qmodel = measuring.wrapped()
    wrappers = measuring.layers
    missing = [n for n in problem.layer_names if n not in wrappers]
    if missing:
        raise BitsearchError(f"refine: layer(s) {missing[:3]} not found in the model")
    passes = 0.0
    start_alloc = problem.to_allocation(choice)
    any_act = any(not is_float_bits(o.activation_bits) for o in problem.options)
    if any_act or needs_calibration(start_alloc, config):
        if calibration is None:
            raise BitsearchError("refine: these options need calibration data")
        measuring.wrapped(calibrate=True)
        # counted whether or not an earlier user of `measuring` ran it: the budget does not depend on sharing
        passes += measuring.calibrated_items / n_tune

    ref_tune = measuring.reference(tune).logits
    passes += 1.0
    guard_metric = None
    tokens = _TokenObjective.of(tune, guard)  # None for classifiers
    step_options = _scheme_neighbours if _has_schemes(problem) else _neighbours
    if guard is not None:
        measuring.reference(guard)  # the FP32 logits every guard pass is compared with
        passes += len(guard) / n_tune
        guard_metric = tokens.guard_metric if tokens else "top1" if guard.y is not None else "agreement"

    def alloc_of(c: np.ndarray) -> Allocation:
        return Allocation({n: problem.options[k] for n, k in zip(problem.layer_names, c.tolist())})

    def full(c: np.ndarray) -> tuple[torch.Tensor, float]:
        """Per-item KL on the tuning data of allocation c (one full pass)."""
        nonlocal passes
        set_allocation(qmodel, alloc_of(c))
        if tokens:
            per = tokens.item_kl(predict_tokens(qmodel, tune, cfg.batch_size), ref_tune, slice(None))
        else:
            logits = predict(qmodel, tune, cfg.batch_size)
            per = per_sample_metric(logits, ref_tune, None, "kl")  # as the moves below are measured
        passes += 1.0
        return per, float(per.mean())

    def guard_value(c: np.ndarray) -> float | None:
        nonlocal passes
        if guard is None:
            return None
        r = measuring.evaluate(alloc_of(c), guard)  # kept: the selection measurement will not run it again
        passes += len(guard) / n_tune
        if tokens:
            return tokens.guard_value(r)
        return float(r.top1 if guard_metric == "top1" else r.agreement)

    layers = problem.table.layers
    total_macs = float(sum(li.macs for li in layers)) or 1.0
    macs_before = np.concatenate([[0.0], np.cumsum([li.macs for li in layers])[:-1]]) / total_macs
    first_layer = [min(members) for members in problem.groups]  # layer order = execution order
    # moves are ranked on a prefix of the tuning data (cheaper); verification uses all of it
    n_measure = n_tune if cfg.measure_samples is None else min(n_tune, cfg.measure_samples)
    measure_share = n_measure / n_tune
    batches = [tune.x[i : min(i + cfg.batch_size, n_measure)] for i in range(0, n_measure, cfg.batch_size)]
    ref_batches = [ref_tune[i : min(i + cfg.batch_size, n_measure)] for i in range(0, n_measure, cfg.batch_size)]

    base_kl, kl = full(choice)
    kl_start = kl
    g_cur = guard_value(choice)
    guard_start = g_cur
    steps: list[dict[str, Any]] = []
    stopped = "no measured move improves the KL without lowering the guard metric"
    sum_metrics = [b.metric for b in problem.sum_budgets]
    rounds = 0
    measured_moves = verified = 0

    def var_choice(c: np.ndarray) -> np.ndarray:
        return problem.compress(c)

    while rounds < cfg.max_rounds:
        rounds += 1
        vc = var_choice(choice)
        # 1. one-step moves of every variable, measured with the others at their current options
        moves: list[tuple[int, int, float]] = []  # (variable, option, mean ΔKL)
        planned = [(g, step_options(problem, g, int(vc[g]))) for g in range(problem.n_vars)]
        cost_round = measure_share * sum(
            macs_before[first_layer[g]] * (1 if nb else 0) + (1 - macs_before[first_layer[g]]) * len(nb)
            for g, nb in planned
        )
        if passes + cost_round + 1.0 > max_passes:
            stopped = f"measurement budget reached ({passes:.1f} of {max_passes:g} passes)"
            break
        set_allocation(qmodel, alloc_of(choice))
        for gi, (g, nb) in enumerate(planned):
            if not nb:
                continue
            target = wrappers[problem.layer_names[first_layer[g]]]
            members = [wrappers[problem.layer_names[i]] for i in problem.groups[g]]
            current_bits = problem.options[int(vc[g])]
            prefix = float(macs_before[first_layer[g]])
            cacher = PrefixCache(qmodel, target) if prefix > 0 else None
            deltas: list[list[torch.Tensor]] = [[] for _ in nb]
            for b, xb in enumerate(batches):
                cache = cacher.capture(xb) if cacher is not None else None
                for m, k in enumerate(nb):
                    for q in members:
                        q.set_bits(problem.options[k])
                    with torch.no_grad():
                        out = qmodel(xb) if cache is None else cacher.replay(xb, cache)
                    if tokens:
                        rows = slice(b * cfg.batch_size, b * cfg.batch_size + len(xb))
                        per = tokens.item_kl(_logits(out), ref_batches[b], rows)
                    else:
                        per = per_sample_metric(_logits(out), ref_batches[b], None, "kl")
                    deltas[m].append(per)
                for q in members:
                    q.set_bits(current_bits)
            passes += measure_share * (prefix + (1 - prefix) * len(nb))
            measured_moves += len(nb)
            for m, k in enumerate(nb):
                moves.append((g, k, float((torch.cat(deltas[m]) - base_kl[:n_measure]).mean())))
            progress(
                min(0.99, passes / max_passes), f"refine round {rounds}: measured {gi + 1}/{len(planned)}"
            )
        # 2. candidate moves: singles that fit alone, and pairs on two variables, by predicted ΔKL
        cands: list[tuple[float, tuple[tuple[int, int], ...]]] = []
        for g, k, d in moves:
            if d < 0:
                c = vc.copy()
                c[g] = k
                if problem.feasible(problem.expand(c)):
                    cands.append((d, ((g, k),)))
        improving = [mv for mv in moves if mv[2] < 0]
        for g, k, d in improving:
            for h, l, e in moves:
                if h == g or d + e >= 0:
                    continue
                c = vc.copy()
                c[g], c[h] = k, l
                if not _fits_sums(problem, c, sum_metrics):
                    continue
                if problem.feasible(problem.expand(c)):
                    cands.append((d + e, ((g, k), (h, l))))
        cands.sort(key=lambda t: t[0])
        # 3. verify the best few for real
        kept = False
        touched: set[int] = set()
        tried = 0
        for predicted, mv in cands:
            if tried >= cfg.verify_per_round:
                break
            if any(g in touched for g, _ in mv):
                continue
            cost_verify = 1.0 + (len(guard) / n_tune if guard is not None else 0.0)
            if passes + cost_verify > max_passes:
                stopped = f"measurement budget reached ({passes:.1f} of {max_passes:g} passes)"
                break
            tried += 1
            verified += 1
            c = var_choice(choice)
            for g, k in mv:
                c[g] = k
            new_choice = problem.expand(c)
            if not problem.feasible(new_choice):  # fits alone, but not with a move kept earlier this round
                continue
            new_base, new_kl = full(new_choice)
            if not new_kl < kl:
                continue
            new_guard = guard_value(new_choice)
            if g_cur is not None and new_guard is not None and _guard_worse(guard_metric, new_guard, g_cur):
                continue
            steps.append(
                {
                    "round": rounds,
                    "moves": [
                        {
                            "layers": [problem.layer_names[i] for i in problem.groups[g]],
                            "from": problem.options[int(vc[g])].label(),
                            "to": problem.options[k].label(),
                        }
                        for g, k in mv
                    ],
                    "predicted_dkl": predicted,
                    "kl": new_kl,
                    "guard": new_guard,
                }
            )
            choice, base_kl, kl, g_cur = new_choice, new_base, new_kl, new_guard
            touched.update(g for g, _ in mv)
            kept = True
        if not kept:
            if not stopped.startswith("measurement budget"):
                stopped = "no measured move improves the KL without lowering the guard metric"
            break
    else:
        stopped = f"stopped after {cfg.max_rounds} rounds"
    assert problem.feasible(choice)
    cost = {
        "passes": round(passes, 3),
        "max_passes": max_passes,
        "budget_rule": (
            "set" if cfg.max_passes is not None else f"{cfg.passes_per_variable:g} x {problem.n_vars} variables"
        ),
        "tune_samples": n_tune,
        "measure_samples": n_measure,
        "guard_samples": len(guard) if guard is not None else 0,
        "rounds": rounds,
        "moves_measured": measured_moves,
        "moves_verified": verified,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }
    measuring.release(tune)  # the tuning data's FP32 logits; the guard's serve the selection measurement next
    progress(1.0, f"refined: {len(steps)} move(s) kept, KL {kl_start:.4g} -> {kl:.4g}")
    allocation = problem.to_allocation(choice, refined=True)
    return RefineResult(
        allocation, choice, start_choice, steps, kl_start, kl, guard_metric, guard_start, g_cur, cost, stopped
    )


def _fits_sums(problem: AllocationProblem, var_choice: np.ndarray, metrics: list[str]) -> bool:
    """Quick check of the additive budgets before the full feasibility check."""
    rows = np.arange(problem.n_vars)
    for m in metrics:
        b = problem.budget(m)
        if b is not None and not b.holds(float(problem.costs[m][rows, var_choice].sum())):
            return False
    return True


def refined_point(problem: AllocationProblem, result: RefineResult, budget: float | None = None) -> Any:
    """A front point (kind "mixed", label "refined") for a refinement's result."""
    from .pareto import ParetoPoint

    predicted, metrics = problem.evaluate(result.choice)
    return ParetoPoint(
        allocation=result.allocation,
        predicted=predicted,
        metrics=metrics,
        kind="mixed",
        budget=budget,
        label="refined",
        refinement=result.summary(),
    )


__all__ = ["RefineConfig", "RefineResult", "refine", "refined_point"]
