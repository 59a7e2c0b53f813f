"""Read-only views of what a measured search records beside its front, for the REST API and the dashboard:

- the trials of a `bayes` or `bomp-nas` search's Optuna study (`search-{id}` in the service's database, see
  `service.measured_search.study_url`): each trial's score, cost, bits (and architecture), whether it is
  Pareto-optimal, and the study's progress. Readable while the search runs: the study is written trial by trial.
- the per-layer bits of a `qbitopt` search at every re-allocation during training: from the stored point's
  allocation (`metadata.qbitopt.history`) once the search has finished, and from the job's own history file
  (`search.measured.HISTORY_FILE`, written as re-allocations happen) while it runs.

Nothing here writes: a search whose study does not exist yet has no trials (it is not created here).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import repo
from quant.errors import BitsearchError
from service.searches import NotFound, search_view
from service.settings import Settings

TRIAL_SOLVERS = ("bayes", "bomp-nas")
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
_ATTR_FANOUT = "bitsearch.fanout"  # search.trials: the fan-out settings (total_trials) of a bomp-nas study
_ATTR_OBJECTIVE = "bitsearch.objective"  # search.trials: the bomp-nas objective's config (cost_metric)
_ATTR_PROBLEM = "bitsearch.problem"  # search.solvers.bayes: the problem's fingerprint (cost_metric)
_ATTR_SCORER = "bitsearch.scorer"  # search.solvers.bayes: the scorer's description (metric)


@dataclass
class TrialView:
    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    score: float | None  # the measured score (None: not measured, e.g. over budget, or not finished)
    cost: float | None  # the study's cost objective (`cost_metric`), internal units
    metrics: dict[str, float]  # every cost metric the trial was costed on, internal units
    measured: bool
    pareto: bool = False
    bits: dict[str, str] = field(default_factory=dict)  # layer (or tie group) -> option label
    arch: dict[str, Any] | None = None  # bomp-nas: the trial's architecture
    error: str | None = None
    retry_of: int | None = None  # a re-run of a trial lost with its worker
    worker: str | None = None
    warm_start: bool = False  # bayes: a seed (the ILP's answer or a uniform baseline), not a sampled point
    seconds: float | None = None
    cancelled: bool = False  # ended unfinished because its search was cancelled


@dataclass
class TrialProgress:
    total: int | None  # trials the study runs in all (None: unknown)
    done: int  # finished: complete, pruned or failed (a bomp-nas trial and its re-runs count once)
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    infeasible: int  # complete but over a budget, so costed and never measured (bayes)


@dataclass
class TrialsView:
    search_id: str
    solver: str
    status: str
    study: str
    exists: bool  # whether the study has been created yet
    direction: str  # of the score: "maximize" (top-1) or "minimize" (KL, loss)
    score_name: str
    cost_metric: str | None
    progress: TrialProgress
    trials: list[TrialView]


@dataclass
class LayerBitsHistory:
    name: str
    weight_bits: list[int | None]  # per re-allocation step (None: an option without a bit count)
    labels: list[str]  # the option's full label (e.g. W4A8) per step


@dataclass
class BitsHistoryView:
    search_id: str
    status: str
    source: str  # "result" (the stored point) or "running" (the job's history file, as it is written)
    point: int | None
    steps: list[int]
    layers: list[LayerBitsHistory]
    changed: list[list[str]]  # the layers that changed bits at each step
    objective: list[float | None]  # QBitOpt's predicted objective after each re-solve


# --- the study's storage ---------------------------------------------------------------------------------

_STORAGES: dict[str, Any] = {}
_LIVE: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (url, study) -> Optuna's caching reader, newest last
_LIVE_STUDIES = 16  # running studies whose finished trials are kept in memory
_STORAGES_LOCK = threading.Lock()


def service_db_url(sf: Any, settings: Settings) -> str:
    """The URL of the database the app reads (its session factory's), which the search jobs share."""
    bind = getattr(sf, "kw", {}).get("bind")
    url = getattr(bind, "url", None)
    return url.render_as_string(hide_password=False) if url is not None else settings.db_url


def _storage(url: str) -> Any | None:
    """An Optuna RDB storage of `url`, opened once per process (opening checks and migrates the schema); None
    for an SQLite file that does not exist yet (no search of this service has made a study)."""
    with _STORAGES_LOCK:
        if url in _STORAGES:
            return _STORAGES[url]
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
            if not path or not Path(path).exists():
                return None
        from search.study_storage import make_storage

        _STORAGES[url] = make_storage(url)
        return _STORAGES[url]


def _reader(url: str, study: str, running: bool) -> Any | None:
    """What to read a study through. While its search runs: Optuna's caching wrapper, which keeps finished
    trials (they never change) in memory, so a page polling every 2 s reads only the new and unfinished ones
    (a tenth of the CPU time at 200 trials). Otherwise the storage itself: every trial read afresh, and the
    study's cache dropped."""
    backend = _storage(url)
    if backend is None:
        return None
    key = (url, study)
    with _STORAGES_LOCK:
        if not running:
            _LIVE.pop(key, None)
            return backend
        if key not in _LIVE:
            import optuna

            _LIVE[key] = optuna.storages.get_storage(backend)
            while len(_LIVE) > _LIVE_STUDIES:
                _LIVE.popitem(last=False)
        _LIVE.move_to_end(key)
        return _LIVE[key]


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _solver_of(view: repo.SearchView) -> tuple[str, dict[str, Any]]:
    """(solver name, its settings) of a stored search: the job spec's (parsed), else the request's."""
    for stored in (view.search.spec, view.search.request):
        solver = (stored or {}).get("solver")
        if isinstance(solver, dict) and isinstance(solver.get("name"), str):
            return solver["name"], dict(solver.get("settings") or {})
    return "ilp", {}


def _status(view: repo.SearchView) -> str:
    return view.job.status.value if view.job is not None else "queued"


# --- trials ----------------------------------------------------------------------------------------------


def _pareto(trials: list[TrialView], maximize: bool) -> None:
    """Mark the non-dominated measured trials on (score, cost): a sort by cost, then a running best score."""
    sign = 1.0 if maximize else -1.0
    pts = [t for t in trials if t.state == "COMPLETE" and t.measured and t.score is not None and t.cost is not None]
    pts.sort(key=lambda t: (t.cost, -sign * t.score, t.number))
    best = -math.inf
    for t in pts:
        s = sign * t.score
        if s > best:
            t.pareto = True
            best = s


def _bits_of(t: Any, solver: str) -> dict[str, str]:
    alloc = t.user_attrs.get("allocation")
    if isinstance(alloc, dict) and isinstance(alloc.get("layers"), dict):  # bomp-nas: the trial's allocation
        from quant.allocation import LayerBits

        out = {}
        for name, lb in alloc["layers"].items():
            try:
                out[name] = LayerBits.from_dict(lb).label()
            except (BitsearchError, TypeError, KeyError, ValueError):
                out[name] = str(lb)
        return out
    if solver == "bayes":  # one categorical parameter per layer or tie group: "007:layer[+k]" -> option label
        # (labels get an "i:" prefix only when two options share one)
        return {str(k).split(":", 1)[-1]: re.sub(r"^\d+:", "", str(v)) for k, v in t.params.items()}
    return {}


def trial_views(raw: list[Any], solver: str) -> list[TrialView]:
    """Optuna's frozen trials of a search's study, as views (in trial order; surplus rows already left out)."""
    trials = []
    for t in raw:
        values = t.values or []
        measured = bool(t.user_attrs.get("measured"))
        metrics = {k: float(v) for k, v in (t.user_attrs.get("metrics") or {}).items() if _finite(v) is not None}
        seconds = _finite(t.user_attrs.get("seconds"))  # bomp-nas times its trial's work itself
        if seconds is None and t.datetime_start is not None and t.datetime_complete is not None:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        retry = t.system_attrs.get("failed_trial")
        trials.append(TrialView(
            number=t.number, state=t.state.name, measured=measured and t.state.name == "COMPLETE",
            score=_finite(values[0]) if values and measured else None,
            cost=_finite(values[1]) if len(values) > 1 else None,
            metrics=metrics, bits=_bits_of(t, solver),
            arch=t.user_attrs.get("arch") if isinstance(t.user_attrs.get("arch"), dict) else None,
            error=t.user_attrs.get("error"), retry_of=int(retry) if isinstance(retry, int) else None,
            worker=t.user_attrs.get("worker") if isinstance(t.user_attrs.get("worker"), str) else None,
            warm_start=bool(t.user_attrs.get("warm_start")), seconds=seconds,
            cancelled=bool(t.user_attrs.get("cancelled")),
        ))
    return trials


def study_trials(search_id: str, db_url: str, solver: str = "bayes") -> list[TrialView]:
    """Every trial of a search's study, read afresh from the database at `db_url` (the service's); an empty
    list when the search has no study yet. No tenant check: `search_trials` is the API's reader."""
    from service.measured_search import study_url

    storage = _reader(study_url(db_url), f"search-{search_id}", running=False)
    if storage is None:
        return []
    try:
        study_id = storage.get_study_id_from_name(f"search-{search_id}")
    except KeyError:
        return []
    raw = [t for t in storage.get_all_trials(study_id, deepcopy=False) if not t.user_attrs.get("surplus")]
    return trial_views(raw, solver)


def search_trials(sf: Any, settings: Settings, tenant_id: str, search_id: str) -> TrialsView:
    """The trials of a bayes or bomp-nas search's study (NotFound for another tenant's search, or a search
    whose solver runs no trials)."""
    view = search_view(sf, tenant_id, search_id)
    solver, solver_settings = _solver_of(view)
    if solver not in TRIAL_SOLVERS:
        raise NotFound(f"search {search_id} runs the {solver!r} solver, which has no trials "
                       f"(trials: {', '.join(TRIAL_SOLVERS)})")
    from service.measured_search import study_url

    study = f"search-{search_id}"
    status = _status(view)
    storage = _reader(study_url(service_db_url(sf, settings)), study, running=status in ("queued", "running"))
    study_id = None
    if storage is not None:
        try:
            study_id = storage.get_study_id_from_name(study)
        except KeyError:
            study_id = None
    planned = solver_settings.get("total_trials") or (solver_settings.get("n_trials", 50) if solver == "bayes"
                                                      else None)
    if study_id is None:
        progress = TrialProgress(planned if isinstance(planned, int) else None, 0, 0, 0, 0, 0, 0, 0)
        return TrialsView(search_id, solver, status, study, False, "maximize", "top1", None, progress, [])

    attrs = storage.get_study_user_attrs(study_id)
    directions = [d.name.lower() for d in storage.get_study_directions(study_id)]
    raw = [t for t in storage.get_all_trials(study_id, deepcopy=False) if not t.user_attrs.get("surplus")]
    if solver == "bomp-nas":
        cost_metric = ((attrs.get(_ATTR_OBJECTIVE) or {}).get("config") or {}).get("cost_metric")
        score_name = "top1"
        fan = attrs.get(_ATTR_FANOUT) or {}
        total = fan.get("total_trials", planned)
    else:
        cost_metric = (attrs.get(_ATTR_PROBLEM) or {}).get("cost_metric")
        score_name = str((attrs.get(_ATTR_SCORER) or {}).get("metric") or "score")
        total = planned
    maximize = (directions or ["maximize"])[0] == "maximize"
    trials = trial_views(raw, solver)
    _pareto(trials, maximize)
    states = [t.state for t in trials]
    if solver == "bomp-nas":
        from search.trials import progress_of  # lineages: a trial and its re-runs count once

        p = progress_of(raw)
        done, failed, running, waiting = p.done, p.failed, p.running, p.waiting
    else:
        done = sum(s in FINISHED_STATES for s in states)
        failed, running, waiting = states.count("FAIL"), states.count("RUNNING"), states.count("WAITING")
    progress = TrialProgress(
        total=max(int(total), done) if isinstance(total, int) else None, done=done,
        complete=states.count("COMPLETE"), pruned=states.count("PRUNED"), failed=failed, running=running,
        waiting=waiting, infeasible=sum(1 for t in trials if t.state == "COMPLETE" and not t.measured),
    )
    return TrialsView(search_id, solver, status, study, True, "maximize" if maximize else "minimize",
                      score_name, cost_metric, progress, trials)


# --- QBitOpt's bits over training ------------------------------------------------------------------------


def _weight_bits(label: str) -> int | None:
    """The weight bits of an option label: W4A8 -> 4, W8Afp -> 8; a scheme's element bits (mxfp4A8 -> 4)."""
    m = re.match(r"^[Ww](\d+)", label) or re.search(r"(\d+)", label)
    return int(m.group(1)) if m else None


def _history_view(search_id: str, status: str, source: str, point: int | None,
                  history: list[dict[str, Any]]) -> BitsHistoryView:
    names: list[str] = []
    for rec in history:
        names += [n for n in rec.get("allocation") or {} if n not in names]
    layers = []
    for n in names:
        labels = [str((rec.get("allocation") or {}).get(n, "")) for rec in history]
        layers.append(LayerBitsHistory(n, [_weight_bits(lab) if lab else None for lab in labels], labels))
    return BitsHistoryView(
        search_id, status, source, point, [int(rec.get("step", 0)) for rec in history], layers,
        [list(rec.get("changed") or []) for rec in history],
        [_finite(rec.get("objective_after")) for rec in history],
    )


def search_bits_history(sf: Any, settings: Settings, tenant_id: str, search_id: str) -> BitsHistoryView:
    """The per-layer bits of a qbitopt search at each re-allocation (NotFound for another tenant's search, a
    search of another solver, or one with no re-allocation recorded yet)."""
    from search.measured import HISTORY_FILE

    view = search_view(sf, tenant_id, search_id)
    solver, _ = _solver_of(view)
    if solver != "qbitopt":
        raise NotFound(f"search {search_id} runs the {solver!r} solver; bits over training are qbitopt's")
    status = _status(view)
    for p in repo.get_points(sf, tenant_id, search_id):
        found = repo.get_point_allocation(sf, tenant_id, search_id, p.index)
        meta = ((found[1].allocation.get("metadata") or {}) if found and found[1] is not None else {})
        history = (meta.get("qbitopt") or {}).get("history")
        if isinstance(history, list):
            return _history_view(search_id, status, "result", p.index, history)
    if view.job is not None and status == "running":  # as the job writes it, re-allocation by re-allocation
        path = settings.jobs_dir / view.job.id / HISTORY_FILE
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError):
            history = None
        if isinstance(history, list):
            return _history_view(search_id, status, "running", None, history)
    raise NotFound(f"search {search_id} has no bits history yet (status: {status})")


__all__ = [
    "BitsHistoryView",
    "LayerBitsHistory",
    "TRIAL_SOLVERS",
    "TrialProgress",
    "TrialView",
    "TrialsView",
    "search_bits_history",
    "search_trials",
    "service_db_url",
]
