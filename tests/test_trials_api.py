"""GET /searches/{id}/trials (the trials of a bayes or bomp-nas search's study) and
GET /searches/{id}/bits-history (QBitOpt's per-layer bits over training): real round trips of tiny digits
searches, seeded studies for the counting and the Pareto marks, and tenant isolation."""

from __future__ import annotations

import json
import math

import pytest

from bench.dashboard import add_synthetic_trials, seed_search, study_storage_of, synthetic_bits_history, \
    synthetic_outcome
from tests.test_api import _fresh_settings, _run_worker_once, api, settings, sf, submit  # noqa: F401
from tests.test_api_measured import BASE, _round_trip


def tenant_of(sf, headers: dict) -> str:
    from service.api.auth import authenticate

    return authenticate(sf, headers["Authorization"].split()[1])


def dashboard_get(client, headers: dict, path: str) -> dict:
    """A dashboard JSON endpoint, with the session cookie the login sets (the key of `headers`)."""
    r = dashboard_response(client, headers, path)
    assert r.status_code == 200, r.text
    return r.json()


def dashboard_response(client, headers: dict, path: str):
    client.cookies.set("bitsearch_key", headers["Authorization"].split()[1])
    try:
        return client.get(path)
    finally:
        client.cookies.clear()


def dominated(t: dict, others: list[dict], maximize: bool = True) -> bool:
    """Whether another measured trial is at least as good on both objectives and better on one."""
    s = 1.0 if maximize else -1.0
    return any(
        o is not t and s * o["score"] >= s * t["score"] and o["cost"] <= t["cost"]
        and (s * o["score"] > s * t["score"] or o["cost"] < t["cost"])
        for o in others
    )


def check_pareto_marks(body: dict) -> list[dict]:
    measured = [t for t in body["trials"] if t["measured"]]
    maximize = body["direction"] == "maximize"
    for t in measured:
        assert t["pareto"] == (not dominated(t, measured, maximize)), t["number"]
    assert not any(t["pareto"] for t in body["trials"] if not t["measured"])
    return measured


def test_a_seeded_studys_trials_pareto_marks_and_counts(api, sf):  # noqa: F811
    client, h, h_b = api
    from db import repo

    tenant_a = tenant_of(sf, h)
    search_id = seed_search(sf, tenant_a, synthetic_outcome(points=3, layers=4), model="zoo:digits-mlp",
                            solver={"name": "bomp-nas"})
    add_synthetic_trials(study_storage_of(sf), search_id, n=30, seed=3, failed=2, over_budget=3, total=40)

    r = client.get(f"/searches/{search_id}/trials", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["solver"] == "bomp-nas" and body["exists"] and body["cost_metric"] == "weight_memory"
    assert len(body["trials"]) == 35
    measured = check_pareto_marks(body)
    assert len(measured) == 30 and 1 <= sum(t["pareto"] for t in measured) < 30
    p = body["progress"]
    assert (p["total"], p["done"], p["failed"], p["infeasible"], p["running"]) == (40, 35, 2, 3, 0)
    for t in measured:  # one bit option per layer of the trial's own architecture
        assert len(t["bits"]) == t["arch"]["depth"] + 1 and t["cost"] == t["metrics"]["weight_memory"]
    failed = [t for t in body["trials"] if t["state"] == "FAIL"]
    assert all(t["score"] is None and "timeout" in t["error"] for t in failed)

    # another tenant's search is not found; a search of this solver has no bits history
    assert client.get(f"/searches/{search_id}/trials", headers=h_b).status_code == 404
    r = client.get(f"/searches/{search_id}/bits-history", headers=h)
    assert r.status_code == 404 and "qbitopt" in r.json()["detail"]
    assert repo.get_search(sf, tenant_a, search_id) is not None


def test_searches_without_trials_or_study(api, sf):  # noqa: F811
    client, h, _ = api
    tenant_a = tenant_of(sf, h)
    ilp = seed_search(sf, tenant_a, synthetic_outcome(points=3, layers=4))
    r = client.get(f"/searches/{ilp}/trials", headers=h)
    assert r.status_code == 404 and "no trials" in r.json()["detail"]
    assert client.get(f"/searches/{'0' * 32}/trials", headers=h).status_code == 404
    # a bayes search whose study the job has not created yet: no trials, nothing created by reading
    fresh = seed_search(sf, tenant_a, synthetic_outcome(points=3, layers=4), model="zoo:digits-mlp",
                        solver={"name": "bayes", "settings": {"n_trials": 7}})
    body = client.get(f"/searches/{fresh}/trials", headers=h).json()
    assert body["exists"] is False and body["trials"] == [] and body["progress"]["total"] == 7


def test_bits_history_of_a_running_qbitopt_search_comes_from_its_job(api, sf, settings):  # noqa: F811
    from db import jobs as job_repo
    from db import repo
    from db.models import new_id
    from search.measured import HISTORY_FILE
    client, h, h_b = api
    tenant_a = tenant_of(sf, h)
    search, _ = repo.create_search(sf, search_id=new_id(), tenant_id=tenant_a, model_ref="zoo:digits-cnn",
                                   data_ref="zoo:digits", request={"model": "zoo:digits-cnn",
                                                                   "solver": {"name": "qbitopt"}}, spec={})
    job = job_repo.submit(sf, "search", {}, "held", 1)
    repo.link_job(sf, search.id, job.id, tenant_a, "search")
    r = client.get(f"/searches/{search.id}/bits-history", headers=h)
    assert r.status_code == 404 and "no bits history yet" in r.json()["detail"]
    job_repo.claim(sf, "test", job_id=job.id)
    history = synthetic_bits_history(["conv1", "conv2", "fc"], steps=3, every_k=10)
    (settings.jobs_dir / job.id).mkdir(parents=True)
    (settings.jobs_dir / job.id / HISTORY_FILE).write_text(json.dumps(history))
    body = client.get(f"/searches/{search.id}/bits-history", headers=h).json()
    assert body["source"] == "running" and body["steps"] == [10, 20, 30]
    assert [l["name"] for l in body["layers"]] == ["conv1", "conv2", "fc"]
    assert body["layers"][0]["weight_bits"][0] == 4 and body["layers"][0]["labels"][0] == "W4A8"
    assert client.get(f"/searches/{search.id}/bits-history", headers=h_b).status_code == 404
    assert client.get(f"/searches/{search.id}/trials", headers=h).status_code == 404


@pytest.mark.slow
def test_bayes_round_trip_serves_its_trials(api, sf, monkeypatch):  # noqa: F811
    client, h, h_b = api
    body = {**BASE, "budgets": [{"metric": "avg_weight_bits", "value": 5}], "pareto_points": 2,
            "solver": {"name": "bayes", "settings": {"n_trials": 4, "warm_start_points": 1}}}
    acc, pareto, _ = _round_trip(api, sf, monkeypatch, body)
    r = client.get(f"/searches/{acc['id']}/trials", headers=h)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["solver"] == "bayes" and got["status"] == "succeeded" and got["score_name"] == "top1"
    assert got["cost_metric"] == "avg_weight_bits" and got["direction"] == "maximize"
    finished = [t for t in got["trials"] if t["state"] == "COMPLETE"]
    assert len(finished) == 4 and got["progress"]["done"] == got["progress"]["total"] == 4
    measured = check_pareto_marks(got)
    assert measured and any(t["pareto"] for t in measured)
    for t in finished:
        assert set(t["bits"]) == {"fc1", "fc2", "fc3"} and set(t["bits"].values()) <= {"W2Afp", "W4Afp", "W8Afp"}
        assert math.isclose(t["cost"], t["metrics"]["avg_weight_bits"])
        if t["measured"]:
            assert 0.0 <= t["score"] <= 100.0
    assert pareto["points"]  # the front the study's picks fed
    # the dashboard shapes the same trials for its scatter: every measured one drawn, the same Pareto marks
    chart = dashboard_get(client, h, f"/ui/api/searches/{acc['id']}/trials")
    assert [p["number"] for p in chart["points"]] == [t["number"] for t in measured]
    assert [p["pareto"] for p in chart["points"]] == [t["pareto"] for t in measured]
    assert chart["default_x"] == "avg_weight_bits" and chart["progress"]["done"] == 4
    assert all("bits: fc1 W" in p["hover"] for p in chart["points"])
    page = dashboard_response(client, h, f"/ui/searches/{acc['id']}")
    assert page.status_code == 200 and 'id="trials-card"' in page.text and 'id="bits-card"' not in page.text
    assert client.get(f"/searches/{acc['id']}/trials", headers=h_b).status_code == 404
    assert client.get(f"/searches/{acc['id']}/bits-history", headers=h).status_code == 404


@pytest.mark.slow
def test_qbitopt_round_trip_serves_its_bits_over_training(api, sf, monkeypatch, request):  # noqa: F811
    if request.node.callspec.id == "postgres":
        pytest.skip("the bits history is read from the stored point alone: the SQLite run covers it")
    client, h, h_b = api
    body = {**BASE, "model": "zoo:digits-cnn", "budgets": [{"metric": "avg_weight_bits", "value": 3}],
            "solver": {"name": "qbitopt", "settings": {"every_k": 4, "recipe": {"steps": 12, "batch_size": 32,
                                                                                "device": "cpu"}}}}
    acc, _, allocs = _round_trip(api, sf, monkeypatch, body)
    r = client.get(f"/searches/{acc['id']}/bits-history", headers=h)
    assert r.status_code == 200, r.text
    got = r.json()
    stored = allocs[0].metadata["qbitopt"]["history"]
    assert got["source"] == "result" and got["point"] == 0
    assert got["steps"] == [rec["step"] for rec in stored] and len(got["steps"]) >= 2
    assert [l["name"] for l in got["layers"]] == list(allocs[0].layers)
    for layer in got["layers"]:
        assert len(layer["weight_bits"]) == len(got["steps"]) and set(layer["weight_bits"]) <= {2, 4, 8}
        assert layer["labels"] == [rec["allocation"][layer["name"]] for rec in stored]
    final = {l["name"]: l["weight_bits"][-1] for l in got["layers"]}
    assert final == {n: b.weight_bits for n, b in allocs[0].layers.items()}
    assert client.get(f"/searches/{acc['id']}/bits-history", headers=h_b).status_code == 404
    assert client.get(f"/searches/{acc['id']}/trials", headers=h).status_code == 404
    chart = dashboard_get(client, h, f"/ui/api/searches/{acc['id']}/bits-history")
    assert chart["steps"] == got["steps"] and chart["layers"] == [l["name"] for l in got["layers"]]
    assert chart["bits"] == [l["weight_bits"] for l in got["layers"]]


def test_a_running_searchs_trials_are_read_as_they_start_and_finish(api, sf):  # noqa: F811
    """While the search runs, finished trials are cached between reads: a trial that starts, then finishes,
    and trials added meanwhile all show up."""
    import optuna

    from bench.dashboard import seed_running_search

    client, h, _ = api
    search_id = seed_running_search(sf, tenant_of(sf, h), {"model": "zoo:digits-mlp", "data": "zoo:digits",
                                                           "solver": {"name": "bomp-nas"}})
    storage = study_storage_of(sf)
    add_synthetic_trials(storage, search_id, n=5, seed=1, total=10)
    url = f"/searches/{search_id}/trials"
    assert client.get(url, headers=h).json()["progress"]["done"] == 5
    study = optuna.load_study(study_name=f"search-{search_id}", storage=storage)
    trial = study.ask()  # a worker starts a trial
    body = client.get(url, headers=h).json()
    assert body["status"] == "running" and body["progress"]["running"] == 1
    assert body["trials"][-1]["state"] == "RUNNING" and body["trials"][-1]["score"] is None
    add_synthetic_trials(storage, search_id, n=2, seed=2)  # others finish meanwhile
    trial.set_user_attr("measured", True)
    trial.set_user_attr("metrics", {"weight_memory": 1.0})
    study.tell(trial, [99.0, 1.0])  # the cheapest and best: it dominates every other trial
    body = client.get(url, headers=h).json()
    assert body["progress"]["done"] == 8 and body["progress"]["running"] == 0
    assert [t["number"] for t in body["trials"] if t["pareto"]] == [trial.number]
    check_pareto_marks(body)
