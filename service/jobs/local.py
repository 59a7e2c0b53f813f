"""The embedded executor: worker processes that poll the jobs table. Nothing to install beyond SQLite.

Each loop first recovers jobs whose worker died (stale heartbeat) and then claims the oldest queued job,
so any live worker finishes the work of a dead one, resuming from the job's last checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterable

from db import jobs as repo
from db.session import session_factory

from ..settings import get_settings
from .runner import DatabaseLost, execute, worker_name
from .supervise import DB_ERRORS, STOP_GRACE, Backoff, Beacon, ParentWatchdog, die_with_parent

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
              db_url: str | None = None, stop: threading.Event | None = None) -> int:
    """Claim and run jobs until stopped (SIGTERM, `stop` set, or `max_jobs` done, or idle for `idle_exit` s).
    Returns jobs run.

    A lost database never ends the loop: the worker backs off (up to `db_retry_max` s between tries), says
    so in its beacon, and carries on once the database answers. On a stop request a running job is released
    to the queue at its next progress report (QAT writes its checkpoint first); a job that reports no
    progress within `STOP_GRACE` s is released by the process's exit path (see `_exit_after_grace`)."""
    settings = get_settings()
    stop = stop or threading.Event()
    me = worker_name()
    beacon = Beacon(settings.data_dir.expanduser() / "workers", me)
    beacon.set("starting")

    def _stop(*_):
        stop.set()

    try:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    except ValueError:  # not the main thread (tests); the caller stops us
        pass
    sf = None
    done = 0
    idle_since = time.monotonic()
    qs = list(queues) if queues else None
    backoff = Backoff(0.5, settings.db_retry_max)
    beat_at = 0.0
    try:
        while not stop.is_set():
            try:
                if sf is None:
                    sf = session_factory(db_url or settings.db_url)
                repo.requeue_stale(sf, settings.stale_after)
                job = repo.claim(sf, me, qs)
            except DB_ERRORS as exc:
                beacon.set("database lost")
                delay = backoff.next()
                log.warning("database unavailable (%s); trying again in %.1f s", type(exc).__name__, delay)
                stop.wait(delay)
                continue
            except Exception:  # never let one bad turn end the worker
                log.exception("worker loop error")
                stop.wait(backoff.next())
                continue
            backoff.reset()
            if job is None:
                if time.monotonic() - beat_at > 1.0:
                    beacon.set("ready")
                    beat_at = time.monotonic()
                if idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    break
                stop.wait(settings.poll_interval)
                continue
            log.info("running job %s (%s), attempt %d", job.id, job.kind, job.attempts)
            beacon.set("busy")
            keeper = _BeaconKeeper(beacon)
            keeper.start()
            try:
                execute(sf, job, me, settings, stopping=stop.is_set)
            except DatabaseLost:
                log.warning("job %s: the database was lost while stopping; its heartbeat will expire", job.id)
            except Exception:
                log.exception("job %s: unexpected error in the runner", job.id)
            finally:
                keeper.stop_event.set()
            done += 1
            idle_since = time.monotonic()
            beacon.set("ready")
            if max_jobs is not None and done >= max_jobs:
                break
    finally:
        beacon.remove()
    return done


class _BeaconKeeper(threading.Thread):
    """Keeps a busy worker's beacon fresh while its job computes."""

    def __init__(self, beacon: Beacon, interval: float = 2.0):
        super().__init__(daemon=True, name="beacon")
        self.beacon, self.interval, self.stop_event = beacon, interval, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.beacon.touch()


def supervised_worker(queues: Iterable[str] | None, db_url: str | None) -> None:
    """The body of a pool's worker process: dies with its parent, stops within `STOP_GRACE` s of a stop
    request, then runs the work loop."""
    stop = threading.Event()
    die_with_parent(signal.SIGTERM)
    ParentWatchdog(stop.set).start()
    _exit_after_grace(stop, db_url)
    work_loop(queues, db_url=db_url, stop=stop)


def _exit_after_grace(stop: threading.Event, db_url: str | None) -> None:
    """Once `stop` is set, give the job `STOP_GRACE` s to reach a progress report (and be released); then
    queue this worker's job again itself (its parent may be gone) and leave."""

    def watch() -> None:
        stop.wait()
        time.sleep(STOP_GRACE)
        log.warning("job did not stop within %.0f s; queueing it again and exiting", STOP_GRACE)
        try:
            prefix = f"local:{socket.gethostname()}:{os.getpid()}:"
            repo.release_workers(session_factory(db_url or get_settings().db_url), prefix, count_attempt=False)
        except Exception:  # the database is down: the stale-heartbeat check queues it later
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="stop-grace").start()


def _child(queues, db_url):
    supervised_worker(queues, db_url)


class LocalPool:
    """N worker processes beside the API process, so requests stay responsive while jobs run.

    A supervisor thread replaces a worker that died (after queueing its running job again at once), with a
    back-off when workers keep dying. `stop` asks every worker to stop (SIGTERM), waits for them, kills
    what is left, and queues again any job they left `running`."""

    def __init__(self, n: int = 1, queues: Iterable[str] | None = None, db_url: str | None = None,
                 target: Callable[..., None] | None = None, supervise_interval: float = 0.5):
        self.n, self.queues, self.db_url = n, list(queues) if queues else None, db_url
        self.target = target or _child
        self.procs: list[mp.process.BaseProcess] = []
        self.replaced = 0
        self.supervise_interval = supervise_interval
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> mp.process.BaseProcess:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or DB connections inherited
        p = ctx.Process(target=self.target, args=(self.queues, self.db_url), daemon=True)
        p.start()
        return p

    def start(self) -> None:
        with self._lock:
            for _ in range(self.n):
                self.procs.append(self._spawn())
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="pool-supervisor")
        self._thread.start()

    def alive(self) -> int:
        with self._lock:
            return sum(p.is_alive() for p in self.procs)

    def _release_jobs_of(self, pid: int | None, count_attempt: bool = True) -> None:
        if pid is None or not self.db_url:
            return
        prefix = f"local:{socket.gethostname()}:{pid}:"
        try:
            ids = repo.release_workers(session_factory(self.db_url), prefix, count_attempt)
            if ids:
                log.warning("worker %d died; queued its job(s) %s again", pid, ids)
        except Exception as exc:  # the database is down: the stale-heartbeat check will do it later
            log.warning("could not queue the jobs of dead worker %d again (%s)", pid, type(exc).__name__)

    def _supervise(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while not self._stopping.wait(self.supervise_interval):
            with self._lock:
                dead = [p for p in self.procs if not p.is_alive()]
            if not dead:
                backoff.reset()
                continue
            for p in dead:
                log.warning("worker process %s exited (code %s); starting another", p.pid, p.exitcode)
                self._release_jobs_of(p.pid)
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.procs.remove(p)
                    self.procs.append(self._spawn())
                    self.replaced += 1
            if self._stopping.wait(backoff.next() - 1.0):
                return

    def begin_stop(self) -> None:
        """Ask every worker to stop now (SIGTERM), without waiting: `serve` calls it on its own SIGTERM, so
        the workers release their jobs while the API drains its requests."""
        self._stopping.set()
        with self._lock:
            for p in self.procs:
                if p.is_alive():
                    p.terminate()

    def stop(self, timeout: float = STOP_GRACE + 1.5) -> None:
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            procs = list(self.procs)
            self.procs.clear()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(2)
            self._release_jobs_of(p.pid, count_attempt=False)  # told to stop: not the job's fault
