"""All job-table access in one place: submit, claim, heartbeat, finish, cancel, and recovery of lost jobs.

Every state change is a conditional UPDATE (compare-and-set on status and worker), so two workers can never
both claim a job, and a worker that lost its job (requeued after a stale heartbeat) cannot overwrite it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import Job, JobStatus, Result, utcnow

def submit(
    sf: sessionmaker[Session],
    kind: str,
    spec: dict[str, Any],
    queue: str = "cpu",
    max_attempts: int = 3,
    schedule_id: str | None = None,
    tenant_id: str | None = None,
) -> Job:
    with sf.begin() as s:
        job = Job(kind=kind, spec=spec, queue=queue, max_attempts=max_attempts, schedule_id=schedule_id,
                  tenant_id=tenant_id)
        s.add(job)
        s.flush()
        s.refresh(job)
        s.expunge(job)
        return job


def get(sf: sessionmaker[Session], job_id: str) -> Job | None:
    with sf() as s:
        job = s.get(Job, job_id)
        if job is not None:
            s.expunge(job)
        return job


def list_jobs(
    sf: sessionmaker[Session], status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0
) -> list[Job]:
    with sf() as s:
        q = select(Job).order_by(Job.created_at.desc()).limit(limit).offset(offset)
        if status:
            q = q.where(Job.status == JobStatus(status))
        if kind:
            q = q.where(Job.kind == kind)
        jobs = list(s.scalars(q))
        for j in jobs:
            s.expunge(j)
        return jobs


def requeue_stale(sf: sessionmaker[Session], stale_after: float) -> list[str]:
    """Jobs left `running` by a dead worker (no heartbeat for `stale_after` s): queue them again, or fail them
    once they have used all their attempts. Returns the ids queued again."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    requeued: list[str] = []
    with sf.begin() as s:
        stale = list(
            s.scalars(select(Job).where(Job.status == JobStatus.running, Job.heartbeat_at < cutoff))
        )
        for job in stale:
            if job.cancel_requested:
                new = dict(status=JobStatus.cancelled, finished_at=utcnow(), message="cancelled (worker lost)")
            elif job.attempts >= job.max_attempts:
                new = dict(status=JobStatus.failed, finished_at=utcnow(), message="failed",
                           error=f"worker_lost: worker lost {job.attempts} time(s); giving up")
            else:
                new = dict(status=JobStatus.queued, worker_id=None, message="worker lost; queued again")
            res = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.running, Job.heartbeat_at == job.heartbeat_at)
                .values(**new)
            )
            if res.rowcount and new["status"] == JobStatus.queued:
                requeued.append(job.id)
    return requeued


def claim(sf: sessionmaker[Session], worker_id: str, queues: Iterable[str] | None = None,
          job_id: str | None = None) -> Job | None:
    """Atomically take a queued job (of `queues`, or the given one) for `worker_id`.

    Fair between tenants: among the oldest queued jobs, those of the tenant with the fewest running jobs go
    first (oldest first among equals), so every tenant gets a running job before any tenant gets a second,
    and one tenant's long queue cannot starve another's."""
    with sf() as s:
        q = select(Job.id, Job.tenant_id).where(Job.status == JobStatus.queued).order_by(Job.created_at)
        if job_id is not None:
            q = q.where(Job.id == job_id)
        elif queues:
            q = q.where(Job.queue.in_(list(queues)))
        candidates = list(s.execute(q.limit(64)))
        running: dict[str | None, int] = {}
        if len({t for _, t in candidates}) > 1:
            running = dict(
                s.execute(
                    select(Job.tenant_id, func.count()).where(Job.status == JobStatus.running).group_by(Job.tenant_id)
                ).all()
            )
    order = sorted(range(len(candidates)), key=lambda i: (running.get(candidates[i][1], 0), i))
    for cid in (candidates[i][0] for i in order[:8]):
        with sf.begin() as s:
            now = utcnow()
            res = s.execute(
                update(Job)
                .where(Job.id == cid, Job.status == JobStatus.queued)
                .values(status=JobStatus.running, worker_id=worker_id, attempts=Job.attempts + 1,
                        heartbeat_at=now, started_at=func.coalesce(Job.started_at, now), message="started")
            )
            if res.rowcount == 1:
                job = s.get(Job, cid)
                s.expunge(job)
                return job
    return None


def heartbeat(sf: sessionmaker[Session], job_id: str, worker_id: str, progress: float | None = None,
              message: str | None = None) -> bool:
    """Record liveness (and progress). Returns False when the job is no longer this worker's to run
    (cancel requested, or requeued/finished elsewhere)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    if message is not None:
        values["message"] = message[:2000]
    with sf.begin() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
            .values(**values)
        )
        if res.rowcount != 1:
            return False
        return not s.scalar(select(Job.cancel_requested).where(Job.id == job_id))


@dataclass
class ResultRow:
    kind: str
    metrics: dict[str, Any]
    allocation: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    checkpoint_path: str | None = None


def complete(sf: sessionmaker[Session], job_id: str, worker_id: str, result: dict[str, Any],
             row: ResultRow | None = None) -> bool:
    """Mark the job succeeded and store its result row in one transaction (never two rows for one job)."""
    try:
        with sf.begin() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
                .values(status=JobStatus.succeeded, progress=1.0, finished_at=utcnow(), result=result,
                        message="done", error=None)
            )
            if res.rowcount != 1:
                s.rollback()
                return False
            if row is not None:
                s.add(Result(job_id=job_id, kind=row.kind, metrics=row.metrics, allocation=row.allocation,
                             recipe=row.recipe, cost=row.cost, checkpoint_path=row.checkpoint_path))
        return True
    except IntegrityError:  # a result row exists already: the job finished elsewhere
        return False


def finish(sf: sessionmaker[Session], job_id: str, worker_id: str, status: JobStatus, error: str | None = None,
           message: str = "") -> bool:
    with sf.begin() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
            .values(status=status, finished_at=utcnow(), error=error, message=message)
        )
        return res.rowcount == 1


def release(sf: sessionmaker[Session], job_id: str, worker_id: str, message: str) -> bool:
    """Give a running job back to the queue without counting the attempt against it (its worker is
    stopping, or lost the database): the next worker resumes it from its checkpoint."""
    with sf.begin() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
            .values(status=JobStatus.queued, worker_id=None, message=message,
                    attempts=func.max(Job.attempts - 1, 0) if _is_sqlite(s) else func.greatest(Job.attempts - 1, 0))
        )
        return res.rowcount == 1


def release_workers(sf: sessionmaker[Session], worker_prefix: str, count_attempt: bool = True) -> list[str]:
    """Jobs still `running` under a worker that is known dead (ids starting with `worker_prefix`): queue them
    again at once instead of waiting for their heartbeat to go stale. The attempt counts when the worker
    died on its own (a job that kills its worker every time must end), not when it was told to stop
    (`count_attempt=False`). Returns the ids queued again."""
    out: list[str] = []
    with sf.begin() as s:
        rows = list(s.scalars(select(Job).where(
            Job.status == JobStatus.running, Job.worker_id.startswith(worker_prefix, autoescape=True))))
        for job in rows:
            if not count_attempt:
                new = dict(status=JobStatus.queued, worker_id=None, message="worker stopped; queued again",
                           attempts=max(0, job.attempts - 1))
            elif job.attempts >= job.max_attempts:
                new = dict(status=JobStatus.failed, finished_at=utcnow(), message="failed",
                           error=f"worker_lost: worker lost {job.attempts} time(s) (it died); giving up")
            else:
                new = dict(status=JobStatus.queued, worker_id=None, message="worker lost; queued again")
            res = s.execute(update(Job).where(Job.id == job.id, Job.worker_id == job.worker_id,
                                              Job.status == JobStatus.running).values(**new))
            if res.rowcount and new["status"] == JobStatus.queued:
                out.append(job.id)
    return out


def _is_sqlite(s: Session) -> bool:
    return s.get_bind().dialect.name == "sqlite"


def tenant_load(sf: sessionmaker[Session], tenant_id: str) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    """(queued jobs, [(kind, spec)] of queued and running jobs) of one tenant, for its quotas."""
    with sf() as s:
        queued = int(s.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant_id, Job.status == JobStatus.queued)) or 0)
        active = [(k, sp) for k, sp in s.execute(select(Job.kind, Job.spec).where(
            Job.tenant_id == tenant_id, Job.status.in_([JobStatus.queued, JobStatus.running])))]
    return queued, active


def cancel(sf: sessionmaker[Session], job_id: str) -> Job | None:
    """Cancel a queued job at once; ask a running one to stop (its worker stops within seconds)."""
    with sf.begin() as s:
        s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.cancelled, finished_at=utcnow(), message="cancelled", cancel_requested=True)
        )
        s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                  .values(cancel_requested=True))
    return get(sf, job_id)


def results_for(sf: sessionmaker[Session], job_id: str) -> list[Result]:
    with sf() as s:
        rows = list(s.scalars(select(Result).where(Result.job_id == job_id)))
        for r in rows:
            s.expunge(r)
        return rows


def busy_on_host(sf: sessionmaker[Session], worker_prefix: str, within: float) -> int:
    """Running jobs whose worker id starts with `worker_prefix` and that beat within the last `within` s."""
    cutoff = utcnow() - timedelta(seconds=within)
    with sf() as s:
        return int(
            s.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.status == JobStatus.running,
                    Job.worker_id.startswith(worker_prefix, autoescape=True),
                    Job.heartbeat_at > cutoff,
                )
            )
            or 0
        )
