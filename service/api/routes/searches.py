"""Searches: submit (idempotent), list, status, results, fine-tuning, delete."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response

from db import repo
from service import searches as service
from service import trial_views

from .. import views
from ..deps import SF, Limit, Offset, SettingsDep, TenantId
from ..schemas import (
    BitsHistoryOut,
    FinetuneAccepted,
    FinetuneRequest,
    Page,
    ParetoOut,
    SearchAccepted,
    SearchOut,
    SearchRequest,
    SensitivityOut,
    TrialsOut,
)

router = APIRouter(tags=["searches"])
SearchId = Annotated[str, Path(max_length=64)]


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
    with views.http_errors():
        done = service.submit_search(sf, settings, tenant, body, idempotency_key)
    if not done.created:
        response.headers["Idempotent-Replayed"] = "true"
    url = views.url_for(request, "get_search", search_id=done.search_id)
    response.headers["Location"] = url
    return SearchAccepted(id=done.search_id, url=url, status=done.status, job_id=done.job_id)


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


def _view(sf, tenant: str, search_id: str, finetunes: bool = False) -> repo.SearchView:
    views.check_id(search_id, "search")
    with views.http_errors():
        return service.search_view(sf, tenant, search_id, finetunes)


@router.get("/searches/{search_id}", response_model=SearchOut, name="get_search")
def get_search(search_id: SearchId, request: Request, tenant: TenantId, sf: SF) -> SearchOut:
    """Status, progress, timings and errors of a search (and of its fine-tuning jobs)."""
    return views.search_out(request, _view(sf, tenant, search_id, finetunes=True))


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


@router.get("/searches/{search_id}/trials", response_model=TrialsOut, name="get_trials")
def get_trials(search_id: SearchId, tenant: TenantId, sf: SF, settings: SettingsDep) -> TrialsOut:
    """The trials of a `bayes` or `bomp-nas` search's study, as they finish: score, cost, bits (and
    architecture), Pareto-optimal ones marked, and the study's progress."""
    views.check_id(search_id, "search")
    with views.http_errors():
        found = trial_views.search_trials(sf, settings, tenant, search_id)
    return TrialsOut.model_validate(asdict(found))


@router.get("/searches/{search_id}/bits-history", response_model=BitsHistoryOut, name="get_bits_history")
def get_bits_history(search_id: SearchId, tenant: TenantId, sf: SF, settings: SettingsDep) -> BitsHistoryOut:
    """A `qbitopt` search's per-layer bits at each re-allocation during its quantization-aware training."""
    views.check_id(search_id, "search")
    with views.http_errors():
        found = trial_views.search_bits_history(sf, settings, tenant, search_id)
    return BitsHistoryOut.model_validate(asdict(found))


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
    views.check_id(search_id, "search")
    with views.http_errors():
        jobs = service.finetune(sf, settings, tenant, search_id, body.points, body.recipe.model_dump(mode="json"))
    for j in jobs:
        j["url"] = views.url_for(request, "get_job", job_id=j["job_id"])
    return FinetuneAccepted(search_id=search_id, jobs=jobs)


@router.delete("/searches/{search_id}", status_code=204)
def delete_search(search_id: SearchId, tenant: TenantId, sf: SF) -> Response:
    """Cancel the search's jobs (search and fine-tuning), then delete it and its results."""
    views.check_id(search_id, "search")
    with views.http_errors():
        service.delete_search(sf, tenant, search_id)
    return Response(status_code=204)
