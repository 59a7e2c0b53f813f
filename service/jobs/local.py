"""The embedded executor: worker processes that poll the jobs table. Nothing to install beyond SQLite.

Each loop first recovers jobs whose worker died (stale heartbeat) and then claims the oldest queued job,
so any live worker finishes the work of a dead one, resuming from the job's last checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from typing import Iterable

from db import jobs as repo
from db.session import session_factory

from ..settings import get_settings
from .runner import execute, worker_name

log = logging.getLogger("bitsearch.worker")


def lower_priority(niceness: int) -> None:
    """Run this worker process at a lower CPU priority: on a machine shared with the API, a training job
    then takes the cores the API leaves idle instead of slowing every request down."""
    if niceness > 0 and hasattr(os, "nice"):
        try:
            os.nice(niceness)
        except OSError:  # not permitted here: run at the normal priority
            log.warning("could not lower the worker's priority by %d", niceness)


def work_loop(queues: Iterable[str] | None = None, max_jobs: int | None = None, idle_exit: float | None = None,
              db_url: str | None = None) -> int:
    """Claim and run jobs until stopped (or `max_jobs` done, or idle for `idle_exit` s). Returns jobs run."""
    settings = get_settings()
    sf = session_factory(db_url or settings.db_url)
    me = worker_name()
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    try:
        signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread (tests); the caller stops us
        pass
    done = 0
    idle_since = time.monotonic()
    qs = list(queues) if queues else None
    while not stop["now"]:
        repo.requeue_stale(sf, settings.stale_after)
        job = repo.claim(sf, me, qs)
        if job is None:
            if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                break
            time.sleep(settings.poll_interval)
            continue
        log.info("running job %s (%s), attempt %d", job.id, job.kind, job.attempts)
        execute(sf, job, me, settings)
        done += 1
        idle_since = time.monotonic()
        if max_jobs is not None and done >= max_jobs:
            break
    return done


def _child(queues, db_url):
    work_loop(queues, db_url=db_url)


class LocalPool:
    """N worker processes beside the API process, so requests stay responsive while jobs run."""

    def __init__(self, n: int = 1, queues: Iterable[str] | None = None, db_url: str | None = None):
        self.n, self.queues, self.db_url = n, list(queues) if queues else None, db_url
        self.procs: list[mp.Process] = []

    def start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or DB connections inherited
        for _ in range(self.n):
            p = ctx.Process(target=_child, args=(self.queues, self.db_url), daemon=True)
            p.start()
            self.procs.append(p)

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout)
        self.procs.clear()
