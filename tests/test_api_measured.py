"""POST /search with the measured solvers (bayes, bomp-nas, qbitopt) on the digits models, tiny settings:
round trips through a real worker, and the 422s of requests they cannot serve."""

from __future__ import annotations

import pytest

from quant.allocation import Allocation
from tests.test_api import _fresh_settings, _run_worker_once, api, settings, sf, submit  # noqa: F401

BASE = {"model": "zoo:digits-mlp", "data": "zoo:digits", "options": {"weight_bits": [2, 4, 8]}, "calib_size": 64}


@pytest.mark.parametrize("body, reason", [
    ({**BASE, "data": "none", "calib_size": 64, "solver": {"name": "bomp-nas"}}, "training data"),
    ({**BASE, "data": "none", "budgets": [{"metric": "avg_weight_bits", "value": 3}],
      "solver": {"name": "qbitopt"}}, "training data"),
    ({**BASE, "data": "none", "solver": {"name": "bayes", "settings": {"scorer": "qaft"}}}, "training data"),
    ({**BASE, "solver": {"name": "bomp-nas", "settings": {"colour": 1}}}, "colour"),
    ({**BASE, "solver": {"name": "bomp-nas", "settings": {"weight_bits": [9]}}}, "weight_bits"),
    ({**BASE, "solver": {"name": "qbitopt", "settings": {"every_k": 10}}}, "budget"),
    ({**BASE, "budgets": [{"metric": "avg_weight_bits", "value": 3}],
      "solver": {"name": "qbitopt", "settings": {"every_k": 900, "recipe": {"steps": 100}}}}, "every_k"),
    ({**BASE, "solver": {"name": "bayes", "settings": {"scorer": "psychic"}}}, "scorer"),
    ({**BASE, "solver": {"name": "bayes", "settings": {"storage": "sqlite:///x.db"}}}, "storage"),
])
def test_unservable_measured_searches_are_422_before_queueing(api, body, reason):
    client, h, _ = api
    r = client.post("/search", json=body, headers=h)
    assert r.status_code == 422, r.text
    assert reason in r.text
    assert client.get("/searches", headers=h).json()["items"] == []  # nothing stored, nothing queued


def test_unreshapeable_model_is_refused_for_bomp_nas(tmp_path, settings):  # noqa: F811
    from quant.errors import BitsearchError
    from service.api.search_job import check_spec

    spec = {"model": "/srv/uploads/model.pt2", "data": "zoo:digits", "solver": {"name": "bomp-nas"}}
    with pytest.raises(BitsearchError, match="cannot reshape"):
        check_spec(spec)


def _round_trip(api, sf, monkeypatch, body):  # noqa: F811
    """Submit `body`, let one real worker run it, and read back the search, its front and allocations."""
    import service.pipeline

    client, h, _ = api
    acc = submit(client, h, body)
    _run_worker_once(sf, monkeypatch, service.pipeline.run_search)
    got = client.get(acc["url"], headers=h).json()
    assert got["status"] == "succeeded", got["error"]
    pareto = client.get(f"/searches/{acc['id']}/pareto", headers=h).json()
    allocs = [Allocation.from_dict(client.get(p["allocation_url"], headers=h).json()) for p in pareto["points"]]
    return acc, pareto, allocs


@pytest.mark.slow
def test_bayes_round_trip_keeps_its_study_in_the_service_database(api, sf, monkeypatch):  # noqa: F811
    import optuna

    from search.study_storage import make_storage
    from service.measured_search import study_url

    body = {**BASE, "budgets": [{"metric": "avg_weight_bits", "value": 5}], "pareto_points": 2,
            "solver": {"name": "bayes", "settings": {"n_trials": 5}}}
    acc, pareto, allocs = _round_trip(api, sf, monkeypatch, body)
    assert pareto["points"] and all(set(a.layers) == {"fc1", "fc2", "fc3"} for a in allocs)
    url = sf.kw["bind"].url.render_as_string(hide_password=False)
    study = optuna.load_study(study_name=f"search-{acc['id']}", storage=make_storage(study_url(url)))
    assert len(study.get_trials()) >= 5


@pytest.mark.slow
def test_bomp_nas_round_trip_front_carries_architectures_and_fans_out(api, sf, monkeypatch):  # noqa: F811
    from db import jobs as job_repo
    from db.models import Job
    from sqlalchemy import select

    body = {**BASE, "budgets": [{"metric": "weight_memory", "value": "6KB"}],
            "solver": {"name": "bomp-nas", "settings": {"total_trials": 3, "train_steps": 5, "qaft_steps": 5,
                                                        "batch_size": 32, "workers": 2,
                                                        "space": {"width": [0.125, 0.25]}}}}  # all fit 6 KB
    acc, pareto, allocs = _round_trip(api, sf, monkeypatch, body)
    assert allocs and all("arch" in a.metadata for a in allocs)
    for a in allocs:  # each point's layers are its own architecture's
        depth = a.metadata["arch"]["depth"]
        assert len(a.layers) == depth + 1
    assert all(p["metrics"]["weight_memory"] <= 6 * 1024 * 8 for p in pareto["points"])
    # the trial job queued by the search finds the study done when a worker gets to it: it runs nothing
    with sf() as s:
        trial_jobs = s.scalars(select(Job).where(Job.kind == "study-trials")).all()
    assert len(trial_jobs) == 1
    _run_worker_once(sf, monkeypatch, None)
    queued = job_repo.get(sf, trial_jobs[0].id)
    assert queued.status.value == "succeeded" and queued.result["study_done"] == 3


@pytest.mark.slow
def test_qbitopt_round_trip_stores_a_qat_point_and_its_bits_history(api, sf, monkeypatch):  # noqa: F811
    body = {**BASE, "model": "zoo:digits-cnn", "budgets": [{"metric": "avg_weight_bits", "value": 3}],
            "solver": {"name": "qbitopt", "settings": {"every_k": 4, "recipe": {"steps": 12, "batch_size": 32,
                                                                                "device": "cpu"}}}}
    acc, pareto, allocs = _round_trip(api, sf, monkeypatch, body)
    assert len(allocs) == 1
    meta = allocs[0].metadata["qbitopt"]
    assert meta["history"] and meta["bits_history"]["steps"] == [h["step"] for h in meta["history"]]
    assert pareto["points"][0]["measured"]["qat"] is True
    assert pareto["points"][0]["metrics"]["avg_weight_bits"] <= 3 + 1e-9


@pytest.mark.slow
def test_cli_runs_bomp_nas_and_writes_points_with_their_architecture(tmp_path, capsys):
    import json

    from service.cli import main

    out = tmp_path / "nas.json"
    code = main(["search", "--model", "zoo:digits-mlp", "--data", "zoo:digits", "--weight-bits", "2,4,8",
                 "--budget", "weight_memory=6KB", "--solver", "bomp-nas", "--solver-param", "total_trials=2",
                 "--solver-param", "train_steps=3", "--solver-param", "qaft_steps=3", "--solver-param", "workers=1",
                 "--solver-param", 'space={"width": [0.125, 0.25]}',
                 "--json", str(out)])
    assert code == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    points = result["front"]["points"]
    assert points and all("arch" in p["allocation"]["metadata"] for p in points)
    assert result["recommendations"] and result["recommendations"][0]["report"]["top1"] is not None
