"""The Celery executor (when BITSEARCH_BROKER_URL is set).

Tasks carry only a job id; the SQL row stays the source of truth. Late acknowledgement with
reject-on-worker-lost makes the broker redeliver the message of a worker that died, and `recover` (run by
every worker's watchdog and by beat) re-sends jobs whose heartbeat went stale sooner than that. A task that
finds its job already claimed by a live worker, or finished, does nothing, so redelivery is harmless.
"""

from __future__ import annotations

import threading
from functools import lru_cache

from celery import Celery

from db import jobs as repo
from db.session import session_factory

from ..settings import get_settings


@lru_cache(maxsize=4)
def get_celery(broker_url: str) -> Celery:
    app = Celery("bitsearch", broker=broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            "fire-schedules": {"task": "bitsearch.fire_schedules", "schedule": 30.0},
            "recover-jobs": {"task": "bitsearch.recover", "schedule": 15.0},
        },
    )

    @app.task(name="bitsearch.run_job")
    def run_job(job_id: str) -> str:
        from .runner import execute, worker_name

        settings = get_settings()
        sf = session_factory(settings.db_url)
        me = worker_name("celery")
        job = repo.claim(sf, me, job_id=job_id)
        if job is None:
            return "not claimable (running elsewhere or finished)"
        status = execute(sf, job, me, settings)
        if status.value == "queued":  # released (the database was lost meanwhile): send it again
            from .dispatch import send

            send(job.id, job.queue, settings)
        return status.value

    @app.task(name="bitsearch.fire_schedules")
    def fire_schedules() -> int:
        from ..schedules import fire_due

        settings = get_settings()
        return len(fire_due(session_factory(settings.db_url), settings=settings))

    @app.task(name="bitsearch.recover")
    def recover_task() -> int:
        from .dispatch import recover

        settings = get_settings()
        return len(recover(session_factory(settings.db_url), settings))

    return app


def start_watchdog(interval: float) -> threading.Thread:
    """Re-send lost jobs from inside a worker, so recovery needs no beat process."""
    from .dispatch import recover

    def loop():
        settings = get_settings()
        sf = None
        while True:
            try:
                # Opened inside the loop: a database that is down at start, or a migration raced by another
                # worker starting at the same moment, must not end the watchdog for the worker's lifetime.
                if sf is None:
                    sf = session_factory(settings.db_url)
                recover(sf, settings)
            except Exception:
                pass
            threading.Event().wait(interval)

    t = threading.Thread(target=loop, daemon=True, name="bitsearch-watchdog")
    t.start()
    return t


def worker_node_name(queues: list[str], host: str = "%h") -> str:
    return f"bitsearch-{'-'.join(queues)}@{host}"


def worker_is_healthy(
    queues: list[str], heartbeat_within: float = 60.0, ping_timeout: float = 5.0
) -> tuple[bool, str]:
    """Whether this host's Celery worker for `queues` is alive: it answers a ping, or, busy with a job (the
    solo pool answers nothing until the job ends), that job's heartbeat is recent. For container health
    checks (`bitsearch worker-health`)."""
    import socket

    from db import jobs as job_repo
    from db.session import session_factory

    settings = get_settings()
    host = socket.gethostname()
    node = worker_node_name(queues, host)
    try:
        replies = get_celery(settings.broker_url).control.ping(destination=[node], timeout=ping_timeout)
    except Exception as exc:  # the broker is down: say so, then look at the jobs table
        replies, why = [], f"broker unreachable ({type(exc).__name__})"
    else:
        why = "no answer to a ping"
    if replies:
        return True, f"{node} answered a ping"
    busy = job_repo.busy_on_host(session_factory(settings.db_url), f"celery:{host}:", heartbeat_within)
    if busy:
        return True, f"{node} is running {busy} job(s) with a heartbeat in the last {heartbeat_within:.0f} s"
    return False, f"{node}: {why}, and no running job of this host with a recent heartbeat"


def run_worker(queues: list[str], concurrency: int = 1) -> None:
    settings = get_settings()
    app = get_celery(settings.broker_url)
    start_watchdog(max(1.0, settings.stale_after / 2))
    app.worker_main([
        "worker", "-Q", ",".join(queues), "--pool", "solo" if concurrency == 1 else "prefork",
        "-c", str(concurrency), "--loglevel", "INFO", "-n", worker_node_name(queues),
    ])


def run_beat() -> None:
    settings = get_settings()
    get_celery(settings.broker_url).Beat(loglevel="INFO").run()
