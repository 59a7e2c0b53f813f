"""The REST service: keys, tenant isolation, searches (idempotent), results, jobs, schedules, health,
restarts.

Runs against SQLite and, when BITSEARCH_TEST_POSTGRES_URL is set, PostgreSQL too. The search pipeline is
replaced by a fake outcome where a test only needs stored results; one test runs the real one when it exists.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from db import jobs as job_repo
from db import repo
from db.models import Job, JobStatus, Schedule, utcnow
from db.session import make_engine
from db.tables import ApiKey
from quant.allocation import Allocation, LayerBits
from service.api.app import create_app
from service.api.auth import create_key, hash_key
from service.api.search_job import outcome_rows, persist_outcome
from service.settings import Settings, get_settings
from tests.helpers import TINY_SEARCH, db_urls, make_sf

SEARCH = {
    "model": "zoo:digits-mlp",
    "data": "zoo:digits",
    "budgets": [{"metric": "avg_weight_bits", "value": "4bits"}],
    "pareto_points": 4,
}


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    """Tests that point workers at their database through the environment must not leak cached settings
    (torn down before monkeypatch restores the environment)."""
    yield
    get_settings.cache_clear()


@pytest.fixture(params=db_urls())
def sf(request, tmp_path):
    return make_sf(request.param, tmp_path)


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", heartbeat_interval=0.1)


@pytest.fixture
def api(sf, settings):
    """(client, headers of tenant A, headers of tenant B)."""
    app = create_app(settings, sf)
    key_a, _ = create_key(sf, "tenant-a")
    key_b, _ = create_key(sf, "tenant-b")
    with TestClient(app) as client:
        yield client, {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}


def db_url(sf) -> str:
    return sf.kw["bind"].url.render_as_string(hide_password=False)


def fake_outcome():
    """A typed search result as `run_search` returns it: a sensitivity table, a front, recommendations."""
    from bitsearch import Recommendation, SearchResult, SearchSpec
    from quant.layers import discover_layers
    from search.pareto import ParetoFront, ParetoPoint
    from sensitivity.table import SensitivityTable
    from zoo.models import DigitsMLP

    layers = discover_layers(DigitsMLP(), torch.randn(2, 1, 8, 8))
    names = [l.name for l in layers]
    options = [LayerBits(w, 32) for w in (2, 4, 8)]
    table = SensitivityTable("fisher", layers, options, np.array([[3.0, 0.5, 0.01]] * len(names)))

    def point(kind, bits, predicted, top1, label=None):
        alloc = {n: bits[i % len(bits)] for i, n in enumerate(names)}
        a = Allocation({n: LayerBits(b, 32) for n, b in alloc.items()}, model="zoo:digits-mlp")
        avg = float(np.mean(list(alloc.values())))
        return ParetoPoint(
            allocation=a,
            predicted=float(np.float64(predicted)),
            metrics={"avg_weight_bits": avg, "weight_memory": avg * 1e4},
            kind=kind,
            budget=avg if kind == "mixed" else None,
            optimal=True,
            label=label,
            measured={"top1": top1, "kl": float("nan")},
        )

    mixed = [
        point("mixed", [2, 4], 1.2, 90.0),
        point("mixed", [4, 8], 0.4, 97.0),
        point("mixed", [8], 0.03, 98.5),
    ]
    uniform = [point("uniform", [4], 0.5, 96.0, "W4A32"), point("uniform", [8], 0.03, 98.5, "W8A32")]
    front = ParetoFront("avg_weight_bits", mixed, uniform, "ilp", "fisher")
    return SearchResult(SearchSpec(model="zoo:digits-mlp"), "zoo:digits-mlp", table, front,
                        [Recommendation(1, [], True, mixed[1])], timings={"load": 0.1})


def finish_job(sf, job_id: str, result: dict | None = None) -> None:
    assert job_repo.claim(sf, "test-worker", job_id=job_id) is not None
    assert job_repo.complete(sf, job_id, "test-worker", result or {"ok": True})


def submit(client, headers, body=None, **extra_headers):
    r = client.post("/search", json=body or SEARCH, headers={**headers, **extra_headers})
    assert r.status_code == 202, r.text
    return r.json()


# --- keys --------------------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_checked(api, sf, settings):
    client, a, _ = api
    key = a["Authorization"].split()[1]
    with sf() as s:
        rows = list(s.scalars(select(ApiKey)))
    assert len(rows) == 2
    assert all(key not in (r.key_hash, r.prefix, r.name) for r in rows)
    assert any(r.key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key) for r in rows)
    assert client.get("/searches", headers=a).status_code == 200
    for bad in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": key},
        {"Authorization": "Bearer " + key[:-1] + ("A" if key[-1] != "A" else "B")},
    ):
        r = client.get("/searches", headers=bad)
        assert r.status_code == 401 and r.json()["detail"]
    # revocation: immediate without the verified-key cache, within its TTL with it
    assert repo.revoke_api_key(sf, rows[0].tenant_id, rows[0].prefix)
    with TestClient(create_app(Settings(data_dir=settings.data_dir, api_key_cache_seconds=0), sf)) as fresh:
        revoked = [h for h in (a, api[2]) if fresh.get("/searches", headers=h).status_code == 401]
    assert len(revoked) == 1


def test_cli_creates_a_working_key(tmp_path, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setenv("BITSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BITSEARCH_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--tenant", "cli-team"]) == 0
        key = [l for l in capsys.readouterr().out.splitlines() if l.startswith("bsk_")][0]
        assert main(["keys", "create", "--tenant", "bad name!"]) == 2
        settings = get_settings()
        with TestClient(create_app(settings)) as client:
            assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        get_settings.cache_clear()


# --- searches ----------------------------------------------------------------------------------------------


def test_search_is_accepted_and_runs_as_a_search_job(api, sf):
    client, a, _ = api
    acc = submit(client, a)
    assert acc["url"].endswith(f"/searches/{acc['id']}") and acc["status"] == "queued"
    job = job_repo.get(sf, acc["job_id"])
    assert job.kind == "search" and job.tenant_id is not None
    assert job.spec["model"] == "zoo:digits-mlp" and job.spec["data"] == "zoo:digits"
    assert job.spec["budgets"] == [{"metric": "avg_weight_bits", "value": "4bits"}]
    assert job.spec["_search_id"] == acc["id"]
    from bitsearch import SearchSpec
    from service.api.search_job import pipeline_spec

    # what the worker runs is the typed spec, with the spec's own defaults for what the request left out
    spec = SearchSpec.parse(pipeline_spec(job.spec))
    assert spec.budgets[0].limit() == 4.0 and spec.sensitivity.method == SearchSpec().sensitivity.method
    got = client.get(acc["url"], headers=a).json()
    assert got["status"] == "queued" and got["job_id"] == acc["job_id"] and got["timings"]["created_at"]
    assert client.get(f"/searches/{acc['id']}/pareto", headers=a).status_code == 404  # no results yet


def test_a_search_its_job_and_their_link_are_stored_together(api, sf):
    client, a, _ = api
    acc = submit(client, a)
    assert repo.search_job_ids(sf, job_repo.get(sf, acc["job_id"]).tenant_id, acc["id"]) == [acc["job_id"]]


def test_a_search_that_cannot_be_queued_is_refused_and_leaves_nothing_behind(sf, settings):
    """With a broker that is down, POST /search answers 503, and neither the search nor a runnable job stays."""
    down = Settings(data_dir=settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    key, _ = create_key(sf, "no-broker")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(down, sf)) as client:
        r = client.post("/search", json=SEARCH, headers=h)
        assert r.status_code == 503 and "could not queue the search" in r.json()["detail"]
        assert client.get("/searches", headers=h).json()["total"] == 0
    assert job_repo.list_jobs(sf, status="queued") == []
    assert [j.status for j in job_repo.list_jobs(sf, kind="search")] == [JobStatus.cancelled]


def test_links_match_starlettes_url_for(api, sf):
    """The service builds its links from a table of route paths; they must be the ones Starlette builds."""
    from starlette.requests import Request

    from service.api import views

    client, _, _ = api
    app = client.app
    request = Request({"type": "http", "app": app, "scheme": "http", "server": ("testserver", 80),
                       "path": "/", "root_path": "", "headers": [], "query_string": b"", "method": "GET"})
    sid = "a" * 32
    for name, params in [("get_search", {"search_id": sid}), ("get_pareto", {"search_id": sid}),
                         ("get_sensitivity", {"search_id": sid}), ("finetune", {"search_id": sid}),
                         ("get_allocation", {"search_id": sid, "point": 3}), ("get_job", {"job_id": sid})]:
        assert views.url_for(request, name, **params) == str(request.url_for(name, **params))
    assert set(app.state.route_paths) >= {"get_search", "get_job", "get_allocation"}


def test_results_are_stored_and_served(api, sf):
    client, a, _ = api
    acc = submit(client, a)
    counts = persist_outcome(sf, acc["id"], fake_outcome())
    assert counts == {"mixed": 3, "uniform": 2, "recommended": 1}
    finish_job(sf, acc["job_id"], {"search_id": acc["id"], **counts})
    got = client.get(acc["url"], headers=a).json()
    assert got["status"] == "succeeded" and got["progress"] == 1.0
    assert got["timings"]["run_seconds"] is not None and got["summary"]["counts"]["mixed"] == 3

    sens = client.get(f"/searches/{acc['id']}/sensitivity", headers=a).json()
    assert sens["method"] == "fisher" and sens["table"]["schema"] == "bitsearch.sensitivity"

    pareto = client.get(f"/searches/{acc['id']}/pareto", headers=a).json()
    assert [p["kind"] for p in pareto["points"]] == ["mixed"] * 3
    assert [p["label"] for p in pareto["uniform"]] == ["W4A32", "W8A32"]
    assert [p["recommended"] for p in pareto["points"]] == [False, True, False]
    p1 = pareto["points"][1]
    assert p1["predicted"] == pytest.approx(0.4) and p1["measured"]["top1"] == 97.0
    assert p1["measured"]["kl"] is None  # NaN is stored as null
    assert p1["metrics"]["avg_weight_bits"] == pytest.approx(16 / 3) and pareto["front"]["solver"] == "ilp"
    assert pareto["recommendations"] and "allocation" not in p1

    alloc = client.get(p1["allocation_url"], headers=a).json()
    parsed = Allocation.from_dict(alloc)
    assert set(parsed.layers) == {"fc1", "fc2", "fc3"}
    assert client.get(f"/searches/{acc['id']}/allocations/4", headers=a).json()["metadata"] == {}
    assert client.get(f"/searches/{acc['id']}/allocations/5", headers=a).status_code == 404

    # storing again (a retried job) replaces, never duplicates
    persist_outcome(sf, acc["id"], fake_outcome())
    assert len(client.get(f"/searches/{acc['id']}/pareto", headers=a).json()["points"]) == 3


def test_the_stored_outcome_is_the_typed_result():
    from bitsearch import SearchResult

    result = fake_outcome()
    assert SearchResult.from_json(result.to_json()).to_json() == result.to_json()
    table, rows, summary = outcome_rows(result)
    assert [r.recommended for r in rows] == [False, True, False, False, False]
    assert [r.kind for r in rows] == ["mixed"] * 3 + ["uniform"] * 2 and table["schema"] == "bitsearch.sensitivity"
    (rec,) = summary["recommendations"]
    assert rec["index"] == 1 and rec["requested"] and rec["point"]["measured"] == {"top1": 97.0, "kl": None}
    with pytest.raises(Exception, match="SearchResult"):
        outcome_rows({"front": []})  # a plain dict is no longer guessed at


def test_finetune_and_delete(api, sf):
    client, a, b = api
    acc = submit(client, a)
    sid = acc["id"]
    r = client.post(f"/searches/{sid}/finetune", json={}, headers=a)
    assert r.status_code == 409  # not finished yet
    persist_outcome(sf, sid, fake_outcome())
    finish_job(sf, acc["job_id"])
    r = client.post(f"/searches/{sid}/finetune", json={"recipe": {"epochs": 1, "lr": 1e-3}}, headers=a)
    assert r.status_code == 202, r.text
    (ft,) = r.json()["jobs"]
    assert ft["point"] == 1  # the recommended point
    job = job_repo.get(sf, ft["job_id"])
    assert job.kind == "qat" and set(job.spec) == {"model", "weights", "data", "allocation", "recipe"}
    assert job.spec["recipe"]["epochs"] == 1 and job.spec["allocation"]["schema"] == "bitsearch.allocation"
    r = client.post(f"/searches/{sid}/finetune", json={"points": [0, 7]}, headers=a)
    assert r.status_code == 422 and "7" in r.json()["detail"]
    assert client.get(f"/searches/{sid}", headers=a).json()["finetune_jobs"][0]["job_id"] == ft["job_id"]
    assert client.delete(f"/searches/{sid}", headers=b).status_code == 404
    assert client.delete(f"/searches/{sid}", headers=a).status_code == 204
    assert job_repo.get(sf, ft["job_id"]).status == JobStatus.cancelled  # its queued QAT job is cancelled
    assert client.get(f"/searches/{sid}", headers=a).status_code == 404
    assert client.get(f"/searches/{sid}/pareto", headers=a).status_code == 404


def test_delete_cancels_a_queued_search(api, sf):
    client, a, _ = api
    acc = submit(client, a)
    assert client.delete(f"/searches/{acc['id']}", headers=a).status_code == 204
    assert job_repo.get(sf, acc["job_id"]).status == JobStatus.cancelled
    assert persist_outcome(sf, acc["id"], fake_outcome()) is None  # a late worker stores nothing


def test_idempotency_key(api, sf):
    client, a, b = api
    first = submit(client, a, **{"Idempotency-Key": "k-123"})
    r = client.post("/search", json=SEARCH, headers={**a, "Idempotency-Key": "k-123"})
    assert r.status_code == 202 and r.json()["id"] == first["id"] and r.json()["job_id"] == first["job_id"]
    assert r.headers["Idempotent-Replayed"] == "true"
    other = dict(SEARCH, pareto_points=5)
    r = client.post("/search", json=other, headers={**a, "Idempotency-Key": "k-123"})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]
    theirs = submit(client, b, **{"Idempotency-Key": "k-123"})  # keys are per tenant
    assert theirs["id"] != first["id"]
    assert client.get("/searches", headers=a).json()["total"] == 1
    assert len(job_repo.list_jobs(sf, kind="search")) == 2
    r = client.post("/search", json=SEARCH, headers={**a, "Idempotency-Key": "x" * 201})
    assert r.status_code == 422


def test_concurrent_idempotent_posts_make_one_search(api, sf):
    client, a, _ = api
    ids, barrier = [], threading.Barrier(4)

    def post():
        barrier.wait()
        r = client.post("/search", json=SEARCH, headers={**a, "Idempotency-Key": "race"})
        ids.append((r.status_code, r.json().get("id")))

    threads = [threading.Thread(target=post) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert {c for c, _ in ids} == {202} and len({i for _, i in ids}) == 1
    assert len(job_repo.list_jobs(sf, kind="search")) == 1


@pytest.mark.parametrize(
    "body,reason",
    [
        ({**SEARCH, "budgets": [{"metric": "weight_memory", "value": "12 parsecs"}]}, "unit"),
        ({**SEARCH, "budgets": [{"metric": "latency", "value": "2ms"}]}, "latency_table"),
        ({**SEARCH, "budgets": [{"metric": "bops", "value": -1}]}, "positive"),
        (
            {**SEARCH, "budgets": [{"metric": "bops", "value": 1e9}, {"metric": "bops", "value": 2e9}]},
            "one budget",
        ),
        ({**SEARCH, "model": "zoo:nope"}, "unknown zoo model"),
        ({**SEARCH, "model": "0" * 32}, "unknown model"),
        ({**SEARCH, "data": "f" * 32}, "unknown data set"),
        ({**SEARCH, "data": "zoo:imagenet"}, "unknown zoo data set"),
        ({**SEARCH, "options": {"weight_bits": [9]}}, "weight_bits"),
        ({**SEARCH, "options": {"pins": {"fc1": "4/99"}}}, "pin"),
        ({**SEARCH, "sensitivity": {"method": "astrology"}}, "unknown sensitivity method"),
        ({**SEARCH, "solver": {"name": "guess"}}, "unknown solver"),
        ({**SEARCH, "quant": {"weight_clip": "nope"}}, "weight_clip"),
        ({**SEARCH, "colour": "blue"}, "extra"),
        ({**SEARCH, "qat": {"optimizer": "magic"}}, "optimizer"),
        ({**SEARCH, "qat": {"learning_rate": 1}}, "unknown QAT recipe field"),
        ({**SEARCH, "model": "zoo:digits\x00"}, "NUL"),
        ({**SEARCH, "pareto_points": 0}, "greater"),
    ],
)
def test_bad_requests_are_4xx_with_a_reason(api, body, reason):
    client, a, _ = api
    r = client.post("/search", json=body, headers=a)
    assert r.status_code == 422, r.text
    assert reason.lower() in str(r.json()["detail"]).lower()


def test_malformed_json_and_nan_are_422(api):
    client, a, _ = api
    for raw in (b"{", b'{"model": "zoo:digits-mlp", "pareto_points": NaN}', b"[]", b"\xff\xfe"):
        r = client.post("/search", content=raw, headers={**a, "Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    r = client.post(
        "/search", content=b"x" * (9 * 1024**2), headers={**a, "Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_search_listing_pages_and_filters(api, sf):
    client, a, _ = api
    made = [submit(client, a) for _ in range(3)]
    submit(client, a, dict(SEARCH, model="zoo:digits-cnn"))
    finish_job(sf, made[0]["job_id"])
    page = client.get("/searches", params={"limit": 2, "offset": 0}, headers=a).json()
    assert page["total"] == 4 and len(page["items"]) == 2
    page2 = client.get("/searches", params={"limit": 2, "offset": 2}, headers=a).json()
    assert {i["id"] for i in page["items"]}.isdisjoint({i["id"] for i in page2["items"]})
    assert client.get("/searches", params={"status": "succeeded"}, headers=a).json()["total"] == 1
    assert client.get("/searches", params={"model": "zoo:digits-cnn"}, headers=a).json()["total"] == 1
    assert client.get("/searches", params={"status": "weird"}, headers=a).status_code == 422
    assert client.get("/searches", params={"limit": 0}, headers=a).status_code == 422


# --- tenant isolation -----------------------------------------------------------------------------------------


def test_no_tenant_sees_or_touches_another_tenants_resources(api, sf, settings):
    client, a, b = api
    acc = submit(client, a)
    persist_outcome(sf, acc["id"], fake_outcome())
    sched = client.post(
        "/schedules", json={"name": "nightly", "cron": "0 3 * * *", "spec": SEARCH}, headers=a
    )
    assert sched.status_code == 201, sched.text
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    ds = client.post("/datasets", files={"file": ("d.npz", buf.getvalue())}, headers=a)
    assert ds.status_code == 201, ds.text
    sid, jid, sch, did = acc["id"], acc["job_id"], sched.json()["id"], ds.json()["id"]
    for path in (
        f"/searches/{sid}",
        f"/searches/{sid}/sensitivity",
        f"/searches/{sid}/pareto",
        f"/searches/{sid}/allocations/0",
        f"/jobs/{jid}",
        f"/schedules/{sch}",
        f"/datasets/{did}",
    ):
        assert client.get(path, headers=a).status_code == 200, path
        r = client.get(path, headers=b)
        assert r.status_code == 404 and "detail" in r.json(), path
    assert client.post(f"/jobs/{jid}/cancel", headers=b).status_code == 404
    assert client.post(f"/searches/{sid}/finetune", json={}, headers=b).status_code == 404
    for path in (f"/searches/{sid}", f"/schedules/{sch}", f"/datasets/{did}"):
        assert client.delete(path, headers=b).status_code == 404
    for path in ("/searches", "/jobs", "/schedules", "/datasets", "/models"):
        assert client.get(path, headers=b).json()["total"] == 0, path
    # B cannot reference A's uploads either
    r = client.post("/search", json=dict(SEARCH, data=did), headers=b)
    assert r.status_code == 422 and "unknown data set" in r.json()["detail"]
    assert job_repo.get(sf, jid).status == JobStatus.queued  # untouched
    assert client.get(f"/searches/{sid}", headers=a).json()["status"] == "queued"


# --- jobs and schedules ----------------------------------------------------------------------------------------


def test_jobs_list_show_cancel(api, sf):
    client, a, _ = api
    s1, s2 = submit(client, a), submit(client, a)
    finish_job(sf, s1["job_id"])
    jobs = client.get("/jobs", headers=a).json()
    assert jobs["total"] == 2 and {j["kind"] for j in jobs["items"]} == {"search"}
    assert client.get("/jobs", params={"status": "queued"}, headers=a).json()["total"] == 1
    assert client.get("/jobs", params={"kind": "qat"}, headers=a).json()["total"] == 0
    one = client.get(f"/jobs/{s1['job_id']}", headers=a).json()
    assert one["status"] == "succeeded" and "spec" not in one
    r = client.post(f"/jobs/{s2['job_id']}/cancel", headers=a)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.get(f"/searches/{s2['id']}", headers=a).json()["status"] == "cancelled"
    assert client.get("/jobs/not-an-id", headers=a).status_code == 404
    assert client.get(f"/jobs/{'a' * 32}", headers=a).status_code == 404


def test_schedules(api, sf, settings):
    from service.schedules import fire_due

    client, a, _ = api
    r = client.post(
        "/schedules",
        json={"name": "every 5", "cron": "*/5 * * * *", "kind": "search", "spec": SEARCH},
        headers=a,
    )
    assert r.status_code == 201, r.text
    sched = r.json()
    assert sched["request"]["model"] == "zoo:digits-mlp" and sched["enabled"]
    ptq = client.post(
        "/schedules",
        json={
            "name": "ptq",
            "cron": "0 0 * * 0",
            "kind": "ptq",
            "spec": {"model": "zoo:digits-mlp", "bits": ["8/8"]},
        },
        headers=a,
    )
    assert ptq.status_code == 201, ptq.text
    assert client.get("/schedules", headers=a).json()["total"] == 2
    for bad, reason in (
        ({"cron": "61 * * * *"}, "cron"),
        ({"spec": {"model": "zoo:x"}}, "unknown zoo model"),
        ({"spec": {"budgets": []}}, "model"),
        ({"kind": "shell"}, "kind"),
    ):
        body = {"name": "x", "cron": "* * * * *", "spec": SEARCH, **bad}
        r = client.post("/schedules", json=body, headers=a)
        assert r.status_code == 422 and reason in str(r.json()["detail"]), (bad, r.text)
    # a tick fires a job the tenant owns
    with sf.begin() as s:
        s.execute(update(Schedule).values(created_at=utcnow() - timedelta(days=8)))
    fired = fire_due(sf, settings=settings)
    assert len(fired) == 2
    jobs = client.get("/jobs", headers=a).json()
    assert {j["id"] for j in jobs["items"]} >= set(fired)
    assert client.delete(f"/schedules/{sched['id']}", headers=a).status_code == 204
    assert client.get(f"/schedules/{sched['id']}", headers=a).status_code == 404
    assert {j["id"] for j in client.get("/jobs", headers=a).json()["items"]} >= set(fired)  # still theirs


def test_scheduled_search_job_creates_its_search(api, sf, settings, monkeypatch):
    client, a, _ = api
    from service.schedules import fire_due

    client.post("/schedules", json={"name": "s", "cron": "* * * * *", "spec": SEARCH}, headers=a)
    with sf.begin() as s:
        s.execute(update(Schedule).values(created_at=utcnow() - timedelta(hours=1)))
    (job_id,) = fire_due(sf, settings=settings)
    _run_worker_once(sf, monkeypatch, _fake_run_search())
    assert job_repo.get(sf, job_id).status == JobStatus.succeeded
    items = client.get("/searches", headers=a).json()["items"]
    assert len(items) == 1 and items[0]["job_id"] == job_id and items[0]["status"] == "succeeded"
    assert len(client.get(f"/searches/{items[0]['id']}/pareto", headers=a).json()["points"]) == 3


# --- health, readiness, metrics ------------------------------------------------------------------------------


def test_health_ready_metrics(api, sf, settings):
    client, a, _ = api
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    submit(client, a)
    client.get(f"/searches/{'0' * 32}", headers=a)
    text = client.get("/metrics").text
    assert 'bitsearch_http_requests_total{method="POST",route="/search",status="202"} 1.0' in text
    assert 'route="/searches/{search_id}",status="404"' in text
    assert "bitsearch_http_request_duration_seconds_bucket" in text
    assert 'bitsearch_jobs{kind="search",status="queued"} 1.0' in text
    broken = Settings(data_dir=settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(broken, sf)) as c2:
        r = c2.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("unreachable")


def test_readyz_reports_an_unreachable_database(settings):
    dead = sessionmaker(make_engine("postgresql://nobody@127.0.0.1:1/none"))
    with TestClient(create_app(settings, dead)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["database"].startswith("unreachable")
        assert (
            client.get(
                "/searches", headers={"Authorization": "Bearer " + "bsk_" + "0" * 12 + "_" + "a" * 43}
            ).status_code
            == 503
        )


# --- workers: restart mid-search, and the real pipeline ---------------------------------------------------


def _fake_run_search(delay: float = 0.0):
    def run_search(spec, progress):
        assert spec.model.startswith("zoo:")
        for i in range(3):
            progress(i / 3, f"step {i}")
            time.sleep(delay)
        return fake_outcome()

    return run_search


def _run_worker_once(sf, monkeypatch, run_search, stale_after: float = 30.0) -> None:
    """One local worker (`work_loop`) on the test database, with `run_search` as the pipeline."""
    import service.pipeline
    from service.jobs.local import work_loop

    monkeypatch.setattr(service.pipeline, "run_search", run_search, raising=False)
    monkeypatch.setenv("BITSEARCH_DATABASE_URL", db_url(sf))
    monkeypatch.setenv("BITSEARCH_STALE_AFTER", str(stale_after))
    monkeypatch.setenv("BITSEARCH_HEARTBEAT_INTERVAL", "0.1")
    monkeypatch.setenv("BITSEARCH_POLL_INTERVAL", "0.05")
    get_settings.cache_clear()
    try:
        done = []
        t = threading.Thread(
            target=lambda: done.append(work_loop(max_jobs=1, idle_exit=20, db_url=db_url(sf)))
        )
        t.start()
        t.join(60)
        assert done == [1]
    finally:
        get_settings.cache_clear()


def test_restart_mid_search_and_the_search_still_completes(sf, settings, monkeypatch):
    key, _ = create_key(sf, "restarts")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, sf)) as client:
        acc = submit(client, h)
    # A worker took the job, reported progress, then the whole service went down (no more heartbeats).
    assert job_repo.claim(sf, "worker-that-died", job_id=acc["job_id"]) is not None
    assert job_repo.heartbeat(sf, acc["job_id"], "worker-that-died", 0.4, "measuring sensitivity")
    with sf.begin() as s:
        s.execute(
            update(Job).where(Job.id == acc["job_id"]).values(heartbeat_at=utcnow() - timedelta(minutes=5))
        )
    sf.kw["bind"].dispose()

    # The service restarts: a new engine, a new app, a new worker that finds the lost job and finishes it.
    sf2 = sessionmaker(make_engine(db_url(sf)), expire_on_commit=False)
    with TestClient(create_app(settings, sf2)) as client:
        assert client.get(acc["url"], headers=h).json()["status"] == "running"
        _run_worker_once(sf2, monkeypatch, _fake_run_search(), stale_after=1.0)
        got = client.get(acc["url"], headers=h).json()
        assert got["status"] == "succeeded" and got["attempts"] == 2, got
        pareto = client.get(f"/searches/{acc['id']}/pareto", headers=h).json()
        assert len(pareto["points"]) == 3 and len(pareto["uniform"]) == 2


def test_a_failing_search_keeps_its_reason(sf, settings, monkeypatch):
    key, _ = create_key(sf, "no-pipeline")
    with TestClient(create_app(settings, sf)) as client:
        acc = submit(client, {"Authorization": f"Bearer {key}"})

    def broken(spec, progress):
        from quant.errors import BitsearchError

        raise BitsearchError("budget infeasible: avg_weight_bits must be at least 2")

    _run_worker_once(sf, monkeypatch, broken)
    job = job_repo.get(sf, acc["job_id"])
    assert job.status == JobStatus.failed and "infeasible" in job.error


@pytest.mark.slow
def test_end_to_end_with_the_real_pipeline(tmp_path, settings, monkeypatch):
    import service.pipeline

    if not hasattr(service.pipeline, "run_search"):
        pytest.skip("service.pipeline.run_search is not written yet")
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "e2e")
    h = {"Authorization": f"Bearer {key}"}
    body = dict(TINY_SEARCH)
    with TestClient(create_app(settings, sf)) as client:
        acc = submit(client, h, body)
        _run_worker_once(sf, monkeypatch, service.pipeline.run_search)
        got = client.get(acc["url"], headers=h).json()
        assert got["status"] == "succeeded", got["error"]
        pareto = client.get(f"/searches/{acc['id']}/pareto", headers=h).json()
        assert pareto["points"] and pareto["uniform"]
        for p in pareto["points"]:
            alloc = Allocation.from_dict(client.get(p["allocation_url"], headers=h).json())
            assert set(alloc.layers) == {"fc1", "fc2", "fc3"}
        sens = client.get(f"/searches/{acc['id']}/sensitivity", headers=h).json()
        assert sens["table"]["schema"] == "bitsearch.sensitivity"
        assert all(math.isfinite(p["predicted"]) for p in pareto["points"] if p["predicted"] is not None)
