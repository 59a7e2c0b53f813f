"""Trial fan-out: one Optuna study in a database, its trials run by any number of worker processes.

A search that measures each candidate (BOMP-NAS's train-and-fine-tune trials) is slow per trial and
embarrassingly parallel across trials. The study lives in an RDB storage (the service's PostgreSQL, or an
SQLite file); `create_study` stores in it everything a worker needs (the objective's registered kind and its
JSON config, `total_trials`, the per-trial timeout, the heartbeat settings), so a worker needs only the storage
URL and the study name:

    name = create_study(url, "nas-1", ["maximize", "minimize"], "bomp-nas", config, total_trials=40)
    run_trials(url, "nas-1")          # in each worker: the local pool's processes, or Celery tasks

Guarantees, with several workers and workers that die:
- each running trial records a heartbeat every `heartbeat_interval` seconds (a thread beside the objective);
  a trial whose worker was killed stops beating, and the next `run_trials` call of any worker (a live one
  polls while others' trials run) marks it FAIL (`optuna.storages.fail_stale_trials`) and re-queues it once
  with the same parameters (Optuna's `RetryHeartbeatStaleTrialCallback`, `max_retry` times at most);
- `total_trials` counts *lineages*: a trial and its retries are one lineage, done when a member completes or
  when all have failed with no retry left. So a re-run trial is never counted twice, and the workers together
  stop at exactly `total_trials` done lineages;
- `trial_timeout` is cooperative: the objective gets a `TrialContext` and calls `ctx.check()` between steps;
  a trial past its time fails (user attr `error`), and is counted as done (failed), not retried;
- two workers may both start "the last" trial (each counted before the other asked): lineages are ranked by
  their first trial's number, and a trial beyond `total_trials` is closed unrun with user attr `surplus`
  (a FAIL row that no count includes);
- on SQLite (no row locks) two workers may pop the same queued retry: each writes a claim and the loser drops
  the trial (on PostgreSQL the row lock of `set_trial_state_values` prevents it);
- stopping: `stop_study` marks the study stopped (a cancelled search), and every worker stops asking for trials
  at its next loop; a worker's own `stop()` (its job was cancelled) ends it too, and `ctx.check()` raises
  `TrialCancelled` inside a running trial, which is then closed FAIL with user attr `cancelled` (counted as a
  failed lineage, never re-run). Finished trials stay stored.

Objectives are registered by kind (`register_objective`); a worker builds the objective from the stored config,
so no code travels through the database.
"""

from __future__ import annotations

import copy

import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from quant.errors import BitsearchError

from .study_storage import make_storage

_ATTR_FANOUT = "bitsearch.fanout"
_ATTR_OBJECTIVE = "bitsearch.objective"
_ATTR_STOPPED = "bitsearch.stopped"

#: kind -> factory(config dict) -> objective(trial, ctx) -> sequence of objective values
TRIAL_OBJECTIVES: dict[str, Callable[[dict[str, Any]], Callable[[Any, "TrialContext"], Sequence[float]]]] = {}


def register_objective(kind: str):
    """Decorator: register an objective factory under `kind` (what `create_study` names)."""

    def deco(factory):
        TRIAL_OBJECTIVES[kind] = factory
        return factory

    return deco


class TrialTimeout(BitsearchError):
    """A trial ran past the study's per-trial timeout."""


class TrialCancelled(BitsearchError):
    """The worker running a trial was told to stop (its job cancelled): the trial ends unfinished."""


@dataclass
class TrialContext:
    """What an objective gets beside its trial: the worker's id, the trial's deadline and whether the worker
    was told to stop."""

    worker: str
    deadline: float | None  # time.monotonic() value, None: no limit
    started: float = field(default_factory=time.monotonic)
    stop: Callable[[], bool] | None = None  # cheap: it is asked at every check

    def check(self) -> None:
        """Raise `TrialTimeout` when the trial is past its time, `TrialCancelled` when the worker was told to
        stop (call it between training steps)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TrialTimeout(f"trial ran past its timeout of {self.deadline - self.started:.0f} s")
        if self.stop is not None and self.stop():
            raise TrialCancelled("the trial's worker was told to stop")


@dataclass
class Fanout:
    """The study-wide settings every worker reads from the study."""

    total_trials: int
    trial_timeout: float | None = None
    heartbeat_interval: int = 10
    grace_period: int | None = None  # None: 2 x heartbeat_interval
    max_retry: int = 1
    optuna_schema: str = "optuna"

    def __post_init__(self) -> None:
        if isinstance(self.total_trials, bool) or not isinstance(self.total_trials, int) or self.total_trials < 1:
            raise BitsearchError(f"total_trials must be a positive integer, got {self.total_trials!r}")
        if self.trial_timeout is not None and not (
            isinstance(self.trial_timeout, (int, float)) and math.isfinite(self.trial_timeout) and self.trial_timeout > 0
        ):
            raise BitsearchError(f"trial_timeout must be a positive number of seconds, got {self.trial_timeout!r}")
        if not isinstance(self.heartbeat_interval, int) or self.heartbeat_interval < 1:
            raise BitsearchError(f"heartbeat_interval must be a positive integer (s), got {self.heartbeat_interval!r}")
        if self.grace_period is not None and (
            not isinstance(self.grace_period, int) or self.grace_period <= self.heartbeat_interval
        ):
            raise BitsearchError("grace_period must be an integer number of seconds above heartbeat_interval")
        if not isinstance(self.max_retry, int) or self.max_retry < 0:
            raise BitsearchError(f"max_retry must be a non-negative integer, got {self.max_retry!r}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StudyProgress:
    """Lineage counts of a study (see the module docstring)."""

    done: int = 0  # lineages with a completed (or pruned) member, or failed with no retry pending
    complete: int = 0
    failed: int = 0
    running: int = 0  # lineages with a running member
    waiting: int = 0  # lineages with a queued member
    trials: int = 0  # trial rows, retries included


def progress_of(trials: Sequence[Any]) -> StudyProgress:
    """Count the lineages of `trials` (FrozenTrials of one study)."""
    lineages: dict[int, list[Any]] = {}
    trials = [t for t in trials if not t.user_attrs.get("surplus")]
    for t in trials:
        root = t.system_attrs.get("failed_trial", t.number)
        lineages.setdefault(int(root), []).append(t)
    p = StudyProgress(trials=len(trials))
    for members in lineages.values():
        states = {t.state.name for t in members}
        if states & {"COMPLETE", "PRUNED"}:
            p.done += 1
            p.complete += 1
        elif "RUNNING" in states:
            p.running += 1
        elif "WAITING" in states:
            p.waiting += 1
        else:
            p.done += 1
            p.failed += 1
    return p


def _surplus(study: Any, storage: Any, trial: Any, total: int) -> bool:
    """Whether a newly asked trial starts a lineage beyond `total`: lineages are ranked by their first trial's
    number (which the storage hands out atomically), so of racing workers exactly the late ones find theirs
    surplus. A popped re-run belongs to an existing lineage and never is."""
    if "failed_trial" in storage.get_trial_system_attrs(trial._trial_id):
        return False
    roots = set()
    for t in study.get_trials(deepcopy=False):
        if t.number < trial.number and not t.user_attrs.get("surplus"):
            roots.add(int(t.system_attrs.get("failed_trial", t.number)))
    return len(roots) >= total


def _open(storage_url: Any, fan: Fanout) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=fan.max_retry)
        return make_storage(
            storage_url,
            fan.optuna_schema,
            heartbeat_interval=fan.heartbeat_interval,
            grace_period=fan.grace_period,
            heartbeat_stale_trial_callback=retry if fan.max_retry > 0 else None,
        )


def create_study(
    storage_url: str,
    study_name: str,
    directions: Sequence[str],
    objective_kind: str,
    objective_config: dict[str, Any],
    fanout: Fanout,
    attrs: dict[str, Any] | None = None,
) -> str:
    """Create (or load, when it exists with the same objective) a fan-out study; returns its name."""
    import json

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if objective_kind not in TRIAL_OBJECTIVES:
        raise BitsearchError(f"unknown trial objective {objective_kind!r}; known: {sorted(TRIAL_OBJECTIVES)}")
    if not isinstance(storage_url, str):
        raise BitsearchError("a fan-out study needs a database URL (sqlite:///file.db or postgresql://...)")
    storage = _open(storage_url, fanout)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=list(directions),
                                load_if_exists=True)
    objective = json.loads(json.dumps({"kind": objective_kind, "config": objective_config}))
    stored = study.user_attrs.get(_ATTR_OBJECTIVE)
    if stored is None:
        study.set_user_attr(_ATTR_OBJECTIVE, objective)
        study.set_user_attr(_ATTR_FANOUT, fanout.to_dict())
        for k, v in (attrs or {}).items():
            study.set_user_attr(k, v)
    elif stored != objective:
        raise BitsearchError(f"the study {study_name!r} exists with another objective: use another study name")
    return study_name


def load_fanout_study(storage_url: str, study_name: str, sampler: Any = None) -> tuple[Any, Fanout]:
    import optuna

    probe = make_storage(storage_url)
    try:
        summaries = {s.study_name: s for s in optuna.get_all_study_summaries(probe, include_best_trial=False)}
    finally:
        _dispose(probe)
    if study_name not in summaries or _ATTR_FANOUT not in summaries[study_name].user_attrs:
        raise BitsearchError(f"no fan-out study {study_name!r} in this storage")
    fan = Fanout(**summaries[study_name].user_attrs[_ATTR_FANOUT])
    study = optuna.load_study(study_name=study_name, storage=_open(storage_url, fan), sampler=sampler)
    return study, fan


def stop_study(storage_url: str, study_name: str, reason: str = "cancelled") -> bool:
    """Mark a fan-out study stopped: its workers start no further trial (running ones end at their next
    `ctx.check()` when their own job is cancelled too). Finished trials stay. False when there is no such study."""
    storage = make_storage(storage_url)
    try:
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            return False
        storage.set_study_user_attr(study_id, _ATTR_STOPPED, {"reason": str(reason)[:200], "at": time.time()})
        return True
    finally:
        _dispose(storage)


def study_stopped(study: Any) -> dict[str, Any] | None:
    """The stop mark of a study (`stop_study`), or None."""
    return study._storage.get_study_user_attrs(study._study_id).get(_ATTR_STOPPED)


def _dispose(storage: Any) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def _fail_heartbeatless(study: Any, grace: float) -> None:
    """A worker killed between `study.ask()` and its trial's first heartbeat leaves a RUNNING trial without a
    heartbeat row, which `fail_stale_trials` never calls stale, so the study would wait for it for ever. Such a
    trial older than the grace period is failed and handed to the same stale-trial callback (re-run once)."""
    import datetime as dt

    import sqlalchemy as sa
    from optuna.trial import TrialState

    storage = study._storage
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is None:
        return
    cutoff = dt.datetime.now() - dt.timedelta(seconds=grace)  # Optuna stores local naive times
    old = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < cutoff]
    if not old:
        return
    query = sa.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True))
    with engine.connect() as conn:
        beating = {row[0] for row in conn.execute(query, {"ids": old})}
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in old:
        if trial_id in beating:
            continue  # fail_stale_trials judges it by its heartbeat
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except Exception:  # another worker failed or finished it first
            continue
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


class _Heartbeat:
    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient database error: the next beat retries
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class TrialsRun:
    """What one `run_trials` call did."""

    ran: int = 0  # trials this worker finished (completed or failed)
    completed: int = 0
    failed: int = 0
    cancelled: bool = False  # the call ended because of `stop()` or a stopped study, not a done study
    progress: StudyProgress = field(default_factory=StudyProgress)
    seconds: float = 0.0


def run_trials(
    storage_url: str,
    study_name: str,
    n: int | None = None,
    worker: str | None = None,
    seed: int = 0,
    poll: float | None = None,
    wait_for_others: bool = True,
    on_trial: Callable[[StudyProgress], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrialsRun:
    """Run trials of the fan-out study until it holds `total_trials` done lineages (or `n` trials here).

    `worker` names this worker (its sampler seed derives from it, so workers propose different points);
    `wait_for_others`: when every remaining lineage is running elsewhere, poll until they finish or turn stale
    (then this worker re-runs them) rather than leave; `on_trial` is called after every trial this worker ends;
    `stop()` true ends the call between trials (and, through `ctx.check()`, inside one); so does a study
    marked stopped (`stop_study`); `TrialsRun.cancelled` then says so.
    """
    import zlib

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = worker or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    wseed = (seed * 1_000_003 + zlib.crc32(worker.encode())) % (2**31)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=wseed, multivariate=True, constant_liar=True,
                                             n_startup_trials=8)
    study, fan = load_fanout_study(storage_url, study_name, sampler)
    spec = study.user_attrs[_ATTR_OBJECTIVE]
    factory = TRIAL_OBJECTIVES.get(spec["kind"])
    if factory is None:
        _dispose(study._storage)
        raise BitsearchError(f"this worker does not know the trial objective {spec['kind']!r}")
    objective = factory(spec["config"])
    poll = float(poll if poll is not None else max(1.0, fan.heartbeat_interval / 2))
    run = TrialsRun()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # This loop is ask-and-tell with its own heartbeat thread, which Optuna only warns about.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _loop(study, fan, objective, worker, n, poll, wait_for_others, on_trial, stop, run, t0)


def _loop(study, fan, objective, worker, n, poll, wait_for_others, on_trial, stop, run, t0) -> TrialsRun:
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    try:
        while n is None or run.ran < n:
            if (stop is not None and stop()) or study_stopped(study) is not None:
                run.cancelled = True
                break
            optuna.storages.fail_stale_trials(study)
            _fail_heartbeatless(study, fan.grace_period or 2 * fan.heartbeat_interval)
            prog = progress_of(study.get_trials(deepcopy=False))
            run.progress = prog
            if prog.waiting == 0 and prog.done + prog.running >= fan.total_trials:
                if prog.running == 0 or not wait_for_others:
                    break
                time.sleep(poll)  # others' trials run: wait for them, or for them to turn stale
                continue
            trial = study.ask()
            claim = uuid.uuid4().hex
            ctx = TrialContext(worker, None if fan.trial_timeout is None else time.monotonic() + fan.trial_timeout,
                               stop=stop)
            with _Heartbeat(storage, trial._trial_id, fan.heartbeat_interval):
                if _surplus(study, storage, trial, fan.total_trials):
                    # Another worker started the last lineage between this worker's count and its ask: this
                    # trial would exceed total_trials. It is closed unrun, marked, and counted nowhere.
                    trial.set_user_attr("surplus", True)
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    continue
                try:
                    trial.set_user_attr("claim", claim)
                    trial.set_user_attr("worker", worker)
                    values = objective(trial, ctx)
                    if storage.get_trial_user_attrs(trial._trial_id).get("claim") != claim:
                        continue  # another worker popped the same queued trial and holds it
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # failed as stale meanwhile (this worker stalled): its retry runs elsewhere
                except TrialCancelled as exc:
                    trial.set_user_attr("cancelled", True)
                    trial.set_user_attr("error", str(exc))
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    run.cancelled = True
                    break
                except (TrialTimeout, BitsearchError) as exc:
                    trial.set_user_attr("error", str(exc))
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    run.ran += 1
                    run.failed += 1
                    continue
                except BaseException:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    raise
                study.tell(trial, list(values), skip_if_finished=True)
            run.ran += 1
            run.completed += 1
            if on_trial is not None:
                on_trial(progress_of(study.get_trials(deepcopy=False)))
        run.progress = progress_of(study.get_trials(deepcopy=False))
    finally:
        run.seconds = time.perf_counter() - t0
        _dispose(storage)
    return run


__all__ = [
    "TRIAL_OBJECTIVES",
    "Fanout",
    "StudyProgress",
    "TrialCancelled",
    "TrialContext",
    "TrialTimeout",
    "TrialsRun",
    "create_study",
    "load_fanout_study",
    "progress_of",
    "register_objective",
    "run_trials",
    "stop_study",
    "study_stopped",
]
