"""`bitsearch serve` as a process: several API processes on one port, and workers at a lower CPU priority."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from db.session import session_factory
from service.api.auth import create_key

BIN = Path(sys.executable).parent / "bitsearch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_lower_their_priority():
    code = (
        "import os\n"
        "from service.jobs.local import lower_priority\n"
        "before = os.nice(0)\n"
        "lower_priority(7)\n"
        "print(os.nice(0) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "7"


def test_serve_with_two_api_processes(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'serve.db'}"
    env = {**os.environ, "BITSEARCH_DATA_DIR": str(tmp_path), "BITSEARCH_DATABASE_URL": db_url}
    env.pop("BITSEARCH_BROKER_URL", None)
    key, _ = create_key(session_factory(db_url), "two-processes")
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", str(port), "--workers", "0", "--http-workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, timeout=30) as c:  # new connections spread over both processes
            statuses = {httpx.get(f"{base}/searches", headers=h, timeout=30).status_code for _ in range(20)}
            assert statuses == {200}
            assert c.get("/searches", headers={"Authorization": "Bearer bsk_nope"}).status_code == 401
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2  # uvicorn's supervisor runs one child per API process
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_worker_health_for_container_checks(tmp_path, monkeypatch):
    """`bitsearch worker-health`: 1 when no worker of this host answers and none runs a job, 0 while one of
    its jobs has a recent heartbeat (a busy solo-pool worker answers no ping)."""
    import socket
    from datetime import timedelta

    import pytest

    from db import jobs as job_repo
    from db.models import Job, JobStatus, utcnow
    from service.cli import main
    from service.settings import get_settings

    redis = os.environ.get("BITSEARCH_TEST_REDIS_URL")
    if not redis:
        pytest.skip("BITSEARCH_TEST_REDIS_URL is not set")
    db_url = f"sqlite:///{tmp_path / 'health.db'}"
    monkeypatch.setenv("BITSEARCH_BROKER_URL", redis)
    monkeypatch.setenv("BITSEARCH_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        sf = session_factory(db_url)
        assert main(["worker-health", "--queues", "cpu", "--ping-timeout", "0.5"]) == 1
        with sf.begin() as s:
            s.add(Job(id="a" * 32, kind="search", spec={}, status=JobStatus.running, heartbeat_at=utcnow(),
                      worker_id=f"celery:{socket.gethostname()}:1:abc"))
        assert job_repo.busy_on_host(sf, f"celery:{socket.gethostname()}:", 60) == 1
        assert main(["worker-health", "--queues", "cpu", "--ping-timeout", "0.5"]) == 0
        with sf.begin() as s:  # the job's heartbeat goes stale: its worker is stuck or gone
            s.get(Job, "a" * 32).heartbeat_at = utcnow() - timedelta(seconds=120)
        assert main(["worker-health", "--queues", "cpu", "--ping-timeout", "0.5"]) == 1
    finally:
        get_settings.cache_clear()


def test_a_server_process_freezes_its_start_up_objects(tmp_path, monkeypatch):
    """`bitsearch serve`'s app exempts start-up objects from garbage collection once it serves (full
    collections over them stalled every request); apps made for tests do not."""
    import gc

    from fastapi.testclient import TestClient

    from service.api.app import create_app, served_app
    from service.settings import Settings, get_settings

    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BITSEARCH_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    gc.unfreeze()
    try:
        with TestClient(create_app(Settings(data_dir=tmp_path))) as c:
            assert c.get("/healthz").status_code == 200 and gc.get_freeze_count() == 0
        with TestClient(served_app()) as c:
            assert c.get("/healthz").status_code == 200 and gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
        get_settings.cache_clear()
