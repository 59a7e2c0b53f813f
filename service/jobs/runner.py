"""Runs one claimed job: heartbeats in a side thread, progress and cancellation through the DB, and the
result (with its result row) written once, only by the worker that still owns the job."""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid

from sqlalchemy.orm import Session, sessionmaker

from db import jobs as repo
from db.models import Job, JobStatus
from quant.errors import BitsearchError

from ..settings import Settings, get_settings
from .kinds import JobCancelled, JobContext, get_kind

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


def execute(sf: sessionmaker[Session], job: Job, worker_id: str, settings: Settings | None = None) -> JobStatus:
    """Run a job this worker has claimed, to its end; returns the status it ended with."""
    settings = settings or get_settings()
    hb = _Heartbeat(sf, job.id, worker_id, settings.heartbeat_interval)
    workdir = settings.jobs_dir / job.id
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(job.id, job.attempts, workdir, hb.report)
    hb.start()
    try:
        fn = get_kind(job.kind)
        out = fn(job.spec, ctx)
        hb.stop_event.set()
        ok = repo.complete(sf, job.id, worker_id, out.result, out.row)
        return JobStatus.succeeded if ok else JobStatus.cancelled
    except JobCancelled:
        hb.stop_event.set()
        repo.finish(sf, job.id, worker_id, JobStatus.cancelled, message="cancelled")
        return JobStatus.cancelled
    except BitsearchError as exc:  # the spec itself is wrong: retrying cannot help
        hb.stop_event.set()
        repo.finish(sf, job.id, worker_id, JobStatus.failed, error=str(exc), message="failed")
        return JobStatus.failed
    except Exception as exc:
        hb.stop_event.set()
        log.exception("job %s failed", job.id)
        err = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        repo.finish(sf, job.id, worker_id, JobStatus.failed, error=err, message="failed")
        return JobStatus.failed
    finally:
        hb.stop_event.set()
