"""Repository functions of the REST service: all its SQL in one place.

Every function that reads or changes a user's rows takes `tenant_id` and filters on it, so a row of another
tenant is indistinguishable from a missing one (the API answers 404 for both). Rows are returned detached
(`expunge`d), ready to serialise after the session closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, TypeVar

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Job, JobStatus, Schedule, new_id, utcnow
from .session import transaction
from .tables import (
    AllocationRow,
    ApiKey,
    ParetoPoint,
    Search,
    SearchJob,
    SensitivityTableRow,
    StoredDataset,
    StoredModel,
    Tenant,
)

#: A session factory (each call is its own transaction) or a `Session` (the caller's unit of work).
SF = sessionmaker[Session] | Session
T = TypeVar("T")


def _detach(s: Session, rows: Iterable[T]) -> list[T]:
    out = list(rows)
    for r in out:
        s.expunge(r)
    return out


def ping(sf: SF) -> None:
    """Raise unless the database answers."""
    with transaction(sf) as s:
        s.execute(text("SELECT 1"))


# --- tenants and keys -------------------------------------------------------------------------------------


def ensure_tenant(sf: SF, name: str) -> Tenant:
    """The tenant called `name`, created when missing (safe under concurrent calls)."""
    with transaction(sf) as s:
        t = s.scalar(select(Tenant).where(Tenant.name == name))
        if t is not None:
            s.expunge(t)
            return t
    try:
        with transaction(sf, write=True) as s:
            t = Tenant(name=name)
            s.add(t)
            s.flush()
            s.expunge(t)
            return t
    except IntegrityError:
        with transaction(sf) as s:
            t = s.scalar(select(Tenant).where(Tenant.name == name))
            s.expunge(t)
            return t


def get_tenant(sf: SF, tenant_id: str) -> Tenant | None:
    with transaction(sf) as s:
        t = s.get(Tenant, tenant_id)
        if t is not None:
            s.expunge(t)
        return t


def add_api_key(sf: SF, tenant_id: str, prefix: str, key_hash: str, name: str = "") -> ApiKey:
    with transaction(sf, write=True) as s:
        k = ApiKey(tenant_id=tenant_id, prefix=prefix, key_hash=key_hash, name=name)
        s.add(k)
        s.flush()
        s.expunge(k)
        return k


def find_api_key(sf: SF, prefix: str) -> ApiKey | None:
    """The live (not revoked) key with this public prefix."""
    with transaction(sf) as s:
        k = s.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
        if k is not None:
            s.expunge(k)
        return k


def revoke_api_key(sf: SF, tenant_id: str, prefix: str) -> bool:
    with transaction(sf, write=True) as s:
        res = s.execute(
            update(ApiKey)
            .where(ApiKey.tenant_id == tenant_id, ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return res.rowcount == 1


# --- uploads (models and datasets share these) -------------------------------------------------------------

Upload = StoredModel | StoredDataset


def add_upload(sf: SF, cls: type[Upload], **fields: Any) -> Upload:
    with transaction(sf, write=True) as s:
        row = cls(**fields)
        s.add(row)
        s.flush()
        s.expunge(row)
        return row


def get_upload(sf: SF, cls: type[Upload], tenant_id: str, upload_id: str) -> Upload | None:
    with transaction(sf) as s:
        row = s.scalar(select(cls).where(cls.id == upload_id, cls.tenant_id == tenant_id))
        if row is not None:
            s.expunge(row)
        return row


def list_uploads(
    sf: SF, cls: type[Upload], tenant_id: str, limit: int, offset: int
) -> tuple[list[Upload], int]:
    with transaction(sf) as s:
        q = select(cls).where(cls.tenant_id == tenant_id)
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = _detach(s, s.scalars(q.order_by(cls.created_at.desc(), cls.id).limit(limit).offset(offset)))
        return rows, total


def delete_upload(sf: SF, cls: type[Upload], tenant_id: str, upload_id: str) -> Upload | None:
    """Delete the row and return it (the caller then removes its file), or None when there is none."""
    with transaction(sf, write=True) as s:
        row = s.scalar(select(cls).where(cls.id == upload_id, cls.tenant_id == tenant_id))
        if row is None:
            return None
        s.delete(row)
        s.flush()
        s.expunge(row)
        return row


# --- searches ----------------------------------------------------------------------------------------------


class IdempotencyConflict(Exception):
    """The idempotency key was used before, for a different request body."""

    def __init__(self, search: Search):
        super().__init__(search.id)
        self.search = search


@dataclass
class NewJob:
    """A job to queue together with the row that it works for."""

    kind: str
    spec: dict[str, Any]
    queue: str
    max_attempts: int


def create_search(
    sf: SF,
    *,
    search_id: str,
    tenant_id: str,
    model_ref: str,
    data_ref: str | None,
    request: dict[str, Any],
    spec: dict[str, Any],
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    schedule_id: str | None = None,
    job_id: str | None = None,
    new_job: NewJob | None = None,
) -> tuple[Search, bool]:
    """Insert a search; returns (search, created). With an idempotency key already used by this tenant,
    returns the earlier search (created=False), or raises `IdempotencyConflict` if its body differed.

    With `new_job`, its queued job and the link between the two are inserted in the same transaction: one
    commit instead of three, and no search can be left without its job."""
    try:
        with transaction(sf, write=True) as s:
            if new_job is not None:
                job_id = new_id()
                s.add(
                    Job(
                        id=job_id,
                        kind=new_job.kind,
                        spec=new_job.spec,
                        queue=new_job.queue,
                        max_attempts=new_job.max_attempts,
                        tenant_id=tenant_id,
                    )
                )
            row = Search(
                id=search_id,
                tenant_id=tenant_id,
                model_ref=model_ref,
                data_ref=data_ref,
                request=request,
                spec=spec,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                schedule_id=schedule_id,
                job_id=job_id,
            )
            s.add(row)
            if new_job is not None:
                s.add(SearchJob(search_id=search_id, job_id=job_id, role="search"))
            s.flush()
            s.expunge(row)
            return row, True
    except IntegrityError:
        if idempotency_key is None:
            raise
    with transaction(sf) as s:
        row = s.scalar(
            select(Search).where(Search.tenant_id == tenant_id, Search.idempotency_key == idempotency_key)
        )
        if row is None:  # deleted in between: let the caller try again
            raise IntegrityError("search vanished during idempotent replay", None, Exception())
        s.expunge(row)
    if row.request_hash != request_hash:
        raise IdempotencyConflict(row)
    return row, False


def delete_search_row(sf: SF, tenant_id: str, search_id: str) -> bool:
    with transaction(sf, write=True) as s:
        res = s.execute(delete(Search).where(Search.id == search_id, Search.tenant_id == tenant_id))
        return res.rowcount == 1


def link_job(
    sf: SF, search_id: str, job_id: str, tenant_id: str, role: str, point_index: int | None = None
) -> bool:
    """Record that `job_id` works for the search (its own job: role 'search'), and give the job its owner.
    Returns False when the search is gone (deleted meanwhile)."""
    with transaction(sf, write=True) as s:
        s.execute(update(Job).where(Job.id == job_id).values(tenant_id=tenant_id))
        if s.get(Search, search_id) is None:
            return False
        if role == "search":
            s.execute(
                update(Search).where(Search.id == search_id, Search.job_id.is_(None)).values(job_id=job_id)
            )
        s.add(SearchJob(search_id=search_id, job_id=job_id, role=role, point_index=point_index))
    return True


def search_for_job(sf: SF, job_id: str) -> Search | None:
    with transaction(sf) as s:
        row = s.scalar(select(Search).where(Search.job_id == job_id))
        if row is not None:
            s.expunge(row)
        return row


def search_exists(sf: SF, search_id: str) -> bool:
    with transaction(sf) as s:
        return s.scalar(select(func.count()).select_from(Search).where(Search.id == search_id)) == 1


@dataclass
class SearchView:
    search: Search
    job: Job | None
    finetunes: list[tuple[SearchJob, Job]] | None = None  # with `get_search(..., finetunes=True)`


def get_search(sf: SF, tenant_id: str, search_id: str, finetunes: bool = False) -> SearchView | None:
    """The search with its job (and, with `finetunes`, its QAT jobs), in one session."""
    with transaction(sf) as s:
        row = s.execute(
            select(Search, Job)
            .outerjoin(Job, Job.id == Search.job_id)
            .where(Search.id == search_id, Search.tenant_id == tenant_id)
        ).first()
        if row is None:
            return None
        search, job = row
        view = SearchView(search, job)
        if finetunes:
            view.finetunes = [
                tuple(r)
                for r in s.execute(
                    select(SearchJob, Job)
                    .join(Job, Job.id == SearchJob.job_id)
                    .where(SearchJob.search_id == search_id, SearchJob.role == "qat")
                    .order_by(SearchJob.id)
                ).all()
            ]
        s.expunge_all()
        return view


def list_searches(
    sf: SF, tenant_id: str, status: str | None, model: str | None, limit: int, offset: int
) -> tuple[list[SearchView], int]:
    with transaction(sf) as s:
        q = select(Search, Job).outerjoin(Job, Job.id == Search.job_id).where(Search.tenant_id == tenant_id)
        if status:
            q = q.where(Job.status == JobStatus(status))
        if model:
            q = q.where(Search.model_ref == model)
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = s.execute(q.order_by(Search.created_at.desc(), Search.id).limit(limit).offset(offset)).all()
        out = []
        for search, job in rows:
            s.expunge(search)
            if job is not None:
                s.expunge(job)
            out.append(SearchView(search, job))
        return out, total


def search_job_ids(sf: SF, tenant_id: str, search_id: str) -> list[str]:
    with transaction(sf) as s:
        ids = set(
            s.scalars(
                select(SearchJob.job_id)
                .join(Search, Search.id == SearchJob.search_id)
                .where(Search.id == search_id, Search.tenant_id == tenant_id)
            )
        )
        own = s.scalar(select(Search.job_id).where(Search.id == search_id, Search.tenant_id == tenant_id))
        if own:
            ids.add(own)
        return sorted(ids)


@dataclass
class PointRow:
    """One point to store: its JSON (without the allocation), the allocation, and how to list it."""

    kind: str
    label: str
    predicted: float | None
    recommended: bool
    data: dict[str, Any]
    allocation: dict[str, Any] | None


def save_search_outcome(
    sf: SF,
    search_id: str,
    sensitivity: dict[str, Any] | None,
    points: Sequence[PointRow],
    summary: dict[str, Any],
) -> bool:
    """Store a finished search's results in one transaction, replacing any earlier attempt's. Returns False
    (and stores nothing) when the search no longer exists."""
    with transaction(sf, write=True) as s:
        search = s.get(Search, search_id, with_for_update=True)
        if search is None:
            return False
        s.execute(delete(ParetoPoint).where(ParetoPoint.search_id == search_id))
        s.execute(delete(AllocationRow).where(AllocationRow.search_id == search_id))
        s.execute(delete(SensitivityTableRow).where(SensitivityTableRow.search_id == search_id))
        s.flush()
        if sensitivity is not None:
            s.add(
                SensitivityTableRow(
                    search_id=search_id, method=str(sensitivity.get("method") or "")[:64], table=sensitivity
                )
            )
        for i, p in enumerate(points):
            alloc_id = None
            if p.allocation is not None:
                a = AllocationRow(search_id=search_id, allocation=p.allocation)
                s.add(a)
                s.flush()
                alloc_id = a.id
            s.add(
                ParetoPoint(
                    search_id=search_id,
                    index=i,
                    kind=p.kind[:16],
                    label=p.label[:200],
                    predicted=p.predicted,
                    recommended=p.recommended,
                    allocation_id=alloc_id,
                    data=p.data,
                )
            )
        search.summary = summary
        search.completed_at = utcnow()
    return True


def get_sensitivity(sf: SF, tenant_id: str, search_id: str) -> SensitivityTableRow | None:
    with transaction(sf) as s:
        row = s.scalar(
            select(SensitivityTableRow)
            .join(Search, Search.id == SensitivityTableRow.search_id)
            .where(Search.id == search_id, Search.tenant_id == tenant_id)
        )
        if row is not None:
            s.expunge(row)
        return row


def get_points(sf: SF, tenant_id: str, search_id: str) -> list[ParetoPoint]:
    with transaction(sf) as s:
        return _detach(
            s,
            s.scalars(
                select(ParetoPoint)
                .join(Search, Search.id == ParetoPoint.search_id)
                .where(Search.id == search_id, Search.tenant_id == tenant_id)
                .order_by(ParetoPoint.index)
            ),
        )


def get_point_allocation(
    sf: SF, tenant_id: str, search_id: str, index: int
) -> tuple[ParetoPoint, AllocationRow | None] | None:
    with transaction(sf) as s:
        row = s.execute(
            select(ParetoPoint, AllocationRow)
            .join(Search, Search.id == ParetoPoint.search_id)
            .outerjoin(AllocationRow, AllocationRow.id == ParetoPoint.allocation_id)
            .where(Search.id == search_id, Search.tenant_id == tenant_id, ParetoPoint.index == index)
        ).first()
        if row is None:
            return None
        point, alloc = row
        s.expunge(point)
        if alloc is not None:
            s.expunge(alloc)
        return point, alloc


# --- jobs and schedules (tenant-scoped views of the job tables) ---------------------------------------------


def _tenant_jobs(tenant_id: str):
    owned_schedules = select(Schedule.id).where(Schedule.tenant_id == tenant_id)
    return or_(Job.tenant_id == tenant_id, Job.schedule_id.in_(owned_schedules))


def set_job_tenant(sf: SF, job_id: str, tenant_id: str) -> None:
    with transaction(sf, write=True) as s:
        s.execute(update(Job).where(Job.id == job_id).values(tenant_id=tenant_id))


def get_job(sf: SF, tenant_id: str, job_id: str) -> Job | None:
    with transaction(sf) as s:
        job = s.scalar(select(Job).where(Job.id == job_id, _tenant_jobs(tenant_id)))
        if job is not None:
            s.expunge(job)
        return job


def list_jobs(
    sf: SF, tenant_id: str, status: str | None, kind: str | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    with transaction(sf) as s:
        q = select(Job).where(_tenant_jobs(tenant_id))
        if status:
            q = q.where(Job.status == JobStatus(status))
        if kind:
            q = q.where(Job.kind == kind)
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = _detach(s, s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)))
        return rows, total


def count_jobs_by_status(sf: SF) -> dict[tuple[str, str], int]:
    """(status, kind) -> number of jobs, over all tenants (for /metrics)."""
    with transaction(sf) as s:
        rows = s.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)).all()
        return {(st.value if isinstance(st, JobStatus) else str(st), kind): n for st, kind, n in rows}


def get_schedule(sf: SF, tenant_id: str, schedule_id: str) -> Schedule | None:
    with transaction(sf) as s:
        row = s.scalar(select(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id))
        if row is not None:
            s.expunge(row)
        return row


def list_schedules(sf: SF, tenant_id: str, limit: int, offset: int) -> tuple[list[Schedule], int]:
    with transaction(sf) as s:
        q = select(Schedule).where(Schedule.tenant_id == tenant_id)
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = _detach(
            s, s.scalars(q.order_by(Schedule.created_at.desc(), Schedule.id).limit(limit).offset(offset))
        )
        return rows, total


def delete_schedule(sf: SF, tenant_id: str, schedule_id: str) -> bool:
    with transaction(sf, write=True) as s:
        # its jobs keep their owner once the schedule (through which they were owned) is gone
        owned = select(Schedule.id).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id)
        s.execute(update(Job).where(Job.schedule_id.in_(owned)).values(tenant_id=tenant_id))
        res = s.execute(delete(Schedule).where(Schedule.id == schedule_id, Schedule.tenant_id == tenant_id))
        return res.rowcount == 1
