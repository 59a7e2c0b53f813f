"""Supervision of local workers: they die with their parent, wait out a lost database with back-off, say
whether they can run jobs (a beacon file the API's `/readyz` reads), and stop within a bounded time.

A worker process of `serve` asks the kernel for a signal when its parent dies (Linux `PR_SET_PDEATHSIG`),
and also polls its parent's pid (everywhere else, and in case the signal was lost), so a SIGKILL of `serve`
never leaves workers behind that run old code and take jobs after a restart.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from sqlalchemy import exc as sa_exc

log = logging.getLogger("bitsearch.worker")

#: Errors that mean "the database cannot be reached now", not "this job is wrong".
DB_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)
PR_SET_PDEATHSIG = 1
#: How long after a stop request a worker may still take before it exits on its own (its job released).
STOP_GRACE = 5.0


def is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, DB_ERRORS)


class Backoff:
    """Exponential back-off with a ceiling: 0.5, 1, 2, ... `ceiling` seconds."""

    def __init__(self, start: float = 0.5, ceiling: float = 30.0):
        self.start, self.ceiling, self.delay = start, ceiling, start

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.ceiling, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.start


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentWatchdog(threading.Thread):
    """Calls `on_orphaned` once the parent process is gone (the pid this process was started by changed)."""

    def __init__(self, on_orphaned: Callable[[], None], interval: float = 1.0):
        super().__init__(daemon=True, name="parent-watchdog")
        self.parent, self.on_orphaned, self.interval = os.getppid(), on_orphaned, interval

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            if os.getppid() != self.parent:
                log.warning("parent process %d is gone; stopping", self.parent)
                self.on_orphaned()
                return


class Beacon:
    """A small file per worker, `data_dir/workers/<pid>.json`, rewritten every few seconds with the worker's
    state (`ready`, `busy`, `database lost`). `/readyz` of `serve` counts the fresh `ready`/`busy` ones."""

    def __init__(self, folder: Path, name: str):
        self.path = Path(folder) / f"{os.getpid()}.json"
        self.name = name
        self.state = "starting"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass

    def set(self, state: str) -> None:
        self.state = state
        self.touch()

    def touch(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"worker": self.name, "state": self.state, "at": time.time()}))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


def workers_able_to_run(folder: Path, fresh_within: float) -> tuple[int, int]:
    """(workers that can run jobs, workers seen) among the beacons in `folder` written within `fresh_within` s."""
    able = seen = 0
    now = time.time()
    try:
        files = list(Path(folder).glob("*.json"))
    except OSError:
        return 0, 0
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if now - float(data.get("at", 0)) > fresh_within:
            continue
        seen += 1
        if data.get("state") in ("ready", "busy"):
            able += 1
    return able, seen


def wait_for_database(connect: Callable[[], object], max_wait: float, ceiling: float = 10.0,
                      what: str = "the database") -> object:
    """Call `connect` until it stops raising a database error, backing off, for at most `max_wait` s."""
    deadline = time.monotonic() + max_wait
    backoff = Backoff(0.5, ceiling)
    while True:
        try:
            return connect()
        except DB_ERRORS as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            delay = min(backoff.next(), left)
            log.warning("%s is unavailable (%s); trying again in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)


def run_uvicorn(config, on_signal: Callable[[], None] | None = None) -> None:
    """`uvicorn.Server(config).run()`, calling `on_signal` as soon as SIGTERM/SIGINT arrives (uvicorn keeps
    the signal to itself until its graceful shutdown is over), so workers stop while the API drains."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if on_signal is not None:
                try:
                    on_signal()
                except Exception:
                    log.exception("stopping the workers failed")
            super().handle_exit(sig, frame)

    _Server(config).run()
