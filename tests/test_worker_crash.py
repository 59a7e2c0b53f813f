"""A worker process killed with SIGKILL in the middle of a QAT job: the job resumes from its checkpoint
and finishes with exactly one result row (local executor always; Celery with a real Redis when set)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from db import jobs as repo
from db.models import JobStatus
from db.session import session_factory
from quant import Allocation, LayerBits
from service.jobs.dispatch import submit_job
from service.settings import Settings
from tests.helpers import signal_group, stop_group

BIN = Path(sys.executable).parent / "bitsearch"


def _env(tmp_path, broker=None):
    env = dict(os.environ)
    env.update(
        BITSEARCH_DATA_DIR=str(tmp_path),
        BITSEARCH_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        BITSEARCH_HEARTBEAT_INTERVAL="0.5",
        BITSEARCH_STALE_AFTER="4",
        BITSEARCH_POLL_INTERVAL="0.2",
        OMP_WAIT_POLICY="PASSIVE",
    )
    env.pop("BITSEARCH_BROKER_URL", None)
    if broker:
        env["BITSEARCH_BROKER_URL"] = broker
    return env


def _qat_spec():
    from zoo import load_model
    from quant import discover_layers

    loaded = load_model("zoo:digits-cnn")
    names = [l.name for l in discover_layers(loaded.model, loaded.example_input)]
    alloc = Allocation.uniform(names, LayerBits(4, 4), model="zoo:digits-cnn")
    recipe = {"steps": 240, "batch_size": 32, "lr": 0.01, "checkpoint_every": 10, "eval_every": 0, "seed": 0}
    return {"model": "zoo:digits-cnn", "allocation": alloc.to_dict(), "recipe": recipe}


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _crash_and_resume(tmp_path, monkeypatch, broker=None):
    env = _env(tmp_path, broker)
    for k in ("BITSEARCH_DATA_DIR", "BITSEARCH_DATABASE_URL", "BITSEARCH_BROKER_URL"):
        if k in env:
            monkeypatch.setenv(k, env[k])
        else:
            monkeypatch.delenv(k, raising=False)
    settings = Settings()
    sf = session_factory(settings.db_url)
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    job = submit_job(sf, "qat", _qat_spec(), queue=queue, settings=settings)
    checkpoint = Path(tmp_path) / "jobs" / job.id / "qat-checkpoint.pt"
    cmd = [str(BIN), "worker", "--queues", queue]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait(lambda: checkpoint.exists() and (repo.get(sf, job.id).progress or 0) > 0.1, 240, "a checkpoint")
        assert repo.get(sf, job.id).status == JobStatus.running
        signal_group(first, signal.SIGKILL)  # the worker and anything it started
        first.wait(10)
        second_cmd = cmd + ([] if broker else ["--max-jobs", "1"])
        second = subprocess.Popen(second_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            done = _wait(lambda: (j := repo.get(sf, job.id)).status.finished and j, 400, "the resumed job")
        finally:
            stop_group(second, 20)
    finally:
        if first.poll() is None:
            signal_group(first, signal.SIGKILL)
    assert done.status == JobStatus.succeeded, done.error
    assert done.attempts == 2
    assert done.result["resumed"] is True
    assert done.result["steps"] == 240
    rows = repo.results_for(sf, job.id)
    assert len(rows) == 1 and rows[0].kind == "qat" and rows[0].metrics["top1"] > 50


def test_local_worker_killed_mid_qat_resumes_once(tmp_path, monkeypatch):
    _crash_and_resume(tmp_path, monkeypatch)


@pytest.mark.skipif(not os.environ.get("BITSEARCH_TEST_REDIS_URL"), reason="BITSEARCH_TEST_REDIS_URL is not set")
def test_celery_worker_killed_mid_qat_resumes_once(tmp_path, monkeypatch):
    _crash_and_resume(tmp_path, monkeypatch, broker=os.environ["BITSEARCH_TEST_REDIS_URL"])
