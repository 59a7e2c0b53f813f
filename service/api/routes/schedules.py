"""Cron schedules of searches (or uniform PTQ runs) owned by the tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from db import repo
from service import searches as service

from .. import views
from ..deps import SF, Limit, Offset, SettingsDep, TenantId
from ..schemas import Page, ScheduleIn, ScheduleOut

router = APIRouter(tags=["schedules"])
ScheduleId = Annotated[str, Path(max_length=64)]


@router.post("/schedules", status_code=201, response_model=ScheduleOut)
def add_schedule(body: ScheduleIn, tenant: TenantId, sf: SF, settings: SettingsDep) -> ScheduleOut:
    """Run a search (`kind: search`, `spec`: a SearchRequest) or a PTQ (`kind: ptq`) at each cron tick."""
    with views.http_errors():
        sched = service.add_schedule(sf, settings, tenant, body.name, body.cron, body.kind, body.spec, body.enabled)
    return views.schedule_out(repo.get_schedule(sf, tenant, sched.id))


@router.get("/schedules", response_model=Page[ScheduleOut])
def list_schedules(tenant: TenantId, sf: SF, limit: Limit = 50, offset: Offset = 0) -> Page[ScheduleOut]:
    rows, total = repo.list_schedules(sf, tenant, limit, offset)
    return Page(items=[views.schedule_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/schedules/{schedule_id}", response_model=ScheduleOut)
def get_schedule(schedule_id: ScheduleId, tenant: TenantId, sf: SF) -> ScheduleOut:
    views.check_id(schedule_id, "schedule")
    row = repo.get_schedule(sf, tenant, schedule_id)
    if row is None:
        raise views.not_found("schedule", schedule_id)
    return views.schedule_out(row)


@router.delete("/schedules/{schedule_id}", status_code=204)
def delete_schedule(schedule_id: ScheduleId, tenant: TenantId, sf: SF) -> Response:
    """Stop the schedule; the jobs it already started stay (and stay yours)."""
    views.check_id(schedule_id, "schedule")
    if not repo.delete_schedule(sf, tenant, schedule_id):
        raise views.not_found("schedule", schedule_id)
    return Response(status_code=204)
