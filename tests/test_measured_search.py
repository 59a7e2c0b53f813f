"""The service side of bayes, bomp-nas and qbitopt: refusals before queueing, the study's database, QBitOpt
resumed from its checkpoint with its bits history, a BOMP-NAS search stored with its architectures."""

from __future__ import annotations

import pytest

from quant.errors import BitsearchError
from service.measured_search import bits_history, check_servable, run_bomp_nas, run_qbitopt, study_url
from zoo import load_digits_splits, load_model


@pytest.mark.parametrize("solver, settings, kw, match", [
    ("bomp-nas", {}, {"model_ref": "zoo:cifar-resnet", "has_train": True}, "cannot reshape"),
    ("bomp-nas", {}, {"model_ref": "/srv/uploads/m.pt2", "has_train": True}, "cannot reshape"),
    ("bomp-nas", {}, {"model_ref": "zoo:digits-cnn", "has_train": False}, "needs training data"),
    ("bomp-nas", {"weight_bits": [1]}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "weight_bits"),
    ("bomp-nas", {"family": "zoo:digits-mlp"}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "unknown"),
    ("qbitopt", {}, {"model_ref": "zoo:digits-cnn", "has_train": False, "budgets": ["avg_wbits=3"]}, "training data"),
    ("qbitopt", {}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "budgets"),
    ("qbitopt", {"every_k": 80, "recipe": {"steps": 100}},
     {"model_ref": "zoo:digits-cnn", "has_train": True, "budgets": ["avg_wbits=3"]}, "every_k"),
    ("qbitopt", {"recipe": {"stepz": 1}}, {"model_ref": "zoo:digits-cnn", "has_train": True,
                                            "budgets": ["avg_wbits=3"]}, "stepz"),
    ("bayes", {"scorer": "qaft"}, {"model_ref": "zoo:digits-cnn", "has_train": False}, "training data"),
    ("bayes", {"scorer": "magic"}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "scorer"),
    ("bayes", {"storage": "sqlite:///x.db"}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "unknown"),
    ("bayes", {"n_trials": 0}, {"model_ref": "zoo:digits-cnn", "has_train": True}, "n_trials"),
])
def test_unservable_requests_are_refused_with_the_reason(solver, settings, kw, match):
    with pytest.raises(BitsearchError, match=match):
        check_servable(solver, settings, **kw)


def test_servable_requests_pass():
    check_servable("bomp-nas", {"total_trials": 4}, model_ref="zoo:digits-mlp", has_train=True,
                   budgets=["weight_memory=4KB"])
    check_servable("qbitopt", {"every_k": 10, "recipe": {"steps": 40}}, model_ref="zoo:digits-cnn", has_train=True,
                   budgets=["avg_wbits=3"])
    check_servable("bayes", {"n_trials": 5}, model_ref="zoo:digits-cnn", has_train=False)
    check_servable("ilp", None, model_ref=None, has_train=False)


def test_studies_live_beside_the_service_database(tmp_path):
    assert study_url(f"sqlite:///{tmp_path}/app.db") == f"sqlite:///{tmp_path}/app-studies.db"
    assert study_url("postgresql://u@h/db") == "postgresql://u@h/db"  # Optuna's own schema there
    with pytest.raises(BitsearchError):
        study_url("sqlite:///:memory:")


def test_bomp_nas_search_resumes_its_study_and_reports_the_recommended_trial(tmp_path):
    db = f"sqlite:///{tmp_path}/app.db"
    settings = {"total_trials": 3, "train_steps": 5, "qaft_steps": 5, "batch_size": 32, "workers": 1,
                "space": {"width": [0.125, 0.25]}}  # every shape fits 6 KB
    test = load_digits_splits(0).test
    out = run_bomp_nas("zoo:digits-mlp", None, None, ["weight_memory=6KB"], settings, study_url(db), "search-1",
                       report=test)
    fr = out["front"]
    assert fr.points and all("arch" in p.allocation.metadata for p in fr.points)
    assert all(p.metrics["weight_memory"] <= 6 * 1024 * 8 for p in fr.points)
    assert len(out["trials"]) == 3 and out["recommendation"]["report"]["top1"] is not None
    # the selection score of the recommended trial is reproduced when it is re-run for the report
    best = fr.points[out["recommendation"]["index"]]
    assert out["recommendation"]["report"]["selection_rerun"] == pytest.approx(best.measured["top1"])
    again = run_bomp_nas("zoo:digits-mlp", None, None, ["weight_memory=6KB"], settings, study_url(db), "search-1")
    assert len(again["trials"]) == 3  # the same study, nothing run twice
    with pytest.raises(BitsearchError, match="none of the study's 3 trials"):  # no shape fits 10 bytes
        run_bomp_nas("zoo:digits-mlp", None, None, ["weight_memory=10B"], settings, study_url(db), "search-2")


def test_qbitopt_resumes_from_its_checkpoint_and_keeps_the_bits_history(tmp_path):
    loaded = load_model("zoo:digits-cnn")
    d = load_digits_splits(0)
    settings = {"every_k": 4, "freeze_at": 0.9, "recipe": {"steps": 16, "batch_size": 32, "checkpoint_every": 4,
                                                           "device": "cpu"}}
    workdir = tmp_path / "job"
    workdir.mkdir()

    class Crash(Exception):
        pass

    def crash_at_10(f, msg):
        if "step 10/" in msg:
            raise Crash()

    with pytest.raises(Crash):
        run_qbitopt(loaded.model, d.train, d.calibration, d.test, ["avg_wbits=3"], settings, [2, 4, 8], [32],
                    workdir=workdir, progress=crash_at_10)
    assert (workdir / "qat-checkpoint.pt").exists()
    first = [h["step"] for h in __import__("json").loads((workdir / "qbitopt-history.json").read_text())]
    assert first == [4, 8]
    out = run_qbitopt(loaded.model, d.train, d.calibration, d.test, ["avg_wbits=3"], settings, [2, 4, 8], [32],
                      workdir=workdir)
    assert out["resumed"] and out["qat"]["steps"] == 16
    assert [h["step"] for h in out["history"]] == [4, 8, 12]  # updates before and after the resume
    p = out["front"].points[0]
    assert p.metrics["avg_weight_bits"] <= 3.0 + 1e-9 and p.measured["qat"] is True
    assert out["recommendation"]["report"]["top1"] is not None
    h = bits_history(out["history"])
    assert h["steps"] == [4, 8, 12] and set(h) - {"steps"} == set(p.allocation.layers)
    assert all(b in (2, 4, 8) for layer, bs in h.items() if layer != "steps" for b in bs)


def test_study_trials_jobs_run_a_fanout_study_through_the_job_system(tmp_path):
    import threading

    from db import jobs as repo
    from search.solvers.bompnas import BompNasConfig, create, front
    from service.jobs.runner import execute
    from service.settings import Settings
    from tests.helpers import make_sf

    sf = make_sf("sqlite", tmp_path)
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'test.db'}")
    url = study_url(settings.db_url)
    cfg = BompNasConfig(family="zoo:digits-mlp", train_steps=5, qaft_steps=5, batch_size=32, total_trials=4)
    create(url, "search-x", cfg, heartbeat_interval=2)
    ids = [repo.submit(sf, "study-trials", {"storage": url, "study": "search-x"}).id for _ in range(2)]

    def work(i):
        job = repo.claim(sf, f"w{i}")
        assert job is not None
        execute(sf, job, f"w{i}", settings)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    results = [repo.get(sf, i) for i in ids]
    assert [j.status.value for j in results] == ["succeeded", "succeeded"], [j.error for j in results]
    ran = [j.result["ran"] for j in results]
    assert sum(ran) == 4  # every trial run once, by one of the two jobs
    # a job leaves when nothing is left to start (the other may still finish its last trial): the last one sees 4
    assert max(j.result["study_done"] for j in results) == 4
    from search.trials import load_fanout_study, progress_of

    assert progress_of(load_fanout_study(url, "search-x")[0].get_trials()).done == 4
    assert front(url, "search-x")


def test_bayes_front_for_the_pipeline_keeps_its_study_in_the_given_database(tmp_path):
    import optuna

    from quant.apply import QuantConfig
    from quant.cost import CostModel
    from search import AllocationProblem, Budget
    from search.measured import measured_front
    from sensitivity import SensitivityOptions, compute_sensitivity

    loaded = load_model("zoo:digits-mlp")
    d = load_digits_splits(0)
    cal = d.train.subset(range(128))
    table = compute_sensitivity(loaded.model, cal, "fisher", SensitivityOptions(weight_bits=(2, 4, 8), samples=128))
    budgets = [Budget("avg_weight_bits", 5.0)]
    problem = AllocationProblem(table, CostModel(table.layers), budgets)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    kw = dict(model=loaded.model, model_ref="zoo:digits-mlp", weights=None, data_ref=None, problem=problem,
              metric="avg_weight_bits", n_points=3, requested=[5.0], quant_config=QuantConfig(), budgets=budgets,
              weight_bits=[2, 4, 8], activation_bits=[32], train=d.train, calibration=cal, selection=d.calibration,
              context={"storage": url, "study": "search-b"})
    front, rec, extras = measured_front("bayes", {"n_trials": 6, "seed": 1}, **kw)
    assert rec is None and front.points and front.solver == "bayes"
    assert all(p.metrics["avg_weight_bits"] <= 5.0 + 1e-9 for p in front.points)
    study = optuna.load_study(study_name="search-b", storage=url)
    assert len(study.get_trials()) == extras["trials"] >= 6
    with pytest.raises(BitsearchError, match="not a measured solver"):
        measured_front("ilp", {}, **kw)
