"""Rows to response bodies (no SQL here: rows come from `db.repo`)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from fastapi import HTTPException, Request

from db.models import Job, Schedule
from db.repo import SearchView
from db.tables import ParetoPoint, StoredDataset, StoredModel

from .schemas import DatasetOut, JobOut, ModelOut, PointOut, ScheduleOut, SearchOut, Timings

ID_RE = re.compile(r"^[0-9a-f]{32}$")


def check_id(value: str, what: str) -> str:
    """Ids are 32 hex digits; anything else cannot exist (404, like another tenant's id)."""
    if not ID_RE.match(value):
        raise HTTPException(404, f"no {what} {value[:64]!r}")
    return value


@contextmanager
def http_errors() -> Iterator[None]:
    """The service layer's errors as HTTP errors (their `status`); other `BitsearchError`s stay 422s."""
    from quant.errors import BitsearchError

    try:
        yield
    except BitsearchError as exc:
        status = getattr(exc, "status", None)
        if status is None:
            raise
        raise HTTPException(status, getattr(exc, "detail", str(exc))) from None


def not_found(what: str, value: str) -> HTTPException:
    return HTTPException(404, f"no {what} {value!r}")


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    a, b = _aware(a), _aware(b)
    if a is None or b is None:
        return None
    return max(0.0, (b - a).total_seconds())


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        kind=job.kind,
        queue=job.queue,
        status=job.status.value,
        progress=job.progress,
        message=job.message or "",
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        result=job.result,
        schedule_id=job.schedule_id,
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        finished_at=_aware(job.finished_at),
        heartbeat_at=_aware(job.heartbeat_at),
    )


def _route_paths(routes: Any) -> dict[str, str]:
    """{route name: path template}, through included routers (all mounted without a prefix here); a name
    not found falls back to Starlette's `url_for`."""
    out: dict[str, str] = {}
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI keeps an included router whole
        if inner is not None:
            for k, v in _route_paths(inner.routes).items():
                out.setdefault(k, v)
        elif getattr(r, "name", None) and hasattr(r, "path_format"):
            out.setdefault(r.name, r.path_format)
    return out


def url_for(request: Request, name: str, **params: Any) -> str:
    """`request.url_for` for routes whose parameters are plain ids and numbers, from a per-app table of path
    templates: Starlette's own walks every route on every call, a noticeable share of a status poll."""
    paths = getattr(request.app.state, "route_paths", None)
    if paths is None:
        paths = request.app.state.route_paths = _route_paths(request.app.routes)
    template = paths.get(name)
    if template is None:
        return str(request.url_for(name, **params))
    base = request.scope.get("bitsearch.base_url")
    if base is None:
        base = request.scope["bitsearch.base_url"] = str(request.base_url).rstrip("/")
    return base + template.format(**{k: str(v) for k, v in params.items()})


def search_links(request: Request, search_id: str) -> dict[str, str]:
    return {
        "self": url_for(request, "get_search", search_id=search_id),
        "sensitivity": url_for(request, "get_sensitivity", search_id=search_id),
        "pareto": url_for(request, "get_pareto", search_id=search_id),
        "finetune": url_for(request, "finetune", search_id=search_id),
    }


def search_out(request: Request, view: SearchView) -> SearchOut:
    s, job = view.search, view.job
    now = datetime.now(timezone.utc)
    if job is None:
        status, progress, message, error, attempts = "queued", 0.0, "waiting to be queued", None, 0
        started = finished = None
    else:
        status, progress, message, error, attempts = (
            job.status.value,
            job.progress,
            job.message or "",
            job.error,
            job.attempts,
        )
        started, finished = job.started_at, job.finished_at
    run_end = finished or (now if started is not None else None)
    return SearchOut(
        id=s.id,
        status=status,
        progress=progress,
        message=message,
        error=error,
        model=s.model_ref,
        data=s.data_ref,
        job_id=s.job_id,
        attempts=attempts,
        timings=Timings(
            created_at=_aware(s.created_at),
            started_at=_aware(started),
            finished_at=_aware(finished),
            queued_seconds=_seconds(s.created_at, started),
            run_seconds=_seconds(started, run_end),
        ),
        request=s.request,
        summary=s.summary,
        links=search_links(request, s.id),
        finetune_jobs=[
            {
                "job_id": j.id,
                "point": link.point_index,
                "status": j.status.value,
                "progress": j.progress,
                "url": url_for(request, "get_job", job_id=j.id),
            }
            for link, j in (view.finetunes or [])
        ],
    )


def point_out(request: Request, search_id: str, p: ParetoPoint) -> PointOut:
    url = None
    if p.allocation_id is not None:
        url = url_for(request, "get_allocation", search_id=search_id, point=p.index)
    extra: dict[str, Any] = {
        k: v
        for k, v in (p.data or {}).items()
        if k not in ("index", "kind", "label", "predicted", "recommended", "allocation_url")
    }
    return PointOut(
        index=p.index,
        kind=p.kind,
        label=p.label,
        predicted=p.predicted,
        recommended=p.recommended,
        allocation_url=url,
        **extra,
    )


def model_out(row: StoredModel) -> ModelOut:
    return ModelOut(
        id=row.id,
        name=row.name,
        format=row.format,
        architecture=row.architecture,
        filename=row.filename,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        info=row.info or {},
        created_at=_aware(row.created_at),
    )


def dataset_out(row: StoredDataset) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        filename=row.filename,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        info=row.info or {},
        created_at=_aware(row.created_at),
    )


def schedule_out(row: Schedule) -> ScheduleOut:
    spec = row.spec or {}
    return ScheduleOut(
        id=row.id,
        name=row.name,
        cron=row.cron,
        kind=row.kind,
        enabled=row.enabled,
        request=spec.get("_request"),
        created_at=_aware(row.created_at),
        last_tick=_aware(row.last_tick),
    )
