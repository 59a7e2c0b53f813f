"""Submitting a job: the SQL row first (the source of truth), then, with Celery, a message to its queue."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import jobs as repo
from db.models import Job

from ..settings import Settings, get_settings
from .kinds import get_kind

log = logging.getLogger("bitsearch.dispatch")


def submit_job(sf: sessionmaker[Session], kind: str, spec: dict[str, Any], queue: str | None = None,
               settings: Settings | None = None, schedule_id: str | None = None,
               tenant_id: str | None = None) -> Job:
    """Store a job (owned by `tenant_id`, whose running jobs fair scheduling counts) and send it. Quotas are
    checked by the caller that answers a user (`service.jobs.quotas.check_job_quota`)."""
    settings = settings or get_settings()
    queue = queue_for(kind, settings, queue)
    job = repo.submit(sf, kind, spec, queue, settings.max_attempts, schedule_id, tenant_id)
    send(job.id, queue, settings)
    return job


def queue_for(kind: str, settings: Settings, queue: str | None = None) -> str:
    """The queue a job of `kind` goes to (`queue` when given); unknown kinds are refused before anything is
    stored."""
    get_kind(kind)
    return queue or (settings.qat_queue if kind == "qat" else "cpu")


def send(job_id: str, queue: str, settings: Settings | None = None) -> None:
    """With a broker, hand the job to Celery; without one, local workers find it in the table."""
    settings = settings or get_settings()
    if not settings.broker_url:
        return
    from .celery_app import get_celery

    get_celery(settings.broker_url).send_task("bitsearch.run_job", args=[job_id], queue=queue)


def recover(sf: sessionmaker[Session], settings: Settings | None = None) -> list[str]:
    """Queue again the jobs of dead workers and, with Celery, send them again."""
    settings = settings or get_settings()
    ids = repo.requeue_stale(sf, settings.stale_after)
    for job_id in ids:
        job = repo.get(sf, job_id)
        if job is not None:
            log.warning("job %s lost its worker; sending it again (attempt %d)", job_id, job.attempts + 1)
            send(job_id, job.queue, settings)
    return ids
