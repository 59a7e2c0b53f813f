"""Supervision of workers, in-process: a database outage in every database call a worker makes, job errors
without tracebacks or server paths, stop requests that release a job, fair claims between tenants, quotas,
and readiness that follows the workers' state."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from db import jobs as repo
from db.models import JobStatus
from service.api.app import create_app
from service.api.auth import create_key
from service.jobs import local
from service.jobs.kinds import JobOutput, register_kind
from service.jobs.runner import execute
from service.jobs.supervise import Beacon, die_with_parent, wait_for_database
from service.settings import Settings
from tests.helpers import db_urls, make_sf


@register_kind("test-supervised")
def _kind(spec, ctx):
    if spec.get("fail"):
        raise RuntimeError(f"cannot open {spec['fail']}")
    for i in range(spec.get("steps", 1)):
        ctx.progress(i / max(1, spec.get("steps", 1)), f"step {i}")
        time.sleep(spec.get("sleep", 0.0))
    return JobOutput({"ok": spec.get("value", 1)}, repo.ResultRow("test-supervised", {"value": spec.get("value", 1)}))


@pytest.fixture(params=db_urls())
def sf(request, tmp_path):
    return make_sf(request.param, tmp_path)


def _outage(n: int):
    """A wrapper that makes the first `n` calls raise the OperationalError of a lost database."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*a, **k):
            calls["n"] += 1
            if calls["n"] <= n:
                raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
            return fn(*a, **k)

        return inner

    return wrap, calls


def _loop_settings(tmp_path, monkeypatch, sf_):
    settings = Settings(data_dir=tmp_path / "data", poll_interval=0.05, heartbeat_interval=0.2, db_retry_max=0.2)
    monkeypatch.setattr(local, "get_settings", lambda: settings)
    monkeypatch.setattr(local, "session_factory", lambda url=None: sf_)
    return settings


def test_worker_survives_a_database_outage_in_every_call(sf, tmp_path, monkeypatch):
    """The failure path's `finish`, the claim and the completion all lose the database for a while: the
    loop backs off and carries on, and both jobs end as they should (issue: the worker exited for good)."""
    _loop_settings(tmp_path, monkeypatch, sf)
    bad = repo.submit(sf, "test-supervised", {"fail": str(tmp_path / "secret" / "file.bin")})
    good = repo.submit(sf, "test-supervised", {"value": 5})
    for name, n in (("claim", 2), ("finish", 3), ("complete", 2)):
        wrap, _ = _outage(n)
        monkeypatch.setattr(repo, name, wrap(getattr(repo, name)))
    stop = threading.Event()
    t = threading.Thread(target=local.work_loop, kwargs=dict(stop=stop, idle_exit=1.0), daemon=True)
    t.start()
    t.join(60)
    stop.set()
    assert not t.is_alive()
    failed, done = repo.get(sf, bad.id), repo.get(sf, good.id)
    assert failed.status == JobStatus.failed and failed.error.startswith("internal_error: ")
    assert "Traceback" not in failed.error and str(tmp_path) not in failed.error, failed.error
    assert "log reference" in failed.error
    assert done.status == JobStatus.succeeded and done.result == {"ok": 5}
    assert len(repo.results_for(sf, good.id)) == 1


def test_a_job_whose_own_database_work_fails_is_released_not_failed(sf, tmp_path):
    @register_kind("test-db-lost")
    def _lost(spec, ctx):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    job = repo.submit(sf, "test-db-lost", {})
    claimed = repo.claim(sf, "w")
    assert execute(sf, claimed, "w", Settings(data_dir=tmp_path)) == JobStatus.queued
    after = repo.get(sf, job.id)
    assert after.status == JobStatus.queued and after.attempts == 0 and "database" in after.message


def test_stopping_worker_releases_its_job_at_the_next_report(sf, tmp_path):
    job = repo.submit(sf, "test-supervised", {"steps": 50, "sleep": 0.02})
    claimed = repo.claim(sf, "w")
    stopping = {"now": False}
    threading.Timer(0.2, lambda: stopping.update(now=True)).start()
    status = execute(sf, claimed, "w", Settings(data_dir=tmp_path), stopping=lambda: stopping["now"])
    assert status == JobStatus.queued
    after = repo.get(sf, job.id)
    assert after.status == JobStatus.queued and after.worker_id is None and after.attempts == 0
    again = repo.claim(sf, "w2")
    assert again.id == job.id and again.message == "started"  # no stale "worker lost" message on a re-run


def test_claims_are_fair_between_tenants(sf, tmp_path):
    _, a = create_key(sf, "tenant-a")
    _, b = create_key(sf, "tenant-b")
    a_jobs = [repo.submit(sf, "test-supervised", {}, tenant_id=a) for _ in range(3)]
    b_job = repo.submit(sf, "test-supervised", {}, tenant_id=b)
    assert repo.claim(sf, "w1").id == a_jobs[0].id  # oldest first while nobody runs anything
    assert repo.claim(sf, "w2").id == b_job.id  # b has none running: it goes before a's second
    assert repo.claim(sf, "w3").id == a_jobs[1].id


def test_dead_workers_jobs_are_released_at_once(sf):
    job = repo.submit(sf, "test-supervised", {})
    repo.claim(sf, "local:host:4242:abcdef")
    assert repo.release_workers(sf, "local:host:4242:") == [job.id]
    after = repo.get(sf, job.id)
    assert after.status == JobStatus.queued and after.attempts == 1


def test_pool_replaces_a_dead_worker(tmp_path):
    pool = local.LocalPool(1, target=_sleeper, supervise_interval=0.1)
    pool.start()
    try:
        first = pool.procs[0]
        deadline = time.monotonic() + 30
        while not first.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()
        while (pool.replaced < 1 or pool.alive() < 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.replaced >= 1 and pool.alive() == 1 and pool.procs[0].pid != first.pid
    finally:
        pool.stop(timeout=5)
    assert pool.alive() == 0


def _sleeper(queues, db_url):
    time.sleep(60)


def test_parent_death_signal_is_available_on_linux():
    import sys

    assert die_with_parent() is sys.platform.startswith("linux")


def test_wait_for_database_backs_off_then_connects():
    wrap, calls = _outage(3)
    t0 = time.monotonic()
    assert wait_for_database(wrap(lambda: "up"), max_wait=30, ceiling=0.2) == "up"
    assert calls["n"] == 4 and time.monotonic() - t0 >= 0.5
    wrap, _ = _outage(100)
    with pytest.raises(OperationalError):
        wait_for_database(wrap(lambda: "up"), max_wait=0.3, ceiling=0.1)


def test_readyz_follows_the_local_workers(tmp_path):
    sf_ = make_sf("sqlite", tmp_path)
    settings = Settings(data_dir=tmp_path / "data", serve_local_workers=2)
    with TestClient(create_app(settings, sf_)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["workers"].startswith("0 of 2"), r.text
        beacon = Beacon(settings.data_dir / "workers", "w")
        beacon.set("database lost")
        r = client.get("/readyz")
        assert r.status_code == 503 and "waiting for the database" in r.json()["checks"]["workers"]
        beacon.set("ready")
        assert client.get("/readyz").status_code == 200
        beacon.remove()
        assert client.get("/readyz").status_code == 503


@pytest.fixture
def quota_api(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", tenant_max_queued_jobs=2, max_qat_steps=5000,
                        tenant_max_qat_steps=6000, tenant_max_upload_bytes=3000)
    sf_ = make_sf("sqlite", tmp_path)
    key, tenant = create_key(sf_, "quota")
    with TestClient(create_app(settings, sf_)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, sf_


def test_qat_steps_are_bounded_and_tenants_have_quotas(quota_api):
    client, h, sf_ = quota_api
    body = {"model": "zoo:digits-cnn", "data": "zoo:digits"}
    r = client.post("/search", json={**body, "qat": {"steps": 10**12}}, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "limit_exceeded" and "5000" in r.json()["detail"], r.text
    assert client.post("/search", json={**body, "qat": {"steps": 4000}}, headers=h).status_code == 202
    r = client.post("/search", json={**body, "qat": {"steps": 4000}}, headers=h)
    assert r.status_code == 429 and r.json()["code"] == "quota_exceeded" and "steps" in r.json()["detail"]
    assert client.post("/search", json=body, headers=h).status_code == 202
    r = client.post("/search", json=body, headers=h)
    assert r.status_code == 429 and "waiting" in r.json()["detail"], r.text
    # other tenants are not held back by this one's queue
    key2, _ = create_key(sf_, "other")
    assert client.post("/search", json=body, headers={"Authorization": f"Bearer {key2}"}).status_code == 202


def test_upload_bytes_quota(quota_api):
    import io

    import numpy as np

    client, h, _ = quota_api
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8), np.uint8))
    assert client.post("/datasets", files={"file": ("a.npz", buf.getvalue())}, headers=h).status_code == 201
    big = io.BytesIO()
    np.savez(big, x=np.ones((40, 8, 8), np.uint8))
    r = client.post("/datasets", files={"file": ("b.npz", big.getvalue())}, headers=h)
    assert r.status_code == 413 and r.json()["code"] == "quota_exceeded" and "quota" in r.json()["detail"], r.text
