"""The service's side of the measured searches (`search.measured`): where their studies live, and the job kind
that lets any worker run trials of a fan-out study.

A BOMP-NAS study lives in the service's own database: PostgreSQL (Optuna's tables in their own schema), or, with
an SQLite database, a file beside it. The search job queues `workers - 1` "study-trials" jobs; each runs trials
until the study is done (`search.trials.run_trials`), so trials spread over the local pool or Celery workers,
and a worker killed mid-trial costs one re-run of that trial, never a double count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quant.errors import BitsearchError
from search.measured import (  # noqa: F401  (re-exported for the service)
    MEASURED_SOLVERS,
    bayes_solver_options,
    bits_history,
    check_servable,
    run_bomp_nas,
    run_qbitopt,
)


def study_url(db_url: str) -> str:
    """Where the service keeps Optuna studies: its own PostgreSQL (Optuna's tables in their own schema), or,
    for an SQLite database, a file beside it (Optuna and the app would otherwise share `alembic_version`)."""
    if db_url.startswith("sqlite"):
        path = db_url.split(":///", 1)[1] if ":///" in db_url else ""
        if not path or path == ":memory:":
            raise BitsearchError("studies need a database file or server; the service database is in memory")
        p = Path(path)
        return f"sqlite:///{p.with_name(p.stem + '-studies.db')}"
    return db_url


# --- the fan-out job kind ------------------------------------------------------------------------------------


def run_study_trials(spec: dict[str, Any], ctx: Any) -> Any:
    """The "study-trials" job kind: run trials of the fan-out study `spec["study"]` in `spec["storage"]` until
    nothing is left to start (the job's cancellation ends it between trials)."""
    import search.solvers.bompnas  # noqa: F401  (registers the bomp-nas trial objective)
    from search.trials import run_trials
    from service.jobs.kinds import JobCancelled, JobOutput

    if not isinstance(spec.get("storage"), str) or not isinstance(spec.get("study"), str):
        raise BitsearchError("a study-trials job needs 'storage' and 'study'")
    cancelled = {"now": False}

    def on_trial(p) -> None:
        try:
            ctx.progress(min(1.0, p.done / max(1, p.done + p.running + p.waiting)), f"{p.done} trials done")
        except JobCancelled:
            cancelled["now"] = True

    run = run_trials(spec["storage"], spec["study"], worker=f"job-{ctx.job_id}-{ctx.attempt}",
                     on_trial=on_trial, stop=lambda: cancelled["now"], wait_for_others=False)
    if cancelled["now"]:
        raise JobCancelled(ctx.job_id)
    return JobOutput({"ran": run.ran, "completed": run.completed, "failed": run.failed,
                      "study_done": run.progress.done})


def has_train_data(spec: Any) -> bool:
    """Whether a `bitsearch.SearchSpec` names training data: a train role, or a zoo data set (they have a train
    split; an uploaded .npz has none unless a train role names one)."""
    from zoo.models import get_model_spec

    train = spec.roles.train
    if train is not None:
        return True
    data = spec.data
    if data is None and isinstance(spec.model, str) and spec.model.startswith("zoo:"):
        data = get_model_spec(spec.model).dataset
    return isinstance(data, str) and data.startswith("zoo:")


def measured_context(sf: Any, search_id: str, ctx: Any) -> dict[str, Any]:
    """What a search job gives the measured solvers: the study in the service's database (named after the
    search, so a re-run job resumes it), the job's folder (QBitOpt's checkpoints) and a way to fan trials out
    as "study-trials" jobs."""
    from service.jobs.dispatch import submit_job
    from service.settings import get_settings

    settings = get_settings()

    def submit_trial_jobs(url: str, study: str, n: int) -> list[str]:
        key = f"study-trial-jobs-{study}"
        marker = Path(ctx.workdir) / f"{key}.json"
        if marker.exists():  # a re-run of this job: its trial jobs were queued by the first attempt
            return json.loads(marker.read_text())
        ids = [submit_job(sf, "study-trials", {"storage": url, "study": study}, settings=settings).id
               for _ in range(n)]
        marker.write_text(json.dumps(ids))
        return ids

    return {"storage": study_url(settings.db_url), "study": f"search-{search_id}", "workdir": ctx.workdir,
            "submit_trial_jobs": submit_trial_jobs, "worker": f"job-{ctx.job_id}-{ctx.attempt}"}


__all__ = [
    "MEASURED_SOLVERS",
    "check_servable",
    "has_train_data",
    "measured_context",
    "run_study_trials",
    "run_bomp_nas",
    "run_qbitopt",
    "study_url",
]
