"""Runs one claimed job: heartbeats in a side thread, progress and cancellation through the DB, and the
result (with its result row) written once, only by the worker that still owns the job."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid

from sqlalchemy.orm import Session, sessionmaker

from db import jobs as repo
from db.models import Job, JobStatus
from quant.errors import BitsearchError

from ..settings import Settings, get_settings
from .kinds import JobCancelled, JobContext, JobInterrupted, get_kind
from .supervise import DB_ERRORS, Backoff

log = logging.getLogger("bitsearch.worker")


def worker_name(prefix: str = "local") -> str:
    return f"{prefix}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Heartbeat(threading.Thread):
    """Beats every `interval` s even while the job computes, so a slow step never looks like a dead worker."""

    def __init__(self, sf: sessionmaker[Session], job_id: str, worker_id: str, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.sf, self.job_id, self.worker_id, self.interval = sf, job_id, worker_id, interval
        self.stop_event = threading.Event()
        self.wanted = True
        self.progress: float | None = None
        self.message: str | None = None
        self.lock = threading.Lock()

    def beat(self) -> bool:
        with self.lock:
            p, m = self.progress, self.message
        try:
            self.wanted = repo.heartbeat(self.sf, self.job_id, self.worker_id, p, m)
        except Exception:  # a DB hiccup must not kill the job; the next beat tries again
            log.exception("heartbeat failed")
        return self.wanted

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.beat()

    def report(self, fraction: float, message: str) -> bool:
        with self.lock:
            self.progress, self.message = fraction, message
        return self.wanted


class DatabaseLost(Exception):
    """The worker lost the database while running a job; the job is released once it answers again."""


def public_error(code: str, exc: BaseException, settings: Settings) -> str:
    """`code: message` for a job's `error`: no traceback, no server path (those go to the log)."""
    text = str(exc) or type(exc).__name__
    for root in {str(settings.data_dir.expanduser()), str(settings.data_dir.expanduser().resolve()),
                 os.path.expanduser("~")}:
        if len(root) > 1:
            text = text.replace(root, "<data>" if root != os.path.expanduser("~") else "~")
    text = _ABS_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    return f"{code}: {text[:2000]}"


# an absolute path of two or more parts (a server path): only its last part is kept
_ABS_PATH = re.compile(r"(?<![\w.~<>])(?:/[^\s'\"/:,;()\[\]]+){2,}/?")


def _retry_db(fn, stopping, ceiling: float):
    """Run a database write until the database answers (a result must not be lost to an outage)."""
    backoff = Backoff(0.5, ceiling)
    while True:
        try:
            return fn()
        except DB_ERRORS as exc:
            if stopping():
                raise DatabaseLost(str(exc)) from exc
            delay = backoff.next()
            log.warning("database unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
            time.sleep(delay)


def execute(sf: sessionmaker[Session], job: Job, worker_id: str, settings: Settings | None = None,
            stopping=lambda: False) -> JobStatus:
    """Run a job this worker has claimed, to its end; returns the status it ended with.

    A job whose worker is stopping (`stopping()` true at a progress report) is released to the queue, its
    attempt not counted; a database outage releases it once the database answers again. Errors stored on
    the job are `code: message` (codes: invalid_spec, internal_error, worker_lost); tracebacks go to the
    log under an id that the message names."""
    settings = settings or get_settings()
    hb = _Heartbeat(sf, job.id, worker_id, settings.heartbeat_interval)
    workdir = settings.jobs_dir / job.id
    workdir.mkdir(parents=True, exist_ok=True)

    def report(fraction: float, message: str) -> bool:
        if stopping():
            raise JobInterrupted(job.id)
        return hb.report(fraction, message)

    ctx = JobContext(job.id, job.attempts, workdir, report, wanted=lambda: hb.wanted)
    hb.start()
    retry = lambda fn: _retry_db(fn, stopping, settings.db_retry_max)  # noqa: E731
    try:
        try:
            fn = get_kind(job.kind)
            out = fn(job.spec, ctx)
        except JobInterrupted:
            hb.stop_event.set()
            released = retry(lambda: repo.release(sf, job.id, worker_id, "worker stopped; queued again"))
            log.info("job %s released (worker stopping): %s", job.id, released)
            return JobStatus.queued
        except JobCancelled:
            hb.stop_event.set()
            retry(lambda: repo.finish(sf, job.id, worker_id, JobStatus.cancelled, message="cancelled"))
            return JobStatus.cancelled
        except BitsearchError as exc:  # the spec itself is wrong: retrying cannot help
            hb.stop_event.set()
            err = public_error(getattr(exc, "code", None) or "invalid_spec", exc, settings)
            retry(lambda: repo.finish(sf, job.id, worker_id, JobStatus.failed, error=err, message="failed"))
            return JobStatus.failed
        except DB_ERRORS as exc:  # the job's own database work failed: not the job's fault
            hb.stop_event.set()
            log.warning("job %s lost the database (%s); releasing it once it answers", job.id, type(exc).__name__)
            retry(lambda: repo.release(sf, job.id, worker_id, "database unavailable; queued again"))
            return JobStatus.queued
        except Exception as exc:
            hb.stop_event.set()
            error_id = uuid.uuid4().hex[:12]
            log.exception("job %s failed (error %s)", job.id, error_id)
            err = public_error("internal_error", exc, settings) + f" ({type(exc).__name__}; log reference {error_id})"
            retry(lambda: repo.finish(sf, job.id, worker_id, JobStatus.failed, error=err, message="failed"))
            return JobStatus.failed
        # keep beating while the result is written, so an outage here does not make the job look lost
        ok = retry(lambda: repo.complete(sf, job.id, worker_id, out.result, out.row))
        return JobStatus.succeeded if ok else JobStatus.cancelled
    finally:
        hb.stop_event.set()
