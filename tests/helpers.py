"""Test helpers shared by several test modules."""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from db.session import make_engine, migrate, normalise_url


def db_urls() -> list:
    """SQLite always; PostgreSQL too when BITSEARCH_TEST_POSTGRES_URL is set."""
    urls = [pytest.param("sqlite", id="sqlite")]
    pg = os.environ.get("BITSEARCH_TEST_POSTGRES_URL")
    urls.append(pytest.param(pg, id="postgres", marks=[] if pg else pytest.mark.skip(
        reason="BITSEARCH_TEST_POSTGRES_URL is not set")))
    return urls


def make_sf(url: str | None, tmp_path):
    """A fresh, migrated database: a SQLite file, or a private schema in the test PostgreSQL."""
    if url == "sqlite" or url is None:
        engine = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    else:
        schema = "t_" + uuid.uuid4().hex[:12]
        base = make_engine(url)
        with base.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        base.dispose()
        sep = "&" if "?" in url else "?"
        engine = make_engine(normalise_url(url) + f"{sep}options=-csearch_path%3D{schema}")
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)


#: A search small enough for tests that run it end to end (digits-mlp, three Pareto points).
TINY_SEARCH = {
    "model": "zoo:digits-mlp",
    "data": "zoo:digits",
    "budgets": [{"metric": "avg_weight_bits", "value": 4}],
    "options": {"weight_bits": [2, 4, 8]},
    "pareto_points": 3,
    "calib_size": 64,
    "eval_limit": 200,
}


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to `proc`'s process group (started with `start_new_session=True`), if it still exists."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `proc`'s process group and wait for it; SIGKILL it if it is still there after `timeout` s."""
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout)


def kill_once_marked(proc: subprocess.Popen, markers: Path, pattern: str, what: str, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as a file matching `pattern` appears in `markers` (where the process marks the
    trial it began); fails if the process exits first or nothing is marked within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not list(markers.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the {what} never started a trial"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
