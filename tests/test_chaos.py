"""Chaos: `bitsearch serve` as real processes on loopback, under SIGKILL of serve, SIGKILL of a worker in the
middle of a search and of a QAT job, SIGTERM with a job running, and (on PostgreSQL) a database outage made by
cutting a TCP proxy the test owns. Each run ends with every accepted search and job present, terminal
(succeeded), with exactly one result set, and no process of any serve left behind.

Bounded: tiny searches (digits-mlp, three Pareto points) and a short QAT run; about two minutes on two busy
cores. With `BITSEARCH_CHAOS_REPORT=path.json` the runs write what they measured (faults, accepted, lost,
duplicated, time to recover) for `bench/chaos.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import func, select, text

from db import jobs as repo
from db.models import Job, JobStatus, Result
from db.session import make_engine, normalise_url, session_factory
from service.api.auth import create_key
from tests.helpers import TINY_SEARCH

BIN = Path(sys.executable).parent / "bitsearch"
SEARCH = TINY_SEARCH
REPORT: dict[str, dict] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except (httpx.HTTPError, OSError):
            v = None
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """The zoo models the runs use, trained once here, copied into each run's data folder."""
    from zoo import load_model
    from zoo.paths import data_dir

    for name in ("zoo:digits-mlp", "zoo:digits-cnn"):
        load_model(name)
    return data_dir() / "zoo"


class Serve:
    """One `bitsearch serve` process group and every process it ever had (for the orphan check)."""

    def __init__(self, data: Path, db_url: str, workers: int = 1):
        self.data, self.db_url, self.workers = data, db_url, workers
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BITSEARCH_DATA_DIR=str(self.data),
            BITSEARCH_DATABASE_URL=self.db_url,
            BITSEARCH_HEARTBEAT_INTERVAL="0.5",
            BITSEARCH_STALE_AFTER="6",
            BITSEARCH_POLL_INTERVAL="0.2",
            BITSEARCH_DB_RETRY_MAX="1",
            BITSEARCH_DB_WAIT_AT_START="60",
            OMP_WAIT_POLICY="PASSIVE",
        )
        env.pop("BITSEARCH_BROKER_URL", None)
        return env

    def start(self, wait_ready: bool = True) -> "Serve":
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        _wait(lambda: self.alive() and httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200,
              timeout, "serve to be ready")
        self.track()

    def alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "serve exited"
        return True

    def track(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(k.pid for k in kids)
        self.seen.add(self.proc.pid)
        return kids

    def worker_pids(self) -> list[int]:
        out = []
        for k in self.track():
            try:
                cmd = " ".join(k.cmdline())
            except psutil.Error:
                continue
            if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                out.append(k.pid)
        return out

    def leftovers(self) -> list[int]:
        left = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left

    def kill_all(self) -> None:
        for pid in self.seen | ({self.proc.pid} if self.proc else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def _submit_search(serve: Serve, key: str) -> str:
    r = httpx.post(f"{serve.base}/search", json=SEARCH, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _qat_spec() -> dict:
    from quant import Allocation, LayerBits, discover_layers
    from zoo import load_model

    loaded = load_model("zoo:digits-cnn")
    names = [l.name for l in discover_layers(loaded.model, loaded.example_input)]
    alloc = Allocation.uniform(names, LayerBits(4, 4), model="zoo:digits-cnn")
    recipe = {"steps": 300, "batch_size": 32, "lr": 0.01, "checkpoint_every": 10, "eval_every": 0, "seed": 0}
    return {"model": "zoo:digits-cnn", "allocation": alloc.to_dict(), "recipe": recipe}


def _search_job(sf, search_id: str) -> Job | None:
    with sf() as s:
        row = s.execute(text("SELECT job_id FROM search_jobs WHERE search_id = :s AND role = 'search'"),
                        {"s": search_id}).first()
    return repo.get(sf, row[0]) if row else None


def _check_outcome(sf, searches: list[str], jobs: list[str]) -> dict:
    """Every accepted search and job: present, succeeded, exactly one result set. Returns the counts."""
    lost = duplicated = 0
    for sid in searches:
        with sf() as s:
            n_links = s.execute(text("SELECT count(*) FROM search_jobs WHERE search_id = :s AND role = 'search'"),
                                {"s": sid}).scalar()
            n_sens = s.execute(text("SELECT count(*) FROM sensitivity_tables WHERE search_id = :s"),
                               {"s": sid}).scalar()
            idx = [r[0] for r in s.execute(text('SELECT "index" FROM pareto_points WHERE search_id = :s'),
                                           {"s": sid})]
        job = _search_job(sf, sid)
        if job is None or job.status != JobStatus.succeeded or n_sens == 0 or not idx:
            lost += 1
        if n_links > 1 or n_sens > 1 or len(idx) != len(set(idx)):
            duplicated += 1
        assert job is not None and job.status == JobStatus.succeeded, (sid, job and job.status, job and job.error)
        assert n_links == 1 and n_sens == 1 and idx and len(idx) == len(set(idx)), (sid, n_links, n_sens, idx)
    for jid in jobs:
        job = repo.get(sf, jid)
        with sf() as s:
            n = s.scalar(select(func.count()).select_from(Result).where(Result.job_id == jid))
        if job is None or job.status != JobStatus.succeeded:
            lost += 1
        duplicated += int(n > 1)
        assert job is not None and job.status == JobStatus.succeeded, (jid, job and job.error)
        assert n == 1
    return {"accepted": len(searches) + len(jobs), "lost": lost, "duplicated": duplicated}


def _report(name: str, entry: dict) -> None:
    REPORT[name] = entry
    path = os.environ.get("BITSEARCH_CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=2))


def _data_dir(tmp_path: Path, zoo_cache: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(zoo_cache, data / "zoo")
    return data


def test_chaos_kills_on_sqlite(tmp_path, zoo_cache):
    data = _data_dir(tmp_path, zoo_cache)
    db_url = f"sqlite:///{tmp_path / 'chaos.db'}"
    sf = session_factory(db_url)
    key, tenant = create_key(sf, "chaos")
    runs: list[Serve] = []
    faults, recover = 0, {}
    try:
        # 1. SIGKILL of a worker in the middle of a search: the pool starts another and the job runs again
        a = Serve(data, db_url).start()
        runs.append(a)
        searches = [_submit_search(a, key), _submit_search(a, key)]
        _wait(lambda: (j := _search_job(sf, searches[0])) is not None and j.status == JobStatus.running,
              60, "the first search to run")
        (victim,) = a.worker_pids()
        os.kill(victim, signal.SIGKILL)
        faults += 1
        t0 = time.monotonic()
        _wait(lambda: [p for p in a.worker_pids() if p != victim], 30, "a new worker")
        _wait(lambda: all(_search_job(sf, s).status == JobStatus.succeeded for s in searches), 240,
              "both searches")
        recover["worker_killed_mid_search_s"] = round(time.monotonic() - t0, 1)

        # 2. SIGKILL of a worker in the middle of QAT: resumed from its checkpoint by the replacement
        from service.jobs.dispatch import submit_job

        qat = submit_job(sf, "qat", _qat_spec(), tenant_id=tenant).id
        ckpt = data / "jobs" / qat / "qat-checkpoint.pt"
        _wait(lambda: ckpt.exists() and repo.get(sf, qat).status == JobStatus.running, 120, "a QAT checkpoint")
        (victim,) = a.worker_pids()
        os.kill(victim, signal.SIGKILL)
        faults += 1
        t0 = time.monotonic()
        _wait(lambda: (j := repo.get(sf, qat)).status == JobStatus.running and j.attempts == 2, 60,
              "the QAT job to run again")
        recover["worker_killed_mid_qat_s"] = round(time.monotonic() - t0, 1)

        # 3. SIGKILL of serve itself: its workers must not outlive it
        searches.append(_submit_search(a, key))
        a.track()
        old_worker = repo.get(sf, qat).worker_id
        t_kill = time.monotonic()
        os.kill(a.proc.pid, signal.SIGKILL)
        faults += 1
        a.proc.wait(10)
        _wait(lambda: not a.leftovers(), 15, "serve's workers to die with it")
        recover["orphans_gone_after_serve_kill_s"] = round(time.monotonic() - t_kill, 1)

        # 4. a new serve; SIGTERM while QAT runs: everything stops within 10 s and the job is queued again
        b = Serve(data, db_url).start(wait_ready=False)
        runs.append(b)
        # (the orphaned worker released the job itself on its parent-death signal, or its heartbeat went stale)
        _wait(lambda: (j := repo.get(sf, qat)).status == JobStatus.succeeded
              or (j.status == JobStatus.running and j.worker_id != old_worker), 120, "QAT resumed", every=0.1)
        # from the kill: a new serve's start-up, then the stale-heartbeat limit (6 s here) of the lost job
        recover["serve_killed_to_qat_running_again_s"] = round(time.monotonic() - t_kill, 1)
        if repo.get(sf, qat).status == JobStatus.running:
            b.track()
            t0 = time.monotonic()
            os.kill(b.proc.pid, signal.SIGTERM)
            faults += 1
            b.proc.wait(15)
            _wait(lambda: not b.leftovers(), 10, "every process of serve to stop after SIGTERM")
            stopped_in = time.monotonic() - t0
            assert stopped_in < 10.5, stopped_in
            recover["sigterm_stop_s"] = round(stopped_in, 1)
            assert repo.get(sf, qat).status in (JobStatus.queued, JobStatus.succeeded)

        # 5. a last serve finishes everything that was accepted
        c = Serve(data, db_url).start()
        runs.append(c)
        _wait(lambda: repo.get(sf, qat).status.finished
              and all(_search_job(sf, s).status.finished for s in searches), 300, "all work to finish")
        os.kill(c.proc.pid, signal.SIGTERM)
        c.proc.wait(15)
        _wait(lambda: not c.leftovers(), 10, "the last serve to stop")
        counts = _check_outcome(sf, searches, [qat])
        assert repo.get(sf, qat).result["resumed"] is True
    finally:
        for r in runs:
            r.kill_all()
    assert not any(r.leftovers() for r in runs)
    _report("sqlite_kills", {"faults": faults, **counts, "orphans": 0, "recover_s": recover})


class CuttableProxy:
    """A TCP proxy on loopback: `cut()` drops every connection and refuses new ones; `restore()` listens
    again on the same port."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = _free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, up]
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        if self.server is not None:
            try:  # wakes the thread blocked in accept(); close() alone leaves the socket listening
                self.server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.server.close()
            self.server = None
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.mark.skipif(not os.environ.get("BITSEARCH_TEST_POSTGRES_URL"), reason="BITSEARCH_TEST_POSTGRES_URL is not set")
def test_chaos_database_outage_on_postgres(tmp_path, zoo_cache):
    from sqlalchemy.engine import make_url

    base = os.environ["BITSEARCH_TEST_POSTGRES_URL"]
    url = make_url(normalise_url(base))
    proxy = CuttableProxy((url.host or "127.0.0.1", url.port or 5432))
    schema = "chaos_" + uuid.uuid4().hex[:10]
    engine = make_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    proxied = url.set(host="127.0.0.1", port=proxy.port).update_query_dict(
        {"options": f"-csearch_path={schema}", "connect_timeout": "3"})
    db_url = proxied.render_as_string(hide_password=False)
    data = _data_dir(tmp_path, zoo_cache)
    sf = session_factory(db_url)
    key, _ = create_key(sf, "outage")
    serve = Serve(data, db_url)
    try:
        proxy.cut()  # the database is down when serve starts: it waits with back-off instead of exiting
        serve.start(wait_ready=False)
        time.sleep(4)
        assert serve.alive()
        proxy.restore()
        serve.wait_ready(90)
        searches = [_submit_search(serve, key)]
        _wait(lambda: _search_job(sf, searches[0]).status == JobStatus.running, 60, "the search to run")
        (worker,) = serve.worker_pids()
        proxy.cut()
        t_cut = time.monotonic()
        _wait(lambda: httpx.get(f"{serve.base}/readyz", timeout=5).status_code == 503, 30, "readyz to say unready")
        time.sleep(max(0.0, 12 - (time.monotonic() - t_cut)))  # an outage longer than the stale limit
        proxy.restore()
        t0 = time.monotonic()
        serve.wait_ready(60)
        recover_s = time.monotonic() - t0
        searches.append(_submit_search(serve, key))
        _wait(lambda: all(_search_job(sf, s).status.finished for s in searches), 240, "the searches")
        assert worker in serve.worker_pids(), "the worker exited during the outage"
        os.kill(serve.proc.pid, signal.SIGTERM)
        serve.proc.wait(15)
        _wait(lambda: not serve.leftovers(), 10, "serve to stop")
        counts = _check_outcome(sf, searches, [])
    finally:
        serve.kill_all()
        proxy.cut()
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    _report("postgres_outage", {"faults": 2, **counts, "outage_s": 12, "recover_s": round(recover_s, 1),
                                "worker_survived": True})
