"""The service's side of the measured searches (`search.measured`): where their studies live, the job kind
that lets any worker run trials of a fan-out study, and a read of a search's trials.

A bayes or BOMP-NAS study lives in the service's own database: PostgreSQL (Optuna's tables in their own schema),
or, with an SQLite database, a file beside it. The search job queues `workers - 1` "study-trials" jobs, linked to
the search and owned by its tenant; each runs trials until the study is done (`search.trials.run_trials`), so
trials spread over the local pool or Celery workers, and a worker killed mid-trial costs one re-run of that
trial, never a double count. A bayes trial worker rebuilds the scorer from the search's own spec (the
"search-spec" scorer builder below: the same model, data roles and quantization config as the search job).

Cancelling the search's job cancels its trial jobs and marks its study stopped (`service.searches.cancel_job`):
no runner starts another trial, running ones stop at their next check, and the trials already finished stay
in the study (`service.trial_views` reads them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from quant.errors import BitsearchError
from search.measured import (  # noqa: F401  (re-exported for the service)
    MEASURED_SOLVERS,
    bayes_scorer,
    bayes_solver_options,
    bits_history,
    check_servable,
    run_bomp_nas,
    run_qbitopt,
)
from search.solvers.scorers import register_scorer_builder

#: Solvers whose search keeps a fan-out study in the service database (its trials run as "study-trials" jobs).
FANOUT_SOLVERS = ("bayes", "bomp-nas")
SCORER_BUILDER = "search-spec"


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


def study_name(search_id: str) -> str:
    """The study of a search (a re-run of its job resumes it)."""
    return f"search-{search_id}"


def run_study_trials(spec: dict[str, Any], ctx: Any) -> Any:
    """The "study-trials" job kind: run trials of the fan-out study `spec["study"]` in `spec["storage"]` until
    nothing is left to start. The job's cancellation ends it (a running trial at its next check), and so does
    the study being marked stopped."""
    import search.solvers.bayes  # noqa: F401  (registers the bayes trial objective)
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
                     on_trial=on_trial, stop=lambda: cancelled["now"] or not ctx.wanted(), wait_for_others=False)
    if cancelled["now"] or run.cancelled:
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
    search, so a re-run job resumes it), the job's folder (QBitOpt's checkpoints), a way to fan trials out as
    "study-trials" jobs of the search, how a bayes trial worker rebuilds the scorer (the job's own spec), and
    the job's cancellation (`stop`: asked between and inside trials; `on_cancel`: ends the job cancelled)."""
    from db import jobs as job_repo
    from db import repo
    from service.jobs.dispatch import submit_job
    from service.jobs.kinds import JobCancelled
    from service.settings import get_settings

    settings = get_settings()
    job = job_repo.get(sf, ctx.job_id)
    job_spec = dict(job.spec) if job is not None else {}

    def submit_trial_jobs(url: str, study: str, n: int) -> list[str]:
        key = f"study-trial-jobs-{study}"
        marker = Path(ctx.workdir) / f"{key}.json"
        if marker.exists():  # a re-run of this job: its trial jobs were queued by the first attempt
            return json.loads(marker.read_text())
        spec = {"storage": url, "study": study}
        tenant = job.tenant_id if job is not None else None
        if tenant is not None and repo.search_exists(sf, search_id):
            from service.searches import queue_jobs

            # linked to the search and owned by its tenant: cancelling or deleting the search reaches them
            ids = queue_jobs(sf, settings, tenant, search_id, [("study-trials", None, spec)] * n)
        else:  # a search job from outside the service (CLI): nothing to link them to
            ids = [submit_job(sf, "study-trials", spec, settings=settings).id for _ in range(n)]
        marker.write_text(json.dumps(ids))
        return ids

    def on_cancel() -> None:
        raise JobCancelled(ctx.job_id)

    # Trial heartbeats follow the job system's: a trial whose runner died is re-run about when its job would be.
    trial_heartbeat = max(1, math.ceil(settings.heartbeat_interval))
    trial_grace = max(trial_heartbeat + 1, math.ceil(settings.stale_after))
    scorer_ref = {"builder": SCORER_BUILDER,
                  "config": {"spec": {k: v for k, v in job_spec.items() if not str(k).startswith("_")}}}
    return {"storage": study_url(settings.db_url), "study": study_name(search_id), "workdir": ctx.workdir,
            "submit_trial_jobs": submit_trial_jobs, "worker": f"job-{ctx.job_id}-{ctx.attempt}",
            "scorer_ref": scorer_ref if job_spec else None, "stop": lambda: not ctx.wanted(),
            "on_cancel": on_cancel, "trial_heartbeat": trial_heartbeat, "trial_grace": trial_grace}


@register_scorer_builder(SCORER_BUILDER)
def scorer_from_search_spec(config: dict[str, Any]) -> Any:
    """A bayes trial worker's scorer: the search spec's model, data roles (same seeds, so the same selection
    split) and quantization config, and its scorer settings, exactly as the search job built them."""
    from bitsearch.pipeline import prepare
    from bitsearch.spec import SearchSpec
    from quant import QuantConfig

    s = SearchSpec.parse(config["spec"])
    loaded, resolved = prepare(s)
    quant_config = QuantConfig.from_dict(s.quant) if s.quant else QuantConfig()
    return bayes_scorer(dict(s.solver.settings), loaded.model, resolved.calibration, resolved.selection,
                        resolved.train, quant_config)


def stop_search_study(search_id: str, db_url: str | None = None, reason: str = "search cancelled") -> bool:
    """Mark a search's study stopped (no runner starts another trial); False when it has none."""
    from search.trials import stop_study
    from service.settings import get_settings

    url = study_url(db_url or get_settings().db_url)
    if url.startswith("sqlite:///") and not Path(url.split(":///", 1)[1]).exists():
        return False
    return stop_study(url, study_name(search_id), reason)


__all__ = [
    "FANOUT_SOLVERS",
    "MEASURED_SOLVERS",
    "scorer_from_search_spec",
    "stop_search_study",
    "study_name",
    "check_servable",
    "has_train_data",
    "measured_context",
    "run_study_trials",
    "run_bomp_nas",
    "run_qbitopt",
    "study_url",
]
