"""Searches: submit (idempotent), list, status, results, fine-tuning, delete."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response

from db import jobs as job_repo
from db import repo
from db.models import JobStatus, new_id
from quant.errors import BitsearchError
from service.jobs.dispatch import queue_for, send, submit_job

from .. import views
from ..deps import SF, Limit, Offset, SettingsDep, TenantId, resolve_data, resolve_model
from ..schemas import (
    FinetuneAccepted,
    FinetuneRequest,
    Page,
    ParetoOut,
    SearchAccepted,
    SearchOut,
    SearchRequest,
    SensitivityOut,
)
from ..search_job import build_spec, check_spec, submit_finetunes
from .export import stored_latency_table

router = APIRouter(tags=["searches"])
SearchId = Annotated[str, Path(max_length=64)]
ORPHAN_AFTER = timedelta(seconds=30)  # a search whose job was never queued (crash in between) gets one


def _hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _submit(sf, settings, tenant: str, search_id: str, spec: dict) -> str:
    try:
        job = submit_job(sf, "search", spec, settings=settings)
    except Exception as exc:
        raise HTTPException(503, f"could not queue the search ({type(exc).__name__}); try again") from None
    repo.link_job(sf, search_id, job.id, tenant, "search")
    return job.id


@router.post(
    "/search",
    status_code=202,
    response_model=SearchAccepted,
    responses={422: {"description": "Invalid request, or an Idempotency-Key reused with another body"}},
)
def create_search(
    body: SearchRequest,
    request: Request,
    response: Response,
    tenant: TenantId,
    sf: SF,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> SearchAccepted:
    """Start a search. The same `Idempotency-Key` with the same body gives the same search (no second job)."""
    req = body.model_dump(mode="json")
    if body.latency_table_id is not None:  # the stored table is copied into the search
        req["latency_table"] = stored_latency_table(sf, tenant, body.latency_table_id)
    model = resolve_model(sf, settings, tenant, body.model)
    data = resolve_data(sf, settings, tenant, body.data)
    search_id = new_id()
    spec = build_spec(req, model, data, search_id=search_id, tenant_id=tenant)
    check_spec(spec)
    queue = queue_for("search", settings)
    new_job = repo.NewJob("search", spec, queue, settings.max_attempts)
    try:
        search, created = repo.create_search(
            sf,
            search_id=search_id,
            tenant_id=tenant,
            model_ref=body.model,
            data_ref=body.data,
            request=req,
            spec=spec,
            idempotency_key=idempotency_key,
            request_hash=_hash(req) if idempotency_key else None,
            new_job=new_job,
        )
    except repo.IdempotencyConflict as exc:
        raise HTTPException(
            422,
            f"the Idempotency-Key was already used for a different request (search "
            f"{exc.search.id}); use a new key for a new search",
        ) from None
    job_id = search.job_id
    if created:
        try:
            send(job_id, queue, settings)  # with a broker; local workers find the committed row themselves
        except Exception as exc:
            job_repo.cancel(sf, job_id)  # never sent: no worker will ever take it
            repo.delete_search_row(sf, tenant, search.id)
            raise HTTPException(
                503, f"could not queue the search ({type(exc).__name__}); try again"
            ) from None
    else:
        response.headers["Idempotent-Replayed"] = "true"
        created_at = views._aware(search.created_at)
        if job_id is None and datetime.now(timezone.utc) - created_at > ORPHAN_AFTER:
            job_id = _submit(sf, settings, tenant, search.id, search.spec)
    url = views.url_for(request, "get_search", search_id=search.id)
    response.headers["Location"] = url
    status = "queued"
    if not created:
        view = repo.get_search(sf, tenant, search.id)
        status = view.job.status.value if view is not None and view.job is not None else "queued"
    return SearchAccepted(id=search.id, url=url, status=status, job_id=job_id)


@router.get("/searches", response_model=Page[SearchOut])
def list_searches(
    request: Request,
    tenant: TenantId,
    sf: SF,
    limit: Limit = 50,
    offset: Offset = 0,
    status: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query()
    ] = None,
    model: Annotated[
        str | None, Query(max_length=300, description="The model reference as submitted.")
    ] = None,
) -> Page[SearchOut]:
    rows, total = repo.list_searches(sf, tenant, status, model, limit, offset)
    return Page(items=[views.search_out(request, v) for v in rows], total=total, limit=limit, offset=offset)


def _view(sf, tenant: str, search_id: str) -> repo.SearchView:
    views.check_id(search_id, "search")
    view = repo.get_search(sf, tenant, search_id)
    if view is None:
        raise views.not_found("search", search_id)
    return view


@router.get("/searches/{search_id}", response_model=SearchOut, name="get_search")
def get_search(search_id: SearchId, request: Request, tenant: TenantId, sf: SF) -> SearchOut:
    """Status, progress, timings and errors of a search (and of its fine-tuning jobs)."""
    views.check_id(search_id, "search")
    view = repo.get_search(sf, tenant, search_id, finetunes=True)
    if view is None:
        raise views.not_found("search", search_id)
    return views.search_out(request, view)


@router.get("/searches/{search_id}/sensitivity", response_model=SensitivityOut, name="get_sensitivity")
def get_sensitivity(search_id: SearchId, tenant: TenantId, sf: SF) -> SensitivityOut:
    view = _view(sf, tenant, search_id)
    row = repo.get_sensitivity(sf, tenant, search_id)
    if row is None:
        status = view.job.status.value if view.job else "queued"
        raise HTTPException(404, f"search {search_id} has no sensitivity table (status: {status})")
    return SensitivityOut(search_id=search_id, method=row.method, table=row.table)


@router.get("/searches/{search_id}/pareto", response_model=ParetoOut, name="get_pareto")
def get_pareto(search_id: SearchId, request: Request, tenant: TenantId, sf: SF) -> ParetoOut:
    """The mixed-precision front (predicted and measured), the uniform baselines and the recommendations."""
    view = _view(sf, tenant, search_id)
    points = repo.get_points(sf, tenant, search_id)
    status = view.job.status.value if view.job else "queued"
    if not points and view.search.summary is None:
        raise HTTPException(404, f"search {search_id} has no results yet (status: {status})")
    out = [views.point_out(request, search_id, p) for p in points]
    summary = view.search.summary or {}
    return ParetoOut(
        search_id=search_id,
        status=status,
        points=[p for p in out if p.kind == "mixed"],
        uniform=[p for p in out if p.kind != "mixed"],
        recommendations=summary.get("recommendations") or [],
        front=summary.get("front") or {},
    )


@router.get(
    "/searches/{search_id}/allocations/{point}",
    name="get_allocation",
    responses={200: {"description": "An allocation JSON (schema bitsearch.allocation, version 1)"}},
)
def get_allocation(
    search_id: SearchId, point: Annotated[int, Path(ge=0, le=100_000)], tenant: TenantId, sf: SF
) -> dict:
    _view(sf, tenant, search_id)
    found = repo.get_point_allocation(sf, tenant, search_id, point)
    if found is None or found[1] is None:
        raise HTTPException(404, f"search {search_id} has no point {point} with an allocation")
    return found[1].allocation


@router.post(
    "/searches/{search_id}/finetune", status_code=202, response_model=FinetuneAccepted, name="finetune"
)
def finetune(
    search_id: SearchId,
    body: FinetuneRequest,
    request: Request,
    tenant: TenantId,
    sf: SF,
    settings: SettingsDep,
) -> FinetuneAccepted:
    """Quantization-aware fine-tuning (a "qat" job) of chosen points, by default the recommended ones."""
    view = _view(sf, tenant, search_id)
    if view.job is None or view.job.status != JobStatus.succeeded:
        status = view.job.status.value if view.job else "queued"
        raise HTTPException(
            409, f"search {search_id} has not succeeded (status: {status}); fine-tune its points once it has"
        )
    if body.points is None and not any(p.recommended for p in repo.get_points(sf, tenant, search_id)):
        raise HTTPException(422, "the search recommended no point; name the points to fine-tune")
    try:
        jobs = submit_finetunes(
            sf,
            view.search.spec,
            search_id,
            tenant,
            body.points,
            body.recipe.model_dump(mode="json"),
            settings,
        )
    except BitsearchError:
        raise
    except Exception as exc:
        raise HTTPException(503, f"could not queue fine-tuning ({type(exc).__name__}); try again") from None
    for j in jobs:
        j["url"] = views.url_for(request, "get_job", job_id=j["job_id"])
    return FinetuneAccepted(search_id=search_id, jobs=jobs)


@router.delete("/searches/{search_id}", status_code=204)
def delete_search(search_id: SearchId, tenant: TenantId, sf: SF) -> Response:
    """Cancel the search's jobs (search and fine-tuning), then delete it and its results."""
    _view(sf, tenant, search_id)
    for job_id in repo.search_job_ids(sf, tenant, search_id):
        job_repo.cancel(sf, job_id)
    repo.delete_search_row(sf, tenant, search_id)
    return Response(status_code=204)
