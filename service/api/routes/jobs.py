"""The tenant's jobs (searches, fine-tuning, scheduled runs): list, show, cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from db import repo

from .. import views
from ..deps import SF, Limit, Offset, TenantId
from ..schemas import JobOut, Page

router = APIRouter(tags=["jobs"])
JobId = Annotated[str, Path(max_length=64)]


@router.get("/jobs", response_model=Page[JobOut])
def list_jobs(
    tenant: TenantId,
    sf: SF,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query()
    ] = None,
    kind: Annotated[str | None, Query(max_length=32, pattern=r"^[a-z0-9_\-]+$")] = None,
) -> Page[JobOut]:
    rows, total = repo.list_jobs(sf, tenant, status, kind, limit, offset)
    return Page(items=[views.job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut, name="get_job")
def get_job(job_id: JobId, tenant: TenantId, sf: SF) -> JobOut:
    views.check_id(job_id, "job")
    job = repo.get_job(sf, tenant, job_id)
    if job is None:
        raise views.not_found("job", job_id)
    return views.job_out(job)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, tenant: TenantId, sf: SF) -> JobOut:
    """Cancel a queued job at once; a running one stops at its next progress report (seconds). A search's own
    job takes the search's trial jobs with it (bayes, bomp-nas), and its study starts no further trial; the
    trials already finished stay stored."""
    from service import searches as service

    views.check_id(job_id, "job")
    if repo.get_job(sf, tenant, job_id) is None:
        raise views.not_found("job", job_id)
    return views.job_out(service.cancel_job(sf, tenant, job_id))
