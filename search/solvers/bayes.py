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

import copy
import hashlib
import json
import math
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quant.allocation import Allocation
from quant.errors import BitsearchError

from ..problem import FEAS_RTOL, AllocationProblem, Budget, canonical_metric
from .base import Capabilities, RawResult, Solution, Solver, register_solver

Scorer = Callable[[Allocation], float]

#: Scores a scorer may report, and the direction each is optimised in.
SCORE_DIRECTIONS = {"top1": "maximize", "agreement": "maximize", "kl": "minimize", "loss": "minimize"}
SAMPLERS = ("tpe", "nsgaii", "random")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")
_ATTR_PROBLEM = "bitsearch.problem"
_ATTR_SCORER = "bitsearch.scorer"


# --- scorers ----------------------------------------------------------------------------------------------


class PTQScorer:
    """Post-training quantization score of an allocation on fixed data (see `ptq_scorer`).

    The model is copied, wrapped and calibrated once; each call re-derives the quantizers
    (`quant.apply.set_allocation`) and runs the data once. Calls are serialised by a lock, so threads may
    share one scorer (they then take turns; give each thread its own scorer to measure in parallel).
    """

    def __init__(self, model: Any, calibration: Any, eval_data: Any, quant_config: Any = None, metric: str = "top1"):
        from quant.apply import QuantConfig, collect_statistics, wrap_model
        from zoo.data import as_dataset
        from zoo.evaluate import evaluate

        if metric not in SCORE_DIRECTIONS:
            raise BitsearchError(f"unknown score {metric!r}; known: {sorted(SCORE_DIRECTIONS)}")
        self.metric = metric
        self.direction = SCORE_DIRECTIONS[metric]
        self.config = quant_config or QuantConfig()
        self.data = as_dataset(eval_data, "eval_data")
        if metric in ("top1", "loss") and self.data.y is None:
            raise BitsearchError(f"the {metric} score needs labelled eval data; use metric='kl' without labels")
        self._evaluate = evaluate
        self.reference = evaluate(model, self.data)
        self.qmodel = copy.deepcopy(model).eval()
        layers = wrap_model(self.qmodel, self.config)
        if calibration is not None:
            collect_statistics(self.qmodel, layers, calibration, self.config)
        self.layer_names = list(layers)
        self.calls = 0
        self.seconds = 0.0
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": "ptq", "metric": self.metric, "n": len(self.data), "quant": self.config.to_dict()}

    def __call__(self, allocation: Allocation) -> float:
        from quant.apply import set_allocation

        with self._lock:
            t0 = time.perf_counter()
            set_allocation(self.qmodel, allocation)
            r = self._evaluate(self.qmodel, self.data, reference_logits=self.reference.logits)
            self.calls += 1
            self.seconds += time.perf_counter() - t0
            self.last = r.to_dict()
        value = getattr(r, self.metric)
        if value is None:
            raise BitsearchError(f"the evaluation gave no {self.metric}")
        return float(value)


def ptq_scorer(
    model: Any, calibration: Any, eval_data: Any, quant_config: Any = None, metric: str = "top1"
) -> PTQScorer:
    """A scorer that measures an allocation by PTQ: `metric` of the fake-quantized model on `eval_data`.

    `calibration`: input batches for activation ranges and data-driven weight clipping (may be None when no
    allocation needs them). `eval_data`: an ArrayDataset, an (x, y) pair or an input tensor; keep it apart
    from the data that will finally judge the result. `metric`: "top1" / "agreement" (maximised), "kl" /
    "loss" (minimised); the scorer's `direction` tells the solver which.
    """
    return PTQScorer(model, calibration, eval_data, quant_config, metric)


class QATScorer:
    """Scores an allocation by a short quantization-aware fine-tuning run (`quant.qat.finetune`)."""

    def __init__(self, model: Any, train_data: Any, eval_data: Any, recipe: Any = None, calibration: Any = None,
                 metric: str = "top1"):
        if metric not in ("top1", "loss"):
            raise BitsearchError("a QAT scorer reports top1 or loss")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.recipe, self.calibration, self.metric = recipe, calibration, metric
        self.direction = SCORE_DIRECTIONS[metric]
        self.last: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        r = self.recipe
        return {"kind": "qat", "metric": self.metric, "recipe": None if r is None else r.to_dict()}

    def __call__(self, allocation: Allocation) -> float:
        from quant.qat import finetune

        res = finetune(self.model, allocation, self.train_data, self.recipe, calibration=self.calibration,
                       eval_data=self.eval_data)
        self.last = dict(res.metrics)
        return float(res.metrics[self.metric])


def qat_scorer(model: Any, train_data: Any, eval_data: Any, recipe: Any = None, calibration: Any = None,
               metric: str = "top1") -> QATScorer:
    """A scorer that fine-tunes each allocation briefly (`recipe`, e.g. `QATRecipe(steps=100)`) and reports
    `metric` on `eval_data`. Costly: one QAT run per trial."""
    return QATScorer(model, train_data, eval_data, recipe, calibration, metric)


# --- storage --------------------------------------------------------------------------------------------


def _sqlalchemy_url(url: str) -> str:
    # The app ships psycopg 3; SQLAlchemy reads a bare postgresql:// as psycopg2.
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _check_foreign_database(url: str, engine_kwargs: dict[str, Any]) -> None:
    """Refuse a database whose `alembic_version` belongs to another application (Optuna would adopt it)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, **engine_kwargs)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if "alembic_version" in names and "version_info" not in names:
        raise BitsearchError(
            "this database already holds another application's migrations (alembic_version); Optuna would "
            "take that table over. Give the study its own SQLite file, or a PostgreSQL schema (optuna_schema)"
        )


def make_storage(storage: Any, optuna_schema: str = "optuna") -> Any:
    """An Optuna storage from a URL (or None: in memory; or an Optuna storage, returned as is)."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    url = _sqlalchemy_url(storage)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60, "check_same_thread": False}}
        path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
        if path and path != ":memory:":
            import sqlite3

            # WAL (persistent in the file): readers do not block the worker that writes. Switching needs the
            # file to itself, so a worker that opens it while another writes retries, then goes on without.
            for attempt in range(10):
                con = sqlite3.connect(path, timeout=60)
                try:
                    if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                        break
                    con.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.1 * (attempt + 1))
                finally:
                    con.close()
    elif url.startswith("postgresql"):
        import sqlalchemy as sa

        engine = sa.create_engine(url, pool_pre_ping=True)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{optuna_schema}"'))
        finally:
            engine.dispose()
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"options": f"-csearch_path={optuna_schema}"}}
    _check_foreign_database(url, engine_kwargs)
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the tables at once: the loser retries
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except Exception as exc:  # sqlalchemy's OperationalError / IntegrityError on a racing CREATE TABLE
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise BitsearchError(f"cannot open the Optuna storage {storage!r}: {last}")


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
    # It scores allocations by measuring them: the search pipeline does not hand it a scorer.
    capabilities = Capabilities(needs_scorer=True)
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


def _describe(scorer: Any) -> Any:
    fn = getattr(scorer, "describe", None)
    if callable(fn):
        try:
            return json.loads(json.dumps(fn()))
        except (TypeError, ValueError):
            return None
    return None


__all__ = ["BayesSolver", "PTQScorer", "QATScorer", "make_storage", "ptq_scorer", "qat_scorer"]
