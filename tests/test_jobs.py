"""Jobs in SQL: claiming, heartbeats, recovery of lost jobs, cancellation, schedules, migrations."""

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from db import jobs as repo
from db.models import Base, Job, JobStatus, Result, ScheduleRun
from quant.errors import BitsearchError
from service.jobs.kinds import JobContext, JobOutput, register_kind
from service.jobs.runner import execute
from service.schedules import InProcessScheduler, create_schedule, fire_due
from service.settings import Settings
from tests.helpers import db_urls, make_sf


@register_kind("test-echo")
def _echo(spec, ctx: JobContext) -> JobOutput:
    for i in range(spec.get("steps", 1)):
        ctx.progress(i / spec.get("steps", 1), f"step {i}")
        time.sleep(spec.get("sleep", 0))
    if spec.get("fail"):
        raise RuntimeError("boom")
    return JobOutput({"echo": spec.get("value")}, repo.ResultRow("test-echo", {"value": spec.get("value")}))


@pytest.fixture(params=db_urls())
def sf(request, tmp_path):
    return make_sf(request.param, tmp_path)


def test_models_match_migrations(sf):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with sf.kw["bind"].connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_claim_is_exclusive_and_in_order(sf):
    a = repo.submit(sf, "test-echo", {"value": 1})
    b = repo.submit(sf, "test-echo", {"value": 2})
    got = []
    barrier = threading.Barrier(4)

    def grab(i):
        barrier.wait()
        job = repo.claim(sf, f"w{i}")
        if job:
            got.append(job.id)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == sorted([a.id, b.id])  # each job claimed exactly once
    assert repo.claim(sf, "late") is None


def test_execute_stores_result_once(sf, tmp_path):
    job = repo.submit(sf, "test-echo", {"value": 7, "steps": 3})
    claimed = repo.claim(sf, "w")
    st = execute(sf, claimed, "w", Settings(data_dir=tmp_path, heartbeat_interval=0.05))
    assert st == JobStatus.succeeded
    done = repo.get(sf, job.id)
    assert done.status == JobStatus.succeeded and done.result == {"echo": 7} and done.progress == 1.0
    assert len(repo.results_for(sf, job.id)) == 1
    # a second completion attempt (e.g. a redelivered task) cannot add a row
    assert not repo.complete(sf, job.id, "w", {"echo": 8}, repo.ResultRow("test-echo", {}))
    assert len(repo.results_for(sf, job.id)) == 1


def test_failure_keeps_the_error(sf, tmp_path):
    job = repo.submit(sf, "test-echo", {"fail": True})
    execute(sf, repo.claim(sf, "w"), "w", Settings(data_dir=tmp_path))
    done = repo.get(sf, job.id)
    assert done.status == JobStatus.failed and "boom" in done.error


def test_stale_job_is_requeued_then_given_up(sf):
    job = repo.submit(sf, "test-echo", {}, max_attempts=2)
    for attempt in (1, 2):
        claimed = repo.claim(sf, f"dead{attempt}")
        assert claimed.id == job.id and claimed.attempts == attempt
        with sf.begin() as s:  # the worker died: its heartbeat goes stale
            s.get(Job, job.id).heartbeat_at = datetime.now(timezone.utc) - timedelta(minutes=5)
        ids = repo.requeue_stale(sf, stale_after=60)
        assert ids == ([job.id] if attempt == 1 else [])
    final = repo.get(sf, job.id)
    assert final.status == JobStatus.failed and "worker lost" in final.error
    # the dead worker cannot write over the decision
    assert not repo.heartbeat(sf, job.id, "dead2")
    assert not repo.complete(sf, job.id, "dead2", {})


def test_cancel_queued_and_running(sf, tmp_path):
    queued = repo.submit(sf, "test-echo", {})
    assert repo.cancel(sf, queued.id).status == JobStatus.cancelled
    job = repo.submit(sf, "test-echo", {"steps": 400, "sleep": 0.05})
    claimed = repo.claim(sf, "w")
    out = {}
    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.05)
    t = threading.Thread(target=lambda: out.update(st=execute(sf, claimed, "w", settings)))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    repo.cancel(sf, job.id)
    t.join(15)
    assert time.monotonic() - t0 < 10.0  # stopped early, not after its 20 s of work
    assert out["st"] == JobStatus.cancelled
    assert repo.get(sf, job.id).status == JobStatus.cancelled
    assert repo.results_for(sf, job.id) == []


def test_schedule_fires_once_per_tick_with_two_schedulers(sf, tmp_path):
    settings = Settings(data_dir=tmp_path)
    sched = create_schedule(sf, "nightly", "*/5 * * * *", "test-echo", {"value": 1})
    start = sched.created_at.replace(second=0, microsecond=0) + timedelta(minutes=10)
    fired = []
    barrier = threading.Barrier(2)

    def scheduler():
        barrier.wait()
        for k in range(3):  # three ticks, each seen twice by each scheduler
            now = start + timedelta(minutes=5 * k, seconds=30)
            fired.extend(fire_due(sf, now, settings))
            fired.extend(fire_due(sf, now + timedelta(seconds=10), settings))

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(fired) == 3 == len(set(fired))
    with sf() as s:
        runs = list(s.scalars(select(ScheduleRun).where(ScheduleRun.schedule_id == sched.id)))
        assert len(runs) == 3
        jobs = list(s.scalars(select(Job).where(Job.schedule_id == sched.id)))
        assert {j.id for j in jobs} == set(fired)


def test_in_process_scheduler_thread_fires(sf, tmp_path, monkeypatch):
    create_schedule(sf, "every minute", "* * * * *", "test-echo", {})
    # pretend the schedule was made long ago so the current minute's tick is due
    with sf.begin() as s:
        for sch in s.scalars(select(__import__("db").Schedule)):
            sch.created_at = datetime.now(timezone.utc) - timedelta(hours=1)
    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(tmp_path))
    t = InProcessScheduler(sf, interval=0.05)
    t.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not repo.list_jobs(sf):
        time.sleep(0.05)
    t.stop_event.set()
    t.join(5)
    assert len(repo.list_jobs(sf)) == 1  # many checks within one minute: one job


def test_bad_schedules_are_refused(sf):
    with pytest.raises(BitsearchError, match="invalid cron"):
        create_schedule(sf, "x", "61 * * * *", "test-echo", {})
    with pytest.raises(BitsearchError, match="unknown job kind"):
        create_schedule(sf, "x", "* * * * *", "nope", {})


def test_results_table_refuses_a_second_row(sf):
    job = repo.submit(sf, "test-echo", {})
    with sf.begin() as s:
        s.add(Result(job_id=job.id, kind="x", metrics={}))
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with sf.begin() as s:
            s.add(Result(job_id=job.id, kind="x", metrics={}))


def test_celery_watchdog_outlives_a_database_that_fails_at_start(monkeypatch):
    """The watchdog that re-sends lost jobs must keep running when its first connection fails (a database
    still starting, or a migration raced by a worker starting at the same moment): it used to die for good."""
    pytest.importorskip("celery")
    from service.jobs import celery_app, dispatch

    calls = {"factory": 0, "recover": 0}

    def flaky_factory(url):
        calls["factory"] += 1
        if calls["factory"] == 1:
            raise RuntimeError("table schedules already exists")
        return object()

    def fake_recover(sf, settings=None):
        calls["recover"] += 1
        return []

    monkeypatch.setattr(celery_app, "session_factory", flaky_factory)
    monkeypatch.setattr(dispatch, "recover", fake_recover)
    celery_app.start_watchdog(0.05)
    deadline = time.monotonic() + 10
    while calls["recover"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert calls["factory"] == 2 and calls["recover"] >= 2
