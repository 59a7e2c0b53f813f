"""Paired, statistical selection: a mixed allocation replaces uniform precision only on significant evidence.

Measuring ~20 candidates on one slice of data and taking the arg-max is biased (the winner's curse): the
maximum of many noisy figures overstates the winner, and the "never below uniform" promise then holds only
on that slice. So:

- Data have three disjoint roles: calibration/sensitivity, **selection** (the recommendation is chosen on
  it) and **report** (it is only measured on). `split_roles` splits one data set into selection and report
  parts and says when it is too small to do so honestly.
- Every candidate and every uniform baseline is measured on the same selection items, keeping per-item
  values (`zoo.evaluate.EvalResult.per_sample`: correctness, cross-entropy, agreement with FP32, KL to FP32).
- `select` picks, among the candidates that meet the budgets, the best uniform allocation by the *ranking
  metric* (top-1 with labels, top-1 agreement with FP32 without) and one mixed contender by the smooth
  *surrogate* (mean KL to FP32: far lower variance, so choosing by it costs little selection bias). The
  contender replaces the uniform baseline only when its paired advantage on the ranking metric is
  significant at `confidence` (default 95 %): an exact McNemar test (binomial test on the discordant items)
  for 0/1 metrics, the paired bootstrap otherwise. The test is one-sided by default (`alternative=
  "greater"`: the only question asked is whether the mixed allocation is *better*; under the null of no
  advantage it still picks mixed at most 5 % of the time); `alternative="two-sided"` is stricter. Intervals
  shown are two-sided at `confidence`, with the one-sided bound beside them. One test per budget, so no
  multiple-comparison correction is needed. The evidence (Δ against the baseline with its
  interval and n, on selection and on report data, and the reason) travels with the recommendation.
- How often the surrogate and the metric disagree is counted (pairs of candidates ordered differently).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quant.errors import BitsearchError

from .budgets import Budget

#: Default confidence level of every interval and test here.
DEFAULT_CONFIDENCE = 0.95
#: Fewest items a role may have before a split is called too small to be honest.
MIN_ROLE_ITEMS = 100
#: Bootstrap resamples for intervals of differences of continuous per-item values.
BOOTSTRAP_RESAMPLES = 2000

#: Ranking metrics (larger is better) -> the per-item key behind them (0/1 values, reported in percent).
RANKING_KEYS = {"top1": "correct", "agreement": "agree", "loss": "ce"}
#: Ranking metrics where smaller is better ("loss": a language model's per-sequence NLL, i.e. log-perplexity).
SMALLER_IS_BETTER = {"loss"}
#: Surrogates (smaller is better) -> per-item key.
SURROGATE_KEYS = {"kl": "kl", "loss": "ce"}
#: Every per-item key and the figure it averages to, with the scale of that figure.
SCALES = {"correct": 100.0, "agree": 100.0, "kl": 1.0, "ce": 1.0}
FIGURE_OF = {"correct": "top1", "agree": "agreement", "kl": "kl", "ce": "loss"}


# --- splitting -----------------------------------------------------------------------------------------------


@dataclass
class RoleSplit:
    """Indices of a data set's selection and report parts (disjoint, sorted), and whether the split is honest."""

    selection: np.ndarray
    report: np.ndarray
    n_total: int
    honest: bool
    note: str | None = None

    def sizes(self) -> dict[str, Any]:
        return {
            "selection": len(self.selection),
            "report": len(self.report),
            "total": self.n_total,
            "honest": self.honest,
            "note": self.note,
        }


def split_roles(
    n: int,
    selection: float = 0.5,
    seed: int = 0,
    min_items: int = MIN_ROLE_ITEMS,
) -> RoleSplit:
    """Split `n` items at random into disjoint selection and report parts.

    `selection`: a fraction (float in (0, 1)) or a count of items for selection; report gets the rest.
    Below `min_items` in either part the split is not honest: every item goes to selection, report is
    empty, and `note` says that figures measured on the selection items overstate the recommendation.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise BitsearchError(f"the number of items must be a non-negative integer, got {n!r}")
    if isinstance(selection, bool):
        raise BitsearchError("selection must be a fraction in (0, 1) or a count of items")
    if isinstance(selection, float) and 0.0 < selection < 1.0:
        k = int(round(selection * n))
    elif isinstance(selection, (int, np.integer)) and selection >= 1:
        k = int(selection)
    else:
        raise BitsearchError(
            f"selection must be a fraction in (0, 1) or a count of at least 1 item, got {selection!r}"
        )
    order = np.random.default_rng(seed).permutation(n)
    if n < 2 * min_items or k < min_items or n - k < min_items:
        note = (
            f"only {n} evaluation items: too few to choose on one part and report on another (each needs at "
            f"least {min_items}); the recommendation was chosen on all of them and its figures are not an "
            "out-of-sample accuracy (give more data, or separate selection and report data)"
        )
        return RoleSplit(np.sort(order), np.zeros(0, dtype=np.int64), int(n), False, note)
    k = min(k, n)
    return RoleSplit(np.sort(order[:k]), np.sort(order[k:]), int(n), True)


def check_disjoint(**parts: Iterable[int]) -> None:
    """Raise when two named index sets share an item."""
    seen: dict[int, str] = {}
    for name, idx in parts.items():
        for i in np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx).tolist():
            other = seen.setdefault(int(i), name)
            if other != name:
                raise BitsearchError(f"item {i} is in both the {other} and the {name} data")


# --- statistics ----------------------------------------------------------------------------------------------


def _is_binary(v: np.ndarray) -> bool:
    return bool(np.all((v == 0) | (v == 1)))


def mean_interval(
    values: Sequence[float] | np.ndarray, confidence: float = DEFAULT_CONFIDENCE, scale: float = 1.0
) -> tuple[float, float]:
    """Interval for the mean of per-item values: Wilson's for 0/1 values, the normal one otherwise."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise BitsearchError("no items to compute an interval on")
    z = _z(confidence)
    m = float(v.mean())
    if _is_binary(v):
        denom = 1 + z * z / n
        centre = (m + z * z / (2 * n)) / denom
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / denom
        return (centre - half) * scale, (centre + half) * scale
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return (m - z * se) * scale, (m + z * se) * scale


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise BitsearchError(f"the confidence level must be in [0.5, 1), got {confidence}")
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


@dataclass
class PairedTest:
    """Δ = mean(a − b) over the same `n` items, its interval, and whether a beats b significantly."""

    metric: str
    n: int
    delta: float
    low: float
    high: float
    p_value: float | None
    significant: bool  # a is better than b at `confidence` (direction from `larger_is_better`)
    confidence: float
    method: str
    larger_is_better: bool = True
    alternative: str = "greater"  # "greater": one-sided (a better than b); "two-sided"
    bound: float | None = None  # one-sided bound at `confidence` (lower when larger is better)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "n": self.n,
            "delta": self.delta,
            "ci": [self.low, self.high],
            "one_sided_bound": self.bound,
            "p_value": self.p_value,
            "alternative": self.alternative,
            "significant": self.significant,
            "confidence": self.confidence,
            "method": self.method,
        }

    def describe(self) -> str:
        half = (self.high - self.low) / 2
        unit = " points" if self.metric in ("top1", "agreement") else ""
        p = (
            ""
            if self.p_value is None
            else f", {'one' if self.alternative == 'greater' else 'two'}-sided p={self.p_value:.2g}"
        )
        return f"{self.delta:+.2f} ± {half:.2f}{unit} ({self.confidence:.0%} interval, n={self.n}{p})"


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    metric: str = "top1",
    confidence: float = DEFAULT_CONFIDENCE,
    larger_is_better: bool = True,
    scale: float | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    alternative: str = "greater",
) -> PairedTest:
    """Paired comparison of two models' per-item values on the same items (a − b).

    0/1 values (correctness, agreement): exact McNemar test — a binomial test on the items where exactly
    one of the two is right — decides significance; the interval is the paired bootstrap's percentile
    interval. Continuous values (KL, cross-entropy): significant when the paired bootstrap bound excludes
    zero in the better direction. `alternative`: "greater" (one-sided: is a *better* than b, in the
    direction `larger_is_better` gives) or "two-sided". `scale` multiplies Δ and the interval (default: 100 for
    0/1 values, so they read in points of percent).
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise BitsearchError(f"paired values need the same items: shapes {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        raise BitsearchError(f"a paired test needs at least 2 items, got {n}")
    alpha = 1.0 - confidence
    _z(confidence)  # validates
    if alternative not in ("greater", "two-sided"):
        raise BitsearchError(f"alternative must be 'greater' or 'two-sided', got {alternative!r}")
    one_sided = alternative == "greater"
    d = x - y
    binary = _is_binary(x) and _is_binary(y)
    scale = (100.0 if binary else 1.0) if scale is None else scale
    rng = np.random.default_rng(seed)
    if binary:
        # d takes -1, 0, +1: resample the counts, which is the same bootstrap at a fraction of the cost.
        counts = np.array([(d < 0).sum(), (d == 0).sum(), (d > 0).sum()], dtype=np.int64)
        draws = rng.multinomial(n, counts / n, size=resamples)
        means = (draws[:, 2] - draws[:, 0]) / n
        wins, losses = int(counts[2]), int(counts[0])
        if not larger_is_better:
            wins, losses = losses, wins
        if wins + losses == 0:
            p = 1.0
        else:
            from scipy.stats import binomtest

            p = float(
                binomtest(
                    wins, wins + losses, 0.5, alternative="greater" if one_sided else "two-sided"
                ).pvalue
            )
        delta = float(d.mean())
        better = delta > 0 if larger_is_better else delta < 0
        significant = better and p < alpha
        method = (
            f"exact McNemar ({'one' if one_sided else 'two'}-sided binomial test on the discordant items); "
            "paired bootstrap interval"
        )
    else:
        means = np.empty(resamples)
        chunk = max(1, 2_000_000 // n)
        for s in range(0, resamples, chunk):
            k = min(chunk, resamples - s)
            idx = rng.integers(0, n, size=(k, n))
            means[s : s + k] = d[idx].mean(axis=1)
        delta = float(d.mean())
        p = None
        a_ = alpha if one_sided else alpha / 2
        lo_, hi_ = np.quantile(means, [a_, 1 - a_])
        significant = bool(lo_ > 0) if larger_is_better else bool(hi_ < 0)
        method = f"paired bootstrap ({'one' if one_sided else 'two'}-sided)"
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    bound = float(np.quantile(means, alpha if larger_is_better else 1 - alpha)) * scale
    return PairedTest(
        metric,
        n,
        delta * scale,
        float(lo) * scale,
        float(hi) * scale,
        p,
        bool(significant),
        confidence,
        method,
        larger_is_better,
        alternative,
        bound,
    )


# --- selection -----------------------------------------------------------------------------------------------


def _samples(point: Any, role: str, key: str) -> np.ndarray | None:
    v = getattr(point, "samples", {}).get(role, {}).get(key)
    return None if v is None else np.asarray(v, dtype=np.float64)


def _mean(point: Any, role: str, key: str) -> float:
    v = _samples(point, role, key)
    if v is None:
        raise BitsearchError(
            f"a candidate has no per-item {key!r} values on the {role} data: measure the "
            f"front with measure_front(..., role={role!r}) first"
        )
    return float(v.mean())


def disagreement(points: Sequence[Any], role: str, ranking_key: str, surrogate_key: str) -> dict[str, Any]:
    """Pairs of candidates that the surrogate and the ranking metric order differently (ties not counted)."""
    sign = -1.0 if ranking_key == RANKING_KEYS["loss"] else 1.0  # larger is better for top-1/agreement
    rank = [sign * _mean(p, role, ranking_key) for p in points]
    sur = [_mean(p, role, surrogate_key) for p in points]
    pairs = disagree = 0
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            dm, ds = rank[i] - rank[j], sur[j] - sur[i]  # both > 0 when i is better
            if dm == 0 or ds == 0:
                continue
            pairs += 1
            disagree += (dm > 0) != (ds > 0)
    return {"pairs": pairs, "disagree": disagree, "fraction": disagree / pairs if pairs else None}


@dataclass
class Evidence:
    """Why a point was recommended at a budget, with the paired comparisons behind it."""

    budgets: list[dict[str, Any]]
    recommended: str  # "mixed" or "uniform"
    reason: str
    ranking: str  # "top1" or "agreement"
    surrogate: str  # "kl" or "loss"
    confidence: float
    baseline: str | None  # the uniform baseline's label
    contender: dict[str, Any] | None  # the mixed contender (label, metrics) or None
    selection: PairedTest | None  # contender − baseline on the ranking metric, selection data
    report: PairedTest | None  # the same on report data (None without report data)
    surrogate_selection: (
        PairedTest | None
    )  # contender − baseline on the surrogate (negative: contender better)
    recommended_report: dict[str, Any] | None  # the recommendation's own figures on report data, with CIs
    disagreement: dict[str, Any] = field(default_factory=dict)
    n_candidates: int = 0
    baseline_point: Any = field(default=None, repr=False, compare=False)  # the points themselves
    contender_point: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budgets": self.budgets,
            "recommended": self.recommended,
            "reason": self.reason,
            "ranking": self.ranking,
            "surrogate": self.surrogate,
            "confidence": self.confidence,
            "baseline": self.baseline,
            "contender": self.contender,
            "selection": self.selection.to_dict() if self.selection else None,
            "report": self.report.to_dict() if self.report else None,
            "surrogate_selection": self.surrogate_selection.to_dict() if self.surrogate_selection else None,
            "recommended_report": self.recommended_report,
            "disagreement": self.disagreement,
            "n_candidates": self.n_candidates,
        }


def _label(p: Any) -> str:
    if getattr(p, "label", None):
        return str(p.label)
    budget = getattr(p, "budget", None)
    return f"{p.kind} @ {budget:.4g}" if budget is not None else str(p.kind)


def select(
    front: Any,
    budget: Budget | str | Iterable[Budget | str] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    ranking: str | None = None,
    surrogate: str = "kl",
    role: str = "selection",
    report_role: str = "report",
    seed: int = 0,
    alternative: str = "greater",
) -> tuple[Any, Evidence]:
    """The recommended point at `budget` (plus the front's own budgets) and its evidence.

    Needs per-item values on the selection data (`measure_front(..., role="selection")`, the default) and,
    for report evidence, on the report data (`role="report"`). `ranking`: "top1" (default when labels were
    given) or "agreement"; `surrogate`: "kl" (default) or "loss" — it picks the mixed contender.
    """
    from .pareto import fitting_candidates

    budgets, cands = fitting_candidates(front, budget)
    every = budgets + [b for b in front.budgets if b.metric not in {x.metric for x in budgets}]
    if ranking is None:
        if all(_samples(p, role, "correct") is not None for p in cands):
            ranking = "top1"
        elif all(_samples(p, role, "ce") is not None for p in cands) and not any(
            _samples(p, role, "correct") is not None for p in cands
        ):
            ranking = "loss"  # token data: next-token NLL per sequence (perplexity), not top-1
        else:
            ranking = "agreement"
    if ranking not in RANKING_KEYS:
        raise BitsearchError(f"unknown ranking metric {ranking!r}; known: {list(RANKING_KEYS)}")
    if surrogate not in SURROGATE_KEYS:
        raise BitsearchError(f"unknown surrogate {surrogate!r}; known: {list(SURROGATE_KEYS)}")
    rk, sk = RANKING_KEYS[ranking], SURROGATE_KEYS[surrogate]
    for p in cands:
        for k in (rk, sk):
            _mean(p, role, k)  # raises a clear error when missing
    uniform = [p for p in cands if p.kind == "uniform"]
    mixed = [p for p in cands if p.kind != "uniform"]
    cost_keys = [b.metric for b in budgets] or [front.metric]

    def cost(p: Any) -> tuple:
        return tuple(p.metrics.get(k, np.inf) for k in cost_keys)

    larger = ranking not in SMALLER_IS_BETTER
    sign = 1.0 if larger else -1.0
    baseline = (
        max(uniform, key=lambda p: (sign * _mean(p, role, rk), -_mean(p, role, sk), tuple(-c for c in cost(p))))
        if uniform
        else None
    )
    contender = (
        min(mixed, key=lambda p: (_mean(p, role, sk), -sign * _mean(p, role, rk), cost(p))) if mixed else None
    )

    def test(a: Any, b: Any, r: str, key: str, larger: bool, name: str) -> PairedTest | None:
        va, vb = _samples(a, r, key), _samples(b, r, key)
        if va is None or vb is None:
            return None
        return paired_test(
            va, vb, name, confidence, larger_is_better=larger, seed=seed, alternative=alternative
        )

    sel = rep = sur = None
    if baseline is not None and contender is not None:
        sel = test(contender, baseline, role, rk, larger, ranking)
        rep = test(contender, baseline, report_role, rk, larger, ranking)
        sur = test(contender, baseline, role, sk, False, surrogate)
        if sel.significant:
            chosen, kind = contender, "mixed"
            reason = (
                f"the mixed allocation beats uniform {_label(baseline)} on {ranking} by {sel.describe()} "
                f"on the selection data, significant at {confidence:.0%}"
            )
        else:
            chosen, kind = baseline, "uniform"
            reason = (
                f"the best mixed allocation (by {surrogate}) differs from uniform {_label(baseline)} by "
                f"{sel.describe()} on {ranking} on the selection data: not significant at "
                f"{confidence:.0%}, so uniform is kept"
            )
    elif baseline is not None:
        chosen, kind = baseline, "uniform"
        reason = f"no mixed allocation meets the budget; uniform {_label(baseline)} is the best that does"
    else:
        assert contender is not None
        chosen, kind = contender, "mixed"
        reason = (
            "no uniform allocation meets the budget: the mixed allocation with the lowest "
            f"{surrogate} is recommended without a uniform baseline"
        )
    rec_report = None
    if _samples(chosen, report_role, rk) is not None:
        rec_report = {"n": len(_samples(chosen, report_role, rk))}
        for key in (rk, sk):
            v = _samples(chosen, report_role, key)
            if v is not None:
                lo, hi = mean_interval(v, confidence, SCALES[key])
                rec_report[FIGURE_OF[key]] = {"value": float(v.mean()) * SCALES[key], "ci": [lo, hi]}
    ev = Evidence(
        budgets=[b.to_dict() for b in every],
        recommended=kind,
        reason=reason,
        ranking=ranking,
        surrogate=surrogate,
        confidence=confidence,
        baseline=_label(baseline) if baseline is not None else None,
        contender=None
        if contender is None
        else {"label": _label(contender), "budget": contender.budget, "metrics": contender.metrics},
        selection=sel,
        report=rep,
        surrogate_selection=sur,
        recommended_report=rec_report,
        disagreement=disagreement(cands, role, rk, sk),
        n_candidates=len(cands),
        baseline_point=baseline,
        contender_point=contender,
    )
    return chosen, ev


def point_intervals(
    samples: Mapping[str, Any], confidence: float = DEFAULT_CONFIDENCE
) -> dict[str, list[float]]:
    """Interval of each figure (top1, agreement, kl, loss) from one point's per-item values on one role."""
    out = {}
    for key, values in samples.items():
        if key in SCALES:
            lo, hi = mean_interval(np.asarray(values, dtype=np.float64), confidence, SCALES[key])
            out[FIGURE_OF[key]] = [lo, hi]
    return out


__all__ = [
    "DEFAULT_CONFIDENCE",
    "MIN_ROLE_ITEMS",
    "Evidence",
    "PairedTest",
    "REPORT_POINTS",
    "RoleSplit",
    "SelectedPoint",
    "check_disjoint",
    "check_report_points",
    "disagreement",
    "evidence_points",
    "mean_interval",
    "paired_test",
    "point_intervals",
    "recommend_with_evidence",
    "select",
    "split_roles",
]


# --- the whole measured stage of a search ----------------------------------------------------------------


#: Which points `recommend_with_evidence` measures on the report data: "evidence" (default) — the points a
#: user is shown with evidence (each relevant recommendation's chosen point, uniform baseline and mixed
#: contender); "all" — every candidate.
REPORT_POINTS = ("evidence", "all")


def check_report_points(report_points: str) -> str:
    """`report_points` itself, or a `BitsearchError` naming the values allowed."""
    if report_points not in REPORT_POINTS:
        raise BitsearchError(
            f"report_points must be one of {list(REPORT_POINTS)} ('evidence': only the points shown with "
            f"evidence are measured on the report data; 'all': every point), got {report_points!r}"
        )
    return report_points


def evidence_points(recommendations: Sequence[SelectedPoint]) -> list[Any]:
    """The points a user is shown with evidence, once each: the requested recommendation's chosen point,
    uniform baseline and mixed contender; without a requested one, those of every swept recommendation."""
    shown = [r for r in recommendations if r.requested] or list(recommendations)
    out: dict[int, Any] = {}
    for r in shown:
        for p in (r.point, r.evidence.baseline_point, r.evidence.contender_point):
            if p is not None:
                out.setdefault(id(p), p)
    return list(out.values())


def recommend_with_evidence(
    front: Any,
    problem: Any,
    requested: Sequence[Budget],
    model: Any,
    calibration: Any,
    selection_data: Any,
    report_data: Any = None,
    quant_config: Any = None,
    refine_settings: Any = None,
    confidence: float = DEFAULT_CONFIDENCE,
    solver: str = "ilp",
    progress: Any = None,
    report_points: str = "evidence",
) -> tuple[Any, list[SelectedPoint], dict[str, Any]]:
    """Refine at the requested budgets, measure the candidates, and select with evidence.

    1. At the `requested` budgets (all together, plus `problem`'s own budgets) the solver's allocation (the
       front's best predicted point that meets them; else `solver` is run, label "solver") is refined unless
       `refine_settings.enabled` is false (label "refined"; KL measured on `calibration`, which needs no
       labels, guarded on `selection_data`).
    2. Every candidate is measured on `selection_data` (role "selection").
    3. One recommendation per swept budget of the front and one for the requested budgets: `select`.
    4. With `report_data`, the points shown with evidence (`evidence_points`: the requested recommendation's
       chosen point, baseline and contender, or those of every swept one without requested budgets) are
       measured on it (role "report"), or every candidate with `report_points="all"`, and `select` runs again
       so that the evidence carries the report tests. The choice never depends on the report data, so the
       recommendations are the same either way; a point not measured there has empty `report` figures, and
       the front's notes say how many were.

    The model is wrapped and calibrated once for the refinement and both roles (`pareto.MeasuringModel`).
    Returns (measured front, recommendations (`SelectedPoint`), costs by stage).
    """
    import time

    from zoo.data import as_dataset

    from .pareto import MeasuringModel, measure_points
    from .refine import RefineConfig, refine, refined_point
    from .solvers import solve

    check_report_points(report_points)
    progress = progress or (lambda f, m: None)
    settings = (
        refine_settings
        if isinstance(refine_settings, RefineConfig)
        else RefineConfig.from_dict(refine_settings)
    )
    selection_data = as_dataset(selection_data, "selection_data")
    report_data = None if report_data is None else as_dataset(report_data, "report_data")
    measuring = MeasuringModel(model, calibration, quant_config)
    costs: dict[str, Any] = {}
    extra = []
    if requested:
        at = problem.with_budgets(
            list(problem.budgets)
            + [b for b in requested if b.metric not in {x.metric for x in problem.budgets}]
        )
        limit = next((b.limit for b in requested if b.metric == front.metric), None)
        # The solver's own answer at the budget: the front's best predicted point that meets it (the sweep
        # solves at the requested budget too), else a fresh solve.
        fitting = [p for p in front.points if not at.violations(at.choice_of(p.allocation))]
        if fitting:
            start = min(fitting, key=lambda p: p.predicted)
        else:
            t = time.perf_counter()
            sol = solve(at, solver)
            costs["solve_at_budget"] = {"seconds": time.perf_counter() - t}
            from .pareto import ParetoPoint

            start = ParetoPoint(
                sol.allocation,
                sol.objective,
                sol.metrics,
                kind="mixed",
                budget=limit,
                optimal=sol.optimal,
                label="solver",
            )
            extra.append(start)
        # Token data too: refine then measures per-token KL and guards on per-sequence NLL (search.refine).
        if settings.enabled and calibration is not None:
            r = refine(
                at,
                start.allocation,
                model,
                calibration,
                calibration,
                selection_data,
                quant_config,
                settings,
                progress=lambda f, m: progress(0.4 * f, m),
                measuring=measuring,
            )
            costs["refine"] = {**r.cost, "steps": len(r.steps), "stopped": r.stopped}
            if r.steps:
                extra.append(refined_point(at, r, limit))
    out = copy_front_with(front, extra)
    candidates = out.candidates()

    def measure(role: str, data: Any, points: list[Any], at: float) -> Any:
        t0, c0, runs = time.perf_counter(), time.process_time(), measuring.passes
        ref = measure_points(
            points, measuring, data, role, confidence, progress=lambda f, m: progress(at + 0.3 * f, m)
        )
        costs[f"measure_{role}"] = {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "points": len(points),
            # allocations met before (a front's twins, the refinement's guarded start) are not run again
            "passes": measuring.passes - runs,
            "samples": len(data),
        }
        measuring.release(data)
        return ref

    out.reference = measure("selection", selection_data, candidates, 0.4).to_dict()

    def recommendations() -> list[SelectedPoint]:
        recs: list[SelectedPoint] = []
        sweep = sorted({p.budget for p in out.points if p.budget is not None and p.label is None})
        for limit in sweep:
            b = [Budget(out.metric, limit)]
            point, ev = select(out, b, confidence)
            recs.append(SelectedPoint(b, False, point, ev))
        if requested:
            point, ev = select(out, list(requested), confidence)
            recs.append(SelectedPoint(list(requested), True, point, ev))
        return recs

    recs = recommendations()
    if report_data is not None:
        shown = candidates if report_points == "all" else evidence_points(recs)
        shown = [p for p in candidates if any(p is q for q in shown)]  # in the front's order
        out.report_reference = measure("report", report_data, shown, 0.7).to_dict()
        costs["measure_report"]["report_points"] = report_points
        if len(shown) < len(candidates):
            which = (
                "the recommended point, its uniform baseline and its mixed contender"
                if requested
                else "each swept budget's recommended point, uniform baseline and mixed contender"
            )
            out.notes.append(
                f"report figures: evidence points only ({len(shown)} of {len(candidates)}: {which}); the others "
                "have selection figures only (report_points='all' measures every point on the report data)"
            )
        recs = recommendations()  # the same choices (they never look at report data), now with report tests
    return out, recs, costs


@dataclass
class SelectedPoint:
    """One recommendation of `recommend_with_evidence`: the budgets it meets, whether they are the requested
    ones (else one swept budget of the front), the point and its evidence."""

    budgets: list[Budget]
    requested: bool
    point: Any
    evidence: Evidence

    def to_dict(self) -> dict[str, Any]:
        if self.requested:
            head: dict[str, Any] = {"budget": "requested", "budgets": [b.to_dict() for b in self.budgets]}
        else:
            head = {"budget": self.budgets[0].to_dict()}
        return {**head, "point": self.point.to_dict(), "evidence": self.evidence.to_dict()}


def copy_front_with(front: Any, extra: Sequence[Any]) -> Any:
    """A copy of `front` with `extra` mixed points added (repeats of an existing allocation dropped)."""
    import copy

    out = copy.deepcopy(front)

    def key(p: Any) -> tuple:
        return tuple(sorted((n, b.label()) for n, b in p.allocation.layers.items()))

    seen = {key(p) for p in out.candidates()}
    for p in extra:
        if key(p) not in seen:
            seen.add(key(p))
            out.points.append(p)
    out.points.sort(key=lambda p: (p.metrics[out.metric], p.predicted))
    return out
