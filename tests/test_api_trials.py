"""A bayes search's trials as "study-trials" jobs of the service: they run on other workers, and cancelling the
search's job cancels its queued and running trial jobs, stops its study and keeps the trials it finished.
Local workers always; real Celery workers on Redis when BITSEARCH_TEST_REDIS_URL is set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from db import jobs as job_repo
from db.models import Job
from service.trial_views import study_trials as search_trials
from service.settings import get_settings
from tests.test_api import _fresh_settings, api, db_url, settings, sf, submit  # noqa: F401
from tests.helpers import signal_group, stop_group
from tests.test_worker_crash import _wait

BODY = {"model": "zoo:digits-mlp", "data": "zoo:digits", "options": {"weight_bits": [2, 4, 8]}, "calib_size": 64,
        "budgets": [{"metric": "avg_weight_bits", "value": 6}], "pareto_points": 2,
        # refinement is not what these tests are about, and it would only lengthen them
        "refine": False,
        # far more trials than the test lets run: it is cancelled once trials ran on two workers
        "solver": {"name": "bayes", "settings": {"n_trials": 5000, "workers": 3}}}
BIN = Path(sys.executable).parent / "bitsearch"


def _trial_jobs(sf) -> list[Job]:  # noqa: F811
    with sf() as s:
        return list(s.scalars(select(Job).where(Job.kind == "study-trials").order_by(Job.created_at)))


def _sqlite_only(url: str) -> None:
    # The study code is the same on PostgreSQL (tests/test_trials.py runs it there); these worker start-ups
    # are too slow to pay twice.
    if not url.startswith("sqlite"):
        pytest.skip("run on SQLite only: the fan-out storage on PostgreSQL is tested in tests/test_trials.py")


def _cancel_mid_study(api, sf, url: str):  # noqa: F811
    """Submit, wait for trials finished by the search's job and by a trial job, cancel the search's job; the
    search id, its trials and its jobs afterwards."""
    client, h, _ = api
    acc = submit(client, h, BODY)
    search_job = acc["job_id"]
    trial_jobs = _wait(lambda: len(_trial_jobs(sf)) == 2 and _trial_jobs(sf), 240, "two trial jobs")
    assert all(j.tenant_id is not None for j in trial_jobs)  # owned by the search's tenant

    def ran_on_two() -> bool:
        workers = {t.worker for t in search_trials(acc["id"], url) if t.state == "COMPLETE"}
        return any(w.startswith(f"job-{search_job}") for w in workers) and any(
            w.startswith(f"job-{j.id}") for w in workers for j in trial_jobs)

    _wait(ran_on_two, 300, "trials finished by the search's job and by a trial job")
    r = client.post(f"/jobs/{search_job}/cancel", headers=h)
    assert r.status_code == 200, r.text
    ids = [search_job] + [j.id for j in trial_jobs]
    jobs = _wait(lambda: all((j := job_repo.get(sf, i)).status.finished for i in ids) and
                 [job_repo.get(sf, i) for i in ids], 120, "every job of the search to end")
    return acc["id"], search_trials(acc["id"], url), jobs


def _check_cancelled(search_id: str, trials, jobs, url: str) -> None:
    assert [j.status.value for j in jobs] == ["cancelled"] * 3, [(j.kind, j.status, j.error) for j in jobs]
    states = [t.state for t in trials]
    done = [t for t in trials if t.state == "COMPLETE"]
    assert len(done) >= 2 and len(trials) < 5000  # it stopped asking; what it finished is kept
    assert "RUNNING" not in states and "WAITING" not in states
    assert all(t.state == "COMPLETE" or t.cancelled or t.retry_of is not None or t.error for t in trials)
    assert all(t.score is not None and t.cost is not None for t in done if t.measured)
    # the study is marked stopped, and nothing more happens in it afterwards
    from search.trials import load_fanout_study, study_stopped
    from service.measured_search import study_name, study_url

    study, _ = load_fanout_study(study_url(url), study_name(search_id))
    assert study_stopped(study)["reason"] == "search cancelled"
    time.sleep(1.0)
    assert [t.state for t in search_trials(search_id, url)] == states


@pytest.mark.slow
def test_cancelling_a_search_cancels_its_trial_jobs_local(api, sf, monkeypatch):  # noqa: F811
    from service.jobs.local import work_loop

    url = db_url(sf)
    _sqlite_only(url)
    monkeypatch.setenv("BITSEARCH_DATABASE_URL", url)
    monkeypatch.setenv("BITSEARCH_HEARTBEAT_INTERVAL", "0.2")
    monkeypatch.setenv("BITSEARCH_POLL_INTERVAL", "0.05")
    monkeypatch.setenv("BITSEARCH_STALE_AFTER", "30")
    get_settings.cache_clear()
    # Two local workers: one takes the search's job, the other one of its two trial jobs (the third stays queued).
    threads = [threading.Thread(target=work_loop, kwargs={"max_jobs": 1, "idle_exit": 60, "db_url": url},
                                daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    search_id, trials, jobs = _cancel_mid_study(api, sf, url)
    for t in threads:
        t.join(60)
    _check_cancelled(search_id, trials, jobs, url)
    # one trial job was running (cancelled mid-study), the other was still queued (cancelled before it started)
    assert sorted(j.attempts for j in jobs[1:]) == [0, 1]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BITSEARCH_TEST_REDIS_URL"), reason="BITSEARCH_TEST_REDIS_URL is not set")
def test_cancelling_a_search_cancels_its_trial_jobs_celery(api, sf, settings, monkeypatch, tmp_path):  # noqa: F811
    url = db_url(sf)
    _sqlite_only(url)
    # A Redis database of its own: searches and trials go to the shared "cpu" queue, which other Celery workers
    # on the test Redis may serve (they would take these messages and find no such job in their database).
    broker = os.environ["BITSEARCH_TEST_REDIS_URL"].rsplit("/", 1)[0] + "/14"
    settings.broker_url = broker  # the API sends the search's job to Celery
    env = {**os.environ, "BITSEARCH_DATABASE_URL": url, "BITSEARCH_BROKER_URL": broker,
           "BITSEARCH_DATA_DIR": str(tmp_path / "worker"), "BITSEARCH_HEARTBEAT_INTERVAL": "0.2",
           "BITSEARCH_STALE_AFTER": "30", "OMP_NUM_THREADS": "1", "BITSEARCH_WORKER_NICE": "0"}
    monkeypatch.setenv("BITSEARCH_BROKER_URL", broker)
    get_settings.cache_clear()
    # Two Celery worker processes (solo pool: one job each at a time) on the queue searches and trials go to.
    workers = [subprocess.Popen([str(BIN), "worker", "--queues", "cpu"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(2)]
    try:
        search_id, trials, jobs = _cancel_mid_study(api, sf, url)
    finally:
        for w in workers:
            signal_group(w, signal.SIGTERM)
        for w in workers:
            stop_group(w, 30)
    _check_cancelled(search_id, trials, jobs, url)
    assert all(j.worker_id is None or j.worker_id.startswith("celery:") for j in jobs)


@pytest.mark.slow
def test_search_study_resumes_after_a_service_restart(api, sf, tmp_path):  # noqa: F811
    """The worker running a bayes search is SIGKILLed mid-study (the service goes down); a new worker (the
    service restarted) re-runs the search's job, which resumes the same study: the trials finished before the
    crash are kept, the trial that was running is re-run once, and the study ends at exactly n_trials."""
    url = db_url(sf)
    _sqlite_only(url)
    client, h, _ = api
    body = {**BODY, "solver": {"name": "bayes", "settings": {"n_trials": 12, "workers": 1}}}
    acc = submit(client, h, body)
    env = {**os.environ, "BITSEARCH_DATABASE_URL": url, "BITSEARCH_DATA_DIR": str(tmp_path / "worker"),
           "BITSEARCH_HEARTBEAT_INTERVAL": "0.5", "BITSEARCH_STALE_AFTER": "4", "BITSEARCH_POLL_INTERVAL": "0.2",
           "OMP_NUM_THREADS": "1", "BITSEARCH_WORKER_NICE": "0"}  # not niced: a loaded test machine starves it
    env.pop("BITSEARCH_BROKER_URL", None)
    first = subprocess.Popen([str(BIN), "worker", "--queues", "cpu"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: sum(t.state == "COMPLETE" for t in search_trials(acc["id"], url)) >= 3, 400,
              "trials of the first attempt")
        signal_group(first, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            signal_group(first, signal.SIGKILL)
    before = {t.number: t for t in search_trials(acc["id"], url)}
    log = open(tmp_path / "second-worker.log", "w")
    second = subprocess.Popen([str(BIN), "worker", "--queues", "cpu", "--max-jobs", "1"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        got = _wait(lambda: (g := client.get(acc["url"], headers=h).json())["status"] in
                    ("succeeded", "failed") and g, 600, "the resumed search")
    finally:
        stop_group(second, 30)
        log.close()
    assert got["status"] == "succeeded", (got.get("error"), (tmp_path / "second-worker.log").read_text()[-3000:])
    job = job_repo.get(sf, acc["job_id"])
    assert job.attempts == 2
    trials = search_trials(acc["id"], url)
    done = [t for t in trials if t.state == "COMPLETE"]
    assert len(done) == 12  # exactly n_trials lineages: none lost, none counted twice
    for n, t in before.items():  # what the first attempt finished is kept as it was
        if t.state == "COMPLETE":
            assert trials[n].state == "COMPLETE" and trials[n].worker == t.worker
            assert t.worker == f"job-{acc['job_id']}-1"
    lost = [t for t in before.values() if t.state == "RUNNING"]
    for t in lost:  # failed as stale once, re-run once with the same allocation
        assert trials[t.number].state == "FAIL"
        assert [r.worker for r in trials if r.retry_of == t.number] == [f"job-{acc['job_id']}-2"]
    assert any(t.worker == f"job-{acc['job_id']}-2" for t in done)
    assert client.get(f"/searches/{acc['id']}/pareto", headers=h).json()["points"]


@pytest.mark.parametrize("settings_, reason", [({"workers": 0}, "workers"), ({"trial_timeout": -1}, "trial_timeout"),
                                               ({"workers": True}, "workers")])
def test_bad_fanout_settings_are_422_before_queueing(api, settings_, reason):  # noqa: F811
    client, h, _ = api
    r = client.post("/search", json={**BODY, "solver": {"name": "bayes", "settings": settings_}}, headers=h)
    assert r.status_code == 422, r.text
    assert reason in r.text
    assert client.get("/searches", headers=h).json()["items"] == []
