"""`bayes`: multi-objective Bayesian search over *measured* allocations (BOMP-NAS style, with Optuna).

The table-driven solvers trust an additive sensitivity proxy. This one measures: every trial is an allocation
that a `scorer` evaluates (post-training quantization on held-out data by default, or a short QAT run through
any callable the user supplies), and an Optuna study optimises two objectives at once,

    (task score: top-1 / agreement ↑, or KL / loss ↓,   cost: the front's metric ↓)

with one categorical parameter per decision variable (a layer, or a tie group of layers) whose choices are the
labels of the options the constraints allow (pins give one-choice parameters). Every budget of the problem is
an Optuna constraint (`Trial.set_constraint(metric, value / limit - 1)`, feasible when <= 0; Optuna 5
deprecates the sampler's `constraints_func` in favour of this). An over-budget trial is costed but *not*
measured (its cost is known without a forward pass): it is recorded with the worst score and a positive
constraint, which both TPE and NSGA-II rank below every feasible trial.

    scorer = ptq_scorer(model, calibration, held_out, QuantConfig(weight_clip="auto"))   # top1, maximised
    sol = solve(problem, "bayes", scorer=scorer, n_trials=60, storage="sqlite:///bayes.db",
                study_name="resnet20-w3")
    front = pareto_front(problem, "avg_weight_bits", 20, "bayes", scorer=scorer, n_trials=100)

Warm start. Before sampling, the study gets (`enqueue_trial(..., skip_if_exists=True)`) the table's ILP
solution at the problem's budgets (for a sweep: at up to `warm_start_points` of the swept budgets) and every
uniform allocation that meets the budgets, so the search starts from the proxy's answer and the baselines.

Storage and several workers. `storage` is an SQLAlchemy URL (`sqlite:///path.db`, the app's
`postgresql://...`), an Optuna storage object, or None (in memory, this call only). Workers that pass the same
storage and `study_name` run trials of one study at once (`load_if_exists=True`); give each a different
`worker` id, or their seeded samplers propose the same points. Without a `study_name`, the name is derived from
the problem (layers, options, constraints, budgets, objectives), so workers of one problem meet in one study;
a study created for another problem is refused. On PostgreSQL, Optuna's tables go into their own schema
(`optuna_schema`, default "optuna"), because Optuna and the app would otherwise share the `alembic_version`
table; an SQLite file or database that already holds another application's migrations is refused.
`n_trials` is per call (Optuna's meaning); `total_trials` stops every worker once the study holds that many
finished trials; `timeout` is per call, in seconds. Repeated allocations are measured once: a worker reuses
its own earlier score, or any measured trial of the study with the same parameters. Trials run by ask-and-tell
with a claim per trial: SQLite has no row locks, so two workers can pop the same enqueued trial; the one
whose claim was overwritten drops it and asks again (on PostgreSQL Optuna's SELECT ... FOR UPDATE prevents
the race).

Trials over worker processes. With `fanout=BayesFanout(storage, scorer_ref, workers=...)` the study is a
fan-out study of `search.trials` (objective kind "bayes"): it stores a JSON snapshot of the problem (per-layer
costs of every option, variables, budgets: `ProblemSnapshot`) and a scorer reference (`scorers.build_scorer`),
so any worker process rebuilds the objective; this call queues `workers - 1` trial runners elsewhere
(`submit_trial_jobs`, e.g. the service's "study-trials" jobs) and runs trials itself until the study holds
`total_trials` (default `n_trials`) done trials, all runners together. Heartbeats, the re-run of a trial lost
with a killed worker (once, never counted twice), `trial_timeout` and cancellation (`stop`, or the study
marked stopped) are `search.trials`'. Fan-out sampling is TPE (multivariate, constant liar, seeded per worker).

Results. `solve` returns the best measured feasible trial (ties: the cheaper, then the earlier). `sweep`
runs one study for the whole sweep (the swept metric is the cost objective) and returns, per budget, the best
measured trial within it; those are the study's Pareto-optimal trials that are best at some swept budget
(`pareto_solutions` gives all of them). A solution's `objective` is the *measured* score in "lower is
better" form (−top1, or KL), not the table's prediction, so that `pareto_front` keeps the measured front;
the table's prediction stays in `allocation.metadata["predicted_loss"]` and the trial in
`allocation.metadata["bayes"]`. `measure_front` measures the candidates again on its own data: the study
selects on the scorer's split, the front is judged on yours.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quant.errors import BitsearchError

from ..problem import FEAS_RTOL, AllocationProblem, Budget, canonical_metric
from ..study_storage import make_storage  # noqa: F401  (re-exported)
from ..trials import Fanout, TrialContext, create_study, load_fanout_study, register_objective, run_trials
from .base import Capabilities, RawResult, Solution, Solver, register_solver
from .scorers import (  # noqa: F401
    SCORE_DIRECTIONS,
    PTQScorer,
    QATScorer,
    Scorer,
    build_scorer,
    lend_scorer,
    ptq_scorer,
    qat_scorer,
)

SAMPLERS = ("tpe", "nsgaii", "random")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
_ATTR_PROBLEM = "bitsearch.problem"
_ATTR_SCORER = "bitsearch.scorer"
OBJECTIVE_KIND = "bayes"  # the fan-out trial objective (search.trials)


# --- the solver -------------------------------------------------------------------------------------------


@dataclass
class _Space:
    """The study's search space for one problem: per variable, a parameter name and its option labels."""

    names: list[str]
    labels: list[list[str]]
    index: list[dict[str, int]]  # label -> option index, per variable

    @classmethod
    def of(cls, problem: AllocationProblem) -> _Space:
        all_labels = [o.label() + (f":{o.weight_quantizer}" if o.weight_quantizer else "") for o in problem.options]
        if len(set(all_labels)) != len(all_labels):
            all_labels = [f"{i}:{lab}" for i, lab in enumerate(all_labels)]
        names, labels, index = [], [], []
        for g, members in enumerate(problem.groups):
            first = problem.layer_names[members[0]]
            names.append(f"{g:03d}:{first}" + (f"+{len(members) - 1}" if len(members) > 1 else ""))
            ks = np.flatnonzero(problem.structural_allowed[g])
            labels.append([all_labels[k] for k in ks])
            index.append({all_labels[k]: int(k) for k in ks})
        return cls(names, labels, index)

    def params(self, var_choice: Sequence[int]) -> dict[str, str]:
        out = {}
        for g, k in enumerate(var_choice):
            lab = next(lab for lab, kk in self.index[g].items() if kk == int(k))
            out[self.names[g]] = lab
        return out

    def choice(self, params: dict[str, Any]) -> np.ndarray | None:
        try:
            return np.array([self.index[g][params[n]] for g, n in enumerate(self.names)], dtype=np.int64)
        except KeyError:
            return None


@dataclass
class _Measured:
    number: int
    var_choice: np.ndarray
    score: float
    metrics: dict[str, float]
    worker: str


@dataclass
class BayesSettings:
    """The settings a search request gives bayes (`solver.settings`). The scorer is built from `scorer`:
    "ptq" (PTQ on the selection data, default) or "qaft" (`qaft_steps` of QAT at `qaft_lr` on the training
    data per trial); the study goes into the service's database. The rest are `BayesSolver` options."""

    scorer: str = "ptq"
    qaft_steps: int = 50
    qaft_lr: float = 0.01
    n_trials: int = 50
    timeout: float | None = None
    total_trials: int | None = None
    sampler: str = "tpe"
    seed: int = 0
    cost_metric: str | None = None
    warm_start: bool = True
    warm_start_points: int = 5
    n_startup_trials: int = 10
    population_size: int | None = None
    workers: int = 2  # trial runners in the service (the search's own job included; TPE only); in-process elsewhere
    trial_timeout: float | None = None  # seconds per trial when trials fan out (None: no limit)

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise BitsearchError(f"workers must be a positive integer, got {self.workers!r}")
        if self.trial_timeout is not None and (
            isinstance(self.trial_timeout, bool) or not isinstance(self.trial_timeout, (int, float))
            or not (math.isfinite(self.trial_timeout) and self.trial_timeout > 0)
        ):
            raise BitsearchError(f"trial_timeout must be a positive number of seconds, got {self.trial_timeout!r}")
        if self.scorer not in ("ptq", "qaft"):
            raise BitsearchError(f"scorer must be 'ptq' or 'qaft', got {self.scorer!r}")
        if isinstance(self.qaft_steps, bool) or not isinstance(self.qaft_steps, int) or self.qaft_steps < 1:
            raise BitsearchError(f"qaft_steps must be a positive integer, got {self.qaft_steps!r}")
        if isinstance(self.qaft_lr, bool) or not isinstance(self.qaft_lr, (int, float)) or not self.qaft_lr > 0:
            raise BitsearchError(f"qaft_lr must be a positive number, got {self.qaft_lr!r}")
        if self.sampler not in SAMPLERS:  # a sampler object is for Python callers only
            raise BitsearchError(f"unknown sampler {self.sampler!r}; known: {list(SAMPLERS)}")
        BayesSolver(**self.solver_options())  # the solver's own checks of the rest

    def solver_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("scorer", "qaft_steps", "qaft_lr", "workers", "trial_timeout")}


@dataclass
class BayesFanout:
    """How a bayes study fans its trials out over worker processes (see the module docstring)."""

    storage: str  # SQLAlchemy URL every runner reaches
    scorer: dict[str, Any]  # scorer reference {"builder", "config"}: how a runner rebuilds the scorer
    workers: int = 1  # trial runners in all, this process included
    trial_timeout: float | None = None
    heartbeat_interval: int = 10
    grace_period: int | None = None  # None: 2 x heartbeat_interval
    max_retry: int = 1
    submit_trial_jobs: Callable[[str, str, int], list[str]] | None = None  # (url, study, n) -> job ids
    stop: Callable[[], bool] | None = None  # true: this runner was told to stop (its job cancelled)
    on_cancel: Callable[[], None] | None = None  # called when the run ended cancelled (may raise)
    worker: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.storage, str):
            raise BitsearchError("a bayes fan-out needs a database URL its workers reach")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise BitsearchError(f"workers must be a positive integer, got {self.workers!r}")
        self.fanout_settings(1)  # its checks


    def fanout_settings(self, total_trials: int) -> Fanout:
        return Fanout(total_trials, self.trial_timeout, self.heartbeat_interval, self.grace_period, self.max_retry)


@dataclass
class ProblemSnapshot:
    """What a trial worker needs of an `AllocationProblem`, as JSON: the study's parameters (one per
    variable, its option labels), the layers of each variable, every option's per-layer cost, the budgets.
    A worker prices and builds an allocation from it without the sensitivity table or the model's layers."""

    layer_names: list[str]
    options: list[dict[str, Any]]  # LayerBits dicts (columns)
    groups: list[list[int]]  # layers of each variable
    names: list[str]  # parameter name of each variable
    labels: list[list[str]]
    index: list[dict[str, int]]  # label -> option column, per variable
    layer_costs: dict[str, list[list[float]]]  # metric -> (layers x options)
    sum_metrics: list[str]  # summed over layers (the others: max)
    budgets: list[dict[str, Any]]
    model: str | None = None

    @classmethod
    def of(cls, problem: AllocationProblem, model: str | None = None) -> "ProblemSnapshot":
        from quant.cost import SUM_METRICS

        space = _Space.of(problem)
        return cls(
            layer_names=list(problem.layer_names), options=[o.to_dict() for o in problem.options],
            groups=[[int(i) for i in g] for g in problem.groups], names=space.names, labels=space.labels,
            index=space.index,
            layer_costs={m: np.asarray(v, dtype=np.float64).tolist() for m, v in problem.layer_costs.items()},
            sum_metrics=[m for m in problem.layer_costs if m in SUM_METRICS],
            budgets=[b.to_dict() for b in problem.budgets], model=model,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProblemSnapshot":
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def layer_choice(self, params: dict[str, Any]) -> np.ndarray:
        choice = np.zeros(len(self.layer_names), dtype=np.int64)
        for g, (name, members) in enumerate(zip(self.names, self.groups)):
            choice[members] = self.index[g][params[name]]
        return choice

    def metrics(self, choice: np.ndarray) -> dict[str, float]:
        rows = np.arange(len(self.layer_names))
        out = {}
        for m, mat in self.layer_costs.items():
            vals = np.asarray(mat, dtype=np.float64)[rows, choice]
            out[m] = float(vals.sum() if m in self.sum_metrics else vals.max())
        return out

    def allocation(self, choice: np.ndarray, metrics: dict[str, float]) -> Any:
        from quant.allocation import Allocation, LayerBits

        opts = [LayerBits.from_dict(o) for o in self.options]
        return Allocation({n: opts[int(k)] for n, k in zip(self.layer_names, choice)}, model=self.model,
                          metadata={"metrics": metrics, "budgets": self.budgets})


@register_objective(OBJECTIVE_KIND)
def _fanout_objective(config: dict[str, Any]):
    """The trial objective of a fan-out bayes study, rebuilt in each worker from the study's JSON config."""
    from optuna.trial import TrialState

    snap = ProblemSnapshot.from_dict(config["problem"])
    scorer = build_scorer(config["scorer"])
    maximize = config["direction"] == "maximize"
    metric = config["cost_metric"]
    budgets = [Budget.from_dict(b) for b in snap.budgets]
    worst = -math.inf if maximize else math.inf
    cache: dict[bytes, float] = {}

    def objective(trial: Any, ctx: TrialContext) -> list[float]:
        params = {n: trial.suggest_categorical(n, labs) for n, labs in zip(snap.names, snap.labels)}
        choice = snap.layer_choice(params)
        metrics = snap.metrics(choice)
        already = set(trial.constraints) if budgets else set()  # a re-run of a lost trial keeps its own
        for b in budgets:
            if b.metric not in already:
                trial.set_constraint(b.metric, metrics[b.metric] / (b.limit * (1 + FEAS_RTOL)) - 1.0)
        trial.set_user_attr("metrics", metrics)
        if not all(b.holds(metrics[b.metric]) for b in budgets):
            trial.set_user_attr("measured", False)  # costed, not measured: over budget
            return [worst, metrics[metric]]
        key = choice.tobytes()
        if key not in cache:  # an allocation another trial of the study measured is not measured again
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if t.user_attrs.get("measured") and t.params == params:
                    cache[key] = float(t.values[0])
                    break
        if key not in cache:
            ctx.check()
            score = float(scorer(snap.allocation(choice, metrics)))
            if not math.isfinite(score):
                raise BitsearchError(f"the scorer returned {score}; it must return a finite number")
            cache[key] = score
            trial.set_user_attr("scored_here", True)
        trial.set_user_attr("measured", True)
        return [cache[key], metrics[metric]]

    return objective


@register_solver
class BayesSolver(Solver):
    """Multi-objective Bayesian search over measured allocations; see the module docstring.

    scorer        Callable[[Allocation], float], e.g. `ptq_scorer(...)`; its `direction` attribute (or the
                  `direction` argument: "maximize"/"minimize") says which way is better.
    n_trials      trials this call runs (Optuna's meaning; warm-start trials count).
    timeout       seconds this call may run (None: no limit).
    total_trials  stop once the study holds this many finished trials, all workers together (None: no limit).
    storage       None (in memory), an SQLAlchemy URL or an Optuna storage; study_name: see the docstring.
    sampler       "tpe" (multivariate, constant liar for parallel workers; default), "nsgaii", "random", or
                  an Optuna sampler instance. seed + worker seed it.
    cost_metric   the second objective for `solve` (default: the problem's first additive budget's metric,
                  else avg_weight_bits); a sweep uses the swept metric.
    warm_start    enqueue the table's ILP solution(s) and the uniform allocations within budget first.
    """

    name = "bayes"
    exact = False
    Config = BayesSettings  # what a search request may set (scorer and study come from the pipeline)
    # It scores allocations by measuring them on labelled selection data; a search request gets its scorer
    # (PTQ on the selection split, or a short QAFT: then it needs training data) from `search.measured`.
    capabilities = Capabilities(needs_labels=True)
    supports_objective = False  # it optimises a measured score, not the table's objective

    def __init__(
        self,
        scorer: Scorer | None = None,
        direction: str | None = None,
        n_trials: int = 50,
        timeout: float | None = None,
        total_trials: int | None = None,
        storage: Any = None,
        study_name: str | None = None,
        sampler: Any = "tpe",
        seed: int = 0,
        worker: int | str = 0,
        cost_metric: str | None = None,
        warm_start: bool = True,
        warm_start_points: int = 5,
        n_startup_trials: int = 10,
        population_size: int | None = None,
        optuna_schema: str = "optuna",
        progress: Callable[[float, str], None] | None = None,
        fanout: BayesFanout | None = None,
    ):
        if scorer is not None and not callable(scorer):
            raise BitsearchError(f"the bayes solver's scorer must be callable, got {type(scorer).__name__}")
        direction = direction or getattr(scorer, "direction", None) or "maximize"
        if direction not in ("maximize", "minimize"):
            raise BitsearchError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise BitsearchError(f"n_trials must be a positive integer, got {n_trials!r}")
        if total_trials is not None and (not isinstance(total_trials, int) or total_trials < 1):
            raise BitsearchError(f"total_trials must be a positive integer, got {total_trials!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise BitsearchError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(sampler, str) and sampler not in SAMPLERS:
            raise BitsearchError(f"unknown sampler {sampler!r}; known: {list(SAMPLERS)} or an Optuna sampler")
        self.scorer = scorer
        self.direction = direction
        self.n_trials = n_trials
        self.timeout = timeout
        self.total_trials = total_trials
        self.storage = storage
        self.study_name = study_name
        self.sampler = sampler
        self.seed = int(seed)
        self.worker = str(worker)
        self.cost_metric = None if cost_metric is None else canonical_metric(cost_metric)
        self.warm_start = bool(warm_start)
        self.warm_start_points = int(warm_start_points)
        self.n_startup_trials = int(n_startup_trials)
        self.population_size = population_size
        self.optuna_schema = optuna_schema
        self.progress = progress
        if fanout is not None and not isinstance(fanout, BayesFanout):
            raise BitsearchError("fanout must be a BayesFanout")
        if fanout is not None and self.sampler != "tpe":
            raise BitsearchError("trials fanned out over workers are sampled by TPE: use sampler 'tpe' (or workers=1)")
        self.fanout = fanout
        self.trial_jobs: list[str] = []  # trial runners queued by the last fan-out call
        self.study: Any = None  # the Optuna study of the last call
        self.measured_here = 0  # allocations this solver measured (cache misses)
        self._cache: dict[bytes, float] = {}
        self._scores: dict[bytes, _Measured] = {}  # per-layer choice -> its trial, for `_finish`
        self._storage_obj: Any = None
        self._study_metric = "avg_weight_bits"
        self.seconds = 0.0  # wall time of the last call's optimisation

    # --- public helpers -----------------------------------------------------------------------------------
    def _solve(self, problem: AllocationProblem) -> RawResult:
        metric = self.cost_metric or self._default_cost_metric(problem)
        study, space = self._run(problem, metric, warm_limits=None)
        best = self._best(problem, study, space, problem)
        if best is None:
            return RawResult(None, notes=self._notes(study))
        return RawResult(best.var_choice, notes=self._notes(study))

    def sweep(self, problem: AllocationProblem, metric: str, limits: Sequence[float]) -> list[Solution | None]:
        m = canonical_metric(metric)
        limits = [float(v) for v in limits]
        if not limits:
            return []
        study_problem = problem.with_budget(m, max(limits))
        t0 = time.perf_counter()
        study, space = self._run(study_problem, m, warm_limits=limits)
        measured = self._measured_trials(study, space, study_problem)
        out: list[Solution | None] = []
        notes = self._notes(study)
        for limit in limits:
            p = problem.with_budget(m, limit)
            best = self._pick(p, measured)
            if best is None:
                out.append(None)
                continue
            out.append(self._finish(p, RawResult(best.var_choice, notes=list(notes)), time.perf_counter() - t0))
        return out

    def pareto_solutions(self, problem: AllocationProblem, metric: str | None = None) -> list[Solution]:
        """Every Pareto-optimal measured trial of the last study (score against `metric`), cheapest first."""
        if self.study is None:
            raise BitsearchError("the bayes solver has not run a study yet")
        m = canonical_metric(metric or self._study_metric)
        space = _Space.of(problem)
        measured = [t for t in self._measured_trials(self.study, space, problem)]
        measured.sort(key=lambda t: (t.metrics[m], -self._sign * t.score, t.number))
        front, best = [], -math.inf
        for t in measured:
            s = self._sign * t.score  # larger is better
            if s > best:
                front.append(t)
                best = s
        return [self._finish(problem, RawResult(t.var_choice), 0.0) for t in front]

    # --- internals ------------------------------------------------------------------------------------
    @property
    def _sign(self) -> float:
        return 1.0 if self.direction == "maximize" else -1.0

    @staticmethod
    def _default_cost_metric(problem: AllocationProblem) -> str:
        sums = problem.sum_budgets
        return sums[0].metric if sums else "avg_weight_bits"

    def _finish(self, problem: AllocationProblem, raw: RawResult, seconds: float) -> Solution:
        sol = super()._finish(problem, raw, seconds)
        rec = self._scores.get(np.asarray(sol.choice, dtype=np.int64).tobytes())
        if rec is not None:
            sol.objective = -rec.score if self.direction == "maximize" else rec.score
            assert sol.allocation is not None
            sol.allocation.metadata["bayes"] = {
                "score": rec.score,
                "direction": self.direction,
                "trial": rec.number,
                "worker": rec.worker,
                "study": getattr(self.study, "study_name", None),
                "scorer": _describe(self.scorer),
            }
            sol.notes.append(
                "bayes: objective is the scorer's measured score"
                + (" negated (lower is better)" if self.direction == "maximize" else "")
                + ", not the table's prediction (that is in allocation.metadata['predicted_loss'])"
            )
        return sol

    def _notes(self, study: Any) -> list[str]:
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        return [
            f"bayes: study {study.study_name!r}: {states.count('COMPLETE')} trials complete "
            f"({states.count('FAIL')} failed), {self.measured_here} measured by this worker"
        ]

    def _make_sampler(self, n_trials: int) -> Any:
        import optuna

        if not isinstance(self.sampler, str):
            return self.sampler
        seed = (self.seed * 1_000_003 + zlib.crc32(self.worker.encode())) % (2**31)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler == "tpe":
                return optuna.samplers.TPESampler(
                    seed=seed, multivariate=True, constant_liar=True, n_startup_trials=self.n_startup_trials
                )
            if self.sampler == "nsgaii":
                pop = self.population_size or max(8, min(50, n_trials // 4))
                return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        return optuna.samplers.RandomSampler(seed=seed)

    def _fingerprint(self, problem: AllocationProblem, metric: str) -> dict[str, Any]:
        return {
            "layers": problem.layer_names,
            "groups": [[int(i) for i in g] for g in problem.groups],
            "options": [o.to_dict() for o in problem.options],
            "allowed": problem.structural_allowed.astype(int).tolist(),
            "budgets": [b.to_dict() for b in problem.budgets],
            "directions": [self.direction, "minimize"],
            "cost_metric": metric,
        }

    def _open_study(self, problem: AllocationProblem, metric: str) -> Any:
        import optuna

        fp = self._fingerprint(problem, metric)
        name = self.study_name
        if name is None:
            digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
            name = f"bitsearch-bayes-{digest}"
        if self._storage_obj is None or self.storage is None:
            self._storage_obj = make_storage(self.storage, self.optuna_schema)
        last: Exception | None = None
        for attempt in range(5):
            try:
                study = optuna.create_study(
                    storage=self._storage_obj,
                    sampler=self._make_sampler(self.n_trials),
                    study_name=name,
                    directions=[self.direction, "minimize"],
                    load_if_exists=True,
                )
                break
            except Exception as exc:  # a racing worker created it between the check and the insert
                last = exc
                time.sleep(0.2 * (attempt + 1))
        else:
            raise BitsearchError(f"cannot create or load the study {name!r}: {last}")
        if [d.name.lower() for d in study.directions] != [self.direction, "minimize"]:
            raise BitsearchError(
                f"the study {name!r} optimises {[d.name.lower() for d in study.directions]}, not "
                f"[{self.direction!r}, 'minimize']: use another study name"
            )
        stored = study.user_attrs.get(_ATTR_PROBLEM)
        if stored is None:
            study.set_user_attr(_ATTR_PROBLEM, fp)
            desc = _describe(self.scorer)
            if desc is not None:
                study.set_user_attr(_ATTR_SCORER, desc)
        elif stored != json.loads(json.dumps(fp)):
            raise BitsearchError(
                f"the study {name!r} in this storage was made for another problem (layers, options, "
                "constraints, budgets or cost metric differ): use another study name"
            )
        return study

    def _warm_start(self, study: Any, problem: AllocationProblem, space: _Space, metric: str,
                    warm_limits: Sequence[float] | None) -> None:
        from .base import solve as base_solve

        seeds: list[np.ndarray] = []
        problems = [problem]
        if warm_limits:
            lims = sorted(set(warm_limits))
            k = max(1, min(self.warm_start_points, len(lims)))
            picks = sorted({lims[int(round(i))] for i in np.linspace(0, len(lims) - 1, k)}, reverse=True)
            problems = [problem.with_budget(metric, v) for v in picks]
        for p in problems:
            try:
                sol = base_solve(p, "ilp", explain=False)
            except BitsearchError:
                continue
            seeds.append(problem.compress(sol.choice))
        for _, choice in problem.uniform_choices():
            if problem.feasible(choice):
                seeds.append(problem.compress(choice))
        seen: set[bytes] = set()
        for vc in seeds:
            key = vc.tobytes()
            if key in seen:
                continue
            seen.add(key)
            study.enqueue_trial(space.params(vc), user_attrs={"warm_start": True}, skip_if_exists=True)

    def _run(self, problem: AllocationProblem, metric: str, warm_limits: Sequence[float] | None):
        import optuna
        from optuna.trial import TrialState

        if self.scorer is None:
            raise BitsearchError(
                "the bayes solver measures allocations, so it needs a scorer: e.g. "
                "scorer=search.solvers.bayes.ptq_scorer(model, calibration, held_out_data) "
                "(or any callable Allocation -> float)"
            )
        if metric not in problem.costs:
            raise BitsearchError(f"the cost model cannot compute {metric}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = _Space.of(problem)
        if self.fanout is not None:
            return self._run_fanout(problem, metric, warm_limits, space), space
        study = self._open_study(problem, metric)
        self.study = study
        self._cache.clear()
        self._scores.clear()
        self._study_metric = metric
        if self.warm_start:
            self._warm_start(study, problem, space, metric, warm_limits)
        worst = -math.inf if self.direction == "maximize" else math.inf
        budgets: list[Budget] = list(problem.budgets)
        t_start = time.perf_counter()
        finished_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

        def objective(trial: Any) -> tuple[float, float]:
            params = {n: trial.suggest_categorical(n, labs) for n, labs in zip(space.names, space.labels)}
            vc = space.choice(params)
            assert vc is not None
            choice = problem.expand(vc)
            _, metrics = problem.evaluate(choice)
            # Another worker may hold this very trial: on SQLite, two workers can pop the same enqueued
            # (WAITING) trial, since SQLite has no row locks. Its constraints are then already set.
            already = set(trial.constraints) if budgets else set()
            for b in budgets:
                if b.metric not in already:
                    trial.set_constraint(b.metric, metrics[b.metric] / (b.limit * (1 + FEAS_RTOL)) - 1.0)
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("worker", self.worker)
            if not all(b.holds(metrics[b.metric]) for b in budgets):
                trial.set_user_attr("measured", False)
                return worst, metrics[metric]
            score = self._score(study, problem, space, vc, params)
            trial.set_user_attr("measured", True)
            return score, metrics[metric]

        # Ask-and-tell rather than `study.optimize`, for one race: on SQLite (no row locks) two workers can pop
        # the same enqueued (WAITING) trial. Each claims the trial it asked for; the one whose claim was
        # overwritten, or that finds the trial finished, drops it (it is not counted) and asks again.
        storage = self._storage_obj
        study_id = storage.get_study_id_from_name(study.study_name)
        deadline = None if self.timeout is None else t_start + float(self.timeout)
        done = attempts = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            while done < self.n_trials and attempts < 3 * self.n_trials:
                attempts += 1
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                if self.total_trials is not None and len(
                    study.get_trials(deepcopy=False, states=finished_states)
                ) >= self.total_trials:
                    break
                trial = study.ask()
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                claim = uuid.uuid4().hex
                try:
                    trial.set_user_attr("claim", claim)
                    values = objective(trial)
                    if storage.get_trial_user_attrs(trial_id).get("claim") != claim:
                        continue  # another worker holds this trial
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker finished it
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    raise
                study.tell(trial, list(values), skip_if_finished=True)
                done += 1
                if self.progress is not None:
                    self.progress(done / self.n_trials, f"bayes: trial {done}/{self.n_trials}")
        self.seconds = time.perf_counter() - t_start
        return study, space

    def _run_fanout(self, problem: AllocationProblem, metric: str, warm_limits: Sequence[float] | None,
                    space: _Space) -> Any:
        """Create (or resume) the fan-out study, queue the other runners, run trials here; the study."""
        fan = self.fanout
        assert fan is not None
        if self.study_name is None:
            raise BitsearchError("a bayes fan-out needs a study_name its workers meet in")
        config = {"problem": ProblemSnapshot.of(problem, model=None).to_dict(), "scorer": fan.scorer,
                  "direction": self.direction, "cost_metric": metric}
        total = self.total_trials or self.n_trials
        create_study(fan.storage, self.study_name, [self.direction, "minimize"], OBJECTIVE_KIND, config,
                     fan.fanout_settings(total),
                     attrs={_ATTR_PROBLEM: self._fingerprint(problem, metric), _ATTR_SCORER: _describe(self.scorer)})
        if self.scorer is not None:
            lend_scorer(fan.scorer, self.scorer)  # this process measures with the scorer it already holds
        self._cache.clear()
        self._scores.clear()
        self._study_metric = metric
        study, _ = load_fanout_study(fan.storage, self.study_name)
        try:
            if self.warm_start and not study.get_trials(deepcopy=False):
                with warnings.catch_warnings():  # enqueueing on a heartbeat storage: Optuna only warns
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    self._warm_start(study, problem, space, metric, warm_limits)
        finally:
            _dispose_study(study)
        self.trial_jobs = []
        if fan.submit_trial_jobs is not None and fan.workers > 1:
            self.trial_jobs = list(fan.submit_trial_jobs(fan.storage, self.study_name, fan.workers - 1))

        def on_trial(p) -> None:
            if self.progress is not None:
                self.progress(p.done / total, f"bayes: {p.done}/{total} trials done ({p.running} running, "
                                              f"{1 + len(self.trial_jobs)} runner(s))")

        t0 = time.perf_counter()
        run = run_trials(fan.storage, self.study_name, worker=fan.worker or f"bayes-{self.worker}",
                         seed=self.seed, on_trial=on_trial, stop=fan.stop)
        self.seconds = time.perf_counter() - t0
        if run.cancelled:
            if fan.on_cancel is not None:
                fan.on_cancel()
            raise BitsearchError(f"the bayes study {self.study_name!r} was stopped before its trials were done")
        study, _ = load_fanout_study(fan.storage, self.study_name)
        me = fan.worker or f"bayes-{self.worker}"
        self.measured_here = sum(1 for t in study.get_trials(deepcopy=False)
                                 if t.user_attrs.get("scored_here") and t.user_attrs.get("worker") == me)
        self.study = study
        return study

    def _score(self, study: Any, problem: AllocationProblem, space: _Space, vc: np.ndarray,
               params: dict[str, str]) -> float:
        from optuna.trial import TrialState

        key = vc.tobytes()
        if key in self._cache:
            return self._cache[key]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("measured") and t.params == params:
                self._cache[key] = float(t.values[0])
                return self._cache[key]
        alloc = problem.to_allocation(problem.expand(vc))
        score = float(self.scorer(alloc))  # type: ignore[misc]
        if not math.isfinite(score):
            raise BitsearchError(f"the scorer returned {score} for an allocation; it must return a finite number")
        self._cache[key] = score
        self.measured_here += 1
        return score

    def _measured_trials(self, study: Any, space: _Space, problem: AllocationProblem) -> list[_Measured]:
        from optuna.trial import TrialState

        out = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if not t.user_attrs.get("measured"):
                continue
            vc = space.choice(t.params)
            if vc is None:
                continue
            choice = problem.expand(vc)
            _, metrics = problem.evaluate(choice)
            rec = _Measured(t.number, vc, float(t.values[0]), metrics, str(t.user_attrs.get("worker", "")))
            out.append(rec)
            self._scores.setdefault(choice.tobytes(), rec)
        return out

    def _pick(self, p: AllocationProblem, measured: list[_Measured]) -> _Measured | None:
        ok = [t for t in measured if p.feasible(p.expand(t.var_choice))]
        if not ok:
            return None
        m = self._study_metric
        return min(ok, key=lambda t: (-self._sign * t.score, t.metrics.get(m, 0.0), t.number))

    def _best(self, problem: AllocationProblem, study: Any, space: _Space, p: AllocationProblem) -> _Measured | None:
        return self._pick(p, self._measured_trials(study, space, problem))


def _dispose_study(study: Any) -> None:
    engine = getattr(getattr(study, "_storage", None), "engine", None)
    if engine is not None:
        engine.dispose()


def _describe(scorer: Any) -> Any:
    fn = getattr(scorer, "describe", None)
    if callable(fn):
        try:
            return json.loads(json.dumps(fn()))
        except (TypeError, ValueError):
            return None
    return None


__all__ = ["BayesFanout", "BayesSettings", "BayesSolver", "ProblemSnapshot", "PTQScorer", "QATScorer", "make_storage", "ptq_scorer", "qat_scorer"]
