"""Cron schedules that submit stored job specs. Fired by Celery beat with a broker, by an in-process
thread otherwise; either way through `fire_due`, whose unique (schedule, tick) insert makes a tick fire once
even when two schedulers run."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, Schedule, ScheduleRun, utcnow
from quant.errors import BitsearchError

from .jobs.kinds import get_kind
from .settings import Settings, get_settings

log = logging.getLogger("bitsearch.schedules")


def check_cron(expr: str) -> str:
    expr = " ".join(str(expr).split())
    if not croniter.is_valid(expr):
        raise BitsearchError(f"invalid cron expression {expr!r} (five fields: minute hour day month weekday)")
    return expr


def create_schedule(sf: sessionmaker[Session], name: str, cron: str, kind: str, spec: dict[str, Any],
                    queue: str = "cpu") -> Schedule:
    get_kind(kind)
    if not name.strip():
        raise BitsearchError("a schedule needs a name")
    with sf.begin() as s:
        sched = Schedule(name=name.strip(), cron=check_cron(cron), kind=kind, spec=spec, queue=queue)
        s.add(sched)
        s.flush()
        s.refresh(sched)
        s.expunge(sched)
        return sched


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def fire_due(sf: sessionmaker[Session], now: datetime | None = None, settings: Settings | None = None) -> list[str]:
    """Submit one job for each schedule whose latest tick has not fired yet. Returns the new job ids."""
    from .jobs.dispatch import send

    settings = settings or get_settings()
    now = _aware(now or utcnow())
    fired: list[tuple[str, str]] = []
    with sf() as s:
        schedules = list(s.scalars(select(Schedule).where(Schedule.enabled.is_(True))))
    for sched in schedules:
        tick = _aware(croniter(sched.cron, now).get_prev(datetime))
        if tick < _aware(sched.created_at).replace(second=0, microsecond=0):
            continue  # a tick from before the schedule existed
        if sched.last_tick is not None and _aware(sched.last_tick) >= tick:
            continue
        try:
            with sf.begin() as s:
                job = Job(kind=sched.kind, spec=sched.spec, queue=sched.queue, schedule_id=sched.id,
                          max_attempts=settings.max_attempts)
                s.add(job)
                s.flush()
                s.add(ScheduleRun(schedule_id=sched.id, tick=tick, job_id=job.id))
                s.flush()  # the unique (schedule, tick) check happens here
                row = s.get(Schedule, sched.id)
                if row is not None:
                    row.last_tick = tick
                fired.append((job.id, sched.queue))
        except IntegrityError:
            continue  # another scheduler fired this tick
    for job_id, queue in fired:
        send(job_id, queue, settings)
    return [j for j, _ in fired]


class InProcessScheduler(threading.Thread):
    """Checks the schedules every `interval` seconds (used when no Celery beat runs)."""

    def __init__(self, sf: sessionmaker[Session], interval: float = 15.0):
        super().__init__(daemon=True, name="bitsearch-scheduler")
        self.sf, self.interval = sf, interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                fire_due(self.sf)
            except Exception:
                log.exception("firing schedules failed")
            self.stop_event.wait(self.interval)
