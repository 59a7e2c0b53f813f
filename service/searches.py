"""The service's operations on searches and schedules, called by the REST routes and the dashboard alike.

No FastAPI here: an operation takes the session factory, the settings and the caller's tenant, and raises
`BitsearchError` (422) or one of the errors below, each with the HTTP status it means. Multi-step changes
run in one database transaction, so they commit or roll back together: a search with its job and link, a
batch of fine-tuning jobs (all or none: a retry after a failure never duplicates jobs), a schedule with its
owner. The broker is told only after the commit; when it cannot be told, the rows are undone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from db import jobs as job_repo
from db import repo
from db.models import Job, JobStatus, Schedule, new_id
from db.session import transaction
from db.tables import Search, StoredDataset, StoredModel
from quant.errors import BitsearchError
from service.jobs.dispatch import queue_for, send
from service.jobs.quotas import check_job_quota
from service.settings import Settings

ORPHAN_AFTER = timedelta(seconds=30)  # a search whose job was never queued (crash in between) gets one


class NotFound(BitsearchError):
    status = 404


class Conflict(BitsearchError):
    status = 409


class Unavailable(BitsearchError):
    status = 503


class InvalidSpec(BitsearchError):
    """A stored spec that does not validate; `detail` lists the errors as the API reports them."""

    status = 422

    def __init__(self, detail: list[dict[str, Any]]):
        super().__init__("; ".join(str(e["msg"]) for e in detail))
        self.detail = detail


# --- references to stored files ---------------------------------------------------------------------------


def abs_path(settings: Settings, rel: str) -> Path:
    return (settings.data_dir.expanduser() / rel).resolve()


def resolve_model(sf, settings: Settings, tenant_id: str, ref: str) -> dict[str, Any]:
    """`{"model", "weights"}` for a job, from 'zoo:NAME' or the id of one of the tenant's uploaded models."""
    if ref.startswith("zoo:"):
        from zoo.models import get_model_spec

        get_model_spec(ref)  # BitsearchError (422) when unknown
        return {"model": ref, "weights": None}
    row = repo.get_upload(sf, StoredModel, tenant_id, ref)
    if row is None:
        raise BitsearchError(f"unknown model {ref!r}: give zoo:NAME or the id of one of your uploaded models")
    path = str(abs_path(settings, row.path))
    if row.format in ("pt2", "hf-zip"):  # the file is the whole model
        return {"model": path, "weights": None}
    return {"model": row.architecture, "weights": path}


def resolve_data(sf, settings: Settings, tenant_id: str, ref: str | None) -> dict[str, Any]:
    """`{"data"}` for a job: 'zoo:NAME', the path of one of the tenant's uploaded datasets, 'none' or None."""
    if ref is None or ref == "none":  # the model's own zoo data set / data-free
        return {"data": ref}
    if ref.startswith("zoo:"):
        from zoo.data import DATASETS

        if ref[4:] not in DATASETS:
            raise BitsearchError(
                f"unknown zoo data set {ref!r}; known: {sorted('zoo:' + k for k in DATASETS)}"
            )
        return {"data": ref}
    row = repo.get_upload(sf, StoredDataset, tenant_id, ref)
    if row is None:
        raise BitsearchError(
            f"unknown data set {ref!r}: give zoo:NAME, the id of one of your uploaded data "
            "sets, 'none' (data-free) or null (the model's own zoo data set)"
        )
    return {"data": str(abs_path(settings, row.path))}


# --- searches -------------------------------------------------------------------------------------------------


def job_spec(sf, settings: Settings, tenant_id: str, body, search_id: str | None) -> dict[str, Any]:
    """The checked job spec of a `SearchRequest`: uploads resolved to stored files, then refused (422) for
    anything the worker would refuse later."""
    from service.api.search_job import build_spec, check_spec

    if getattr(body, "latency_table_id", None) is not None:  # a stored table is copied into the search
        from db import latency as lat_repo

        row = lat_repo.get(sf, tenant_id, body.latency_table_id)
        if row is None:
            raise NotFound(f"no latency table {body.latency_table_id!r}")
        body = body.model_copy(update={"latency_table": row.table, "latency_table_id": None})
    model = resolve_model(sf, settings, tenant_id, body.model)
    data = resolve_data(sf, settings, tenant_id, body.data)["data"]
    roles = {r: resolve_data(sf, settings, tenant_id, src)["data"] for r, src in body.roles.sources().items()}
    check_label_range(sf, tenant_id, body.model, [body.data, *body.roles.sources().values()])
    spec = build_spec(body, model, data, roles, search_id=search_id, tenant_id=tenant_id)
    check_spec(spec)
    return spec


def check_label_range(sf, tenant_id: str, model_ref: str, data_refs: list[str | None]) -> None:
    """Uploaded data sets whose labels reach beyond the model's classes are refused before anything runs."""
    if model_ref.startswith("zoo:"):
        from zoo.models import get_model_spec

        classes = get_model_spec(model_ref).num_classes
    else:
        row = repo.get_upload(sf, StoredModel, tenant_id, model_ref)
        classes = (row.info or {}).get("num_classes") if row is not None else None
    if not isinstance(classes, int):
        return
    for ref in data_refs:
        if ref is None or ref == "none" or ref.startswith("zoo:"):
            continue
        row = repo.get_upload(sf, StoredDataset, tenant_id, ref)
        labels = (row.info or {}).get("classes") if row is not None else None
        if isinstance(labels, int) and labels > classes:
            raise BitsearchError(
                f"data set {ref} has labels up to {labels - 1}, but the model has {classes} classes "
                f"(0..{classes - 1})"
            )


def _hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Submitted:
    search_id: str
    job_id: str | None
    status: str
    created: bool


def submit_search(sf, settings: Settings, tenant_id: str, body, idempotency_key: str | None = None) -> Submitted:
    """Store a search with its queued job (one transaction) and hand the job to the broker. The same
    `idempotency_key` with the same body gives the same search and no second job."""
    req = body.model_dump(mode="json")
    search_id = new_id()
    spec = job_spec(sf, settings, tenant_id, body, search_id)
    check_job_quota(sf, tenant_id, "search", spec, settings)  # bounds, then the tenant's quotas (429)
    queue = queue_for("search", settings)
    try:
        search, created = repo.create_search(
            sf, search_id=search_id, tenant_id=tenant_id, model_ref=body.model, data_ref=body.data, request=req,
            spec=spec, idempotency_key=idempotency_key, request_hash=_hash(req) if idempotency_key else None,
            new_job=repo.NewJob("search", spec, queue, settings.max_attempts),
        )
    except repo.IdempotencyConflict as exc:
        raise BitsearchError(
            f"the Idempotency-Key was already used for a different request (search {exc.search.id}); "
            "use a new key for a new search"
        ) from None
    job_id = search.job_id
    if created:
        try:
            send(job_id, queue, settings)  # with a broker; local workers find the committed row themselves
        except Exception as exc:
            job_repo.cancel(sf, job_id)  # never sent: no worker will ever take it
            repo.delete_search_row(sf, tenant_id, search.id)
            raise Unavailable(f"could not queue the search ({type(exc).__name__}); try again") from None
        return Submitted(search.id, job_id, "queued", True)
    created_at = search.created_at if search.created_at.tzinfo else search.created_at.replace(tzinfo=timezone.utc)
    if job_id is None and datetime.now(timezone.utc) - created_at > ORPHAN_AFTER:
        job_id = queue_jobs(sf, settings, tenant_id, search.id, [("search", None, search.spec)])[0]
    view = repo.get_search(sf, tenant_id, search.id)
    status = view.job.status.value if view is not None and view.job is not None else "queued"
    return Submitted(search.id, job_id, status, False)


def queue_jobs(sf, settings: Settings, tenant_id: str, search_id: str,
                jobs: list[tuple[str, int | None, dict[str, Any]]]) -> list[str]:
    """Insert `jobs` ((kind, point index, spec)) and their links to the search in one transaction, then send
    them; when sending fails, every one of them is cancelled (no half-queued batch stays behind)."""
    queued: list[tuple[str, str]] = []
    with transaction(sf, write=True) as s:
        if s.get(Search, search_id) is None:
            raise NotFound(f"no search {search_id!r}")
        for kind, point, spec in jobs:
            queue = queue_for(kind, settings)
            job = Job(id=new_id(), kind=kind, spec=spec, queue=queue, max_attempts=settings.max_attempts,
                      tenant_id=tenant_id)
            s.add(job)
            s.flush()
            repo.link_job(s, search_id, job.id, tenant_id, kind, point)
            queued.append((job.id, queue))
    try:
        for job_id, queue in queued:
            send(job_id, queue, settings)
    except Exception as exc:
        for job_id, _ in queued:
            job_repo.cancel(sf, job_id)
        raise Unavailable(f"could not queue the jobs ({type(exc).__name__}); try again") from None
    return [job_id for job_id, _ in queued]


def search_view(sf, tenant_id: str, search_id: str, finetunes: bool = False) -> repo.SearchView:
    view = repo.get_search(sf, tenant_id, search_id, finetunes=finetunes)
    if view is None:
        raise NotFound(f"no search {search_id!r}")
    return view


def finetune(sf, settings: Settings, tenant_id: str, search_id: str, points: list[int] | None,
             recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Queue one "qat" job per point (default: the recommended ones) of a finished search, all in one
    transaction; returns [{"point", "job_id"}]."""
    from service.api.search_job import finetune_specs

    view = search_view(sf, tenant_id, search_id)
    if view.job is None or view.job.status != JobStatus.succeeded:
        status = view.job.status.value if view.job else "queued"
        raise Conflict(
            f"search {search_id} has not succeeded (status: {status}); fine-tune its points once it has"
        )
    if points is None and not any(p.recommended for p in repo.get_points(sf, tenant_id, search_id)):
        raise BitsearchError("the search recommended no point; name the points to fine-tune")
    specs = finetune_specs(sf, view.search.spec, search_id, tenant_id, points, recipe)
    check_job_quota(sf, tenant_id, "qat", {"recipe": recipe}, settings, jobs=len(specs))
    ids = queue_jobs(sf, settings, tenant_id, search_id, [("qat", p, spec) for p, spec in specs])
    return [{"point": p, "job_id": j} for (p, _), j in zip(specs, ids)]


def delete_search(sf, tenant_id: str, search_id: str) -> None:
    """Cancel the search's jobs (search, trial runners and fine-tuning) and stop its study, then delete it and
    its results."""
    view = search_view(sf, tenant_id, search_id)
    for job_id in repo.search_job_ids(sf, tenant_id, search_id):
        job_repo.cancel(sf, job_id)
    _stop_study(sf, view.search)
    repo.delete_search_row(sf, tenant_id, search_id)


def cancel_job(sf, tenant_id: str, job_id: str) -> Job | None:
    """Cancel one of the tenant's jobs: a queued one at once, a running one at its next progress report. A
    search's own job takes the search's trial jobs (bayes, bomp-nas) with it, queued and running, and its study
    is marked stopped, so no worker starts another trial; trials already finished stay stored."""
    from db.tables import SearchJob
    from sqlalchemy import select

    if repo.get_job(sf, tenant_id, job_id) is None:
        raise NotFound(f"no job {job_id!r}")
    cancelled = job_repo.cancel(sf, job_id)
    search = repo.search_for_job(sf, job_id)
    if search is not None and search.tenant_id == tenant_id:
        with transaction(sf) as s:
            trial_jobs = list(s.scalars(select(SearchJob.job_id).where(SearchJob.search_id == search.id,
                                                                         SearchJob.role == "study-trials")))
        _stop_study(sf, search)  # first: a runner between trials asks the study before it asks for a trial
        for trial_job in trial_jobs:
            job_repo.cancel(sf, trial_job)
    return cancelled


def _stop_study(sf, search: Search) -> None:
    """Mark the study of a fan-out search stopped (no-op for other solvers). The study lives beside the database
    `sf` opens (`service.measured_search.study_url`)."""
    from service.measured_search import FANOUT_SOLVERS, stop_search_study

    solver = (search.spec or {}).get("solver") if isinstance(search.spec, dict) else None
    name = solver.get("name") if isinstance(solver, dict) else solver
    if name in FANOUT_SOLVERS:
        db_url = sf.kw["bind"].url.render_as_string(hide_password=False)
        stop_search_study(search.id, db_url, reason="search cancelled")


# --- schedules ------------------------------------------------------------------------------------------------


def _validated(model, spec: dict[str, Any]):
    from pydantic import ValidationError

    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        raise InvalidSpec(
            [{"loc": ["body", "spec", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        ) from None


def schedule_spec(sf, settings: Settings, tenant_id: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
    """The job spec a schedule stores: a checked search spec (kind "search", `request` a SearchRequest) or a
    uniform PTQ (kind "ptq", a PTQRequest)."""
    from service.api.schemas import PTQRequest, SearchRequest

    if kind == "search":
        return job_spec(sf, settings, tenant_id, _validated(SearchRequest, request), None)
    req = _validated(PTQRequest, request)
    model = resolve_model(sf, settings, tenant_id, req.model)
    return {
        "model": model["model"],
        "weights": model["weights"],
        "data": resolve_data(sf, settings, tenant_id, req.data)["data"],
        "bits": req.bits,
        "calib_size": req.calib_size,
        "limit": req.eval_limit,
        "_request": req.model_dump(mode="json"),
    }


def add_schedule(sf, settings: Settings, tenant_id: str, name: str, cron: str, kind: str, request: dict[str, Any],
                 enabled: bool = True) -> Schedule:
    """A schedule with its owner and state, inserted at once (never enabled and owner-less, even briefly)."""
    from service.schedules import check_cron

    queue_for(kind, settings)
    spec = schedule_spec(sf, settings, tenant_id, kind, request)
    if not name.strip():
        raise BitsearchError("a schedule needs a name")
    with transaction(sf, write=True) as s:
        sched = Schedule(name=name.strip(), cron=check_cron(cron), kind=kind, spec=spec, queue="cpu",
                         enabled=enabled, tenant_id=tenant_id)
        s.add(sched)
        s.flush()
        s.refresh(sched)
        s.expunge(sched)
        return sched
