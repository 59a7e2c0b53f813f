"""One typed contract: the Python API, the CLI and the REST API run the same `SearchSpec` (same defaults, same
front), the result is a typed `SearchResult`, plug-in registries validate settings, and what a worker would
refuse is refused at submission (422)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

import bitsearch
from bitsearch import SearchResult, SearchSpec
from bitsearch.spec import spec_defaults
from db import jobs as job_repo
from db.models import JobStatus
from quant.errors import BitsearchError
from service.api.app import create_app
from service.api.auth import create_key
from service.settings import Settings, get_settings
from tests.helpers import make_sf


class TinyNet(nn.Module):
    """A model the zoo does not know: conv + BN + two linear layers on 8×8 digits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def trained():
    """(TinyNet trained for a few steps on digits, eval arrays (x float32 preprocessed, y))."""
    from zoo import load_digits_splits

    torch.manual_seed(0)
    sp = load_digits_splits()
    m = TinyNet()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(sp.train.x), sp.train.y).backward()
        opt.step()
    m.eval()
    return m, sp


@pytest.fixture(autouse=True)
def _fresh_settings():
    yield
    get_settings.cache_clear()


SPEC = {
    "budgets": ["avg_wbits=4"],
    "options": {"weight_bits": [2, 4, 8]},
    "sensitivity": {"method": "fisher", "samples": 64},
    "pareto_points": 3,
    "calib_size": 64,
}


def _front(result: SearchResult) -> list[tuple]:
    return [(p.kind, {n: b.label() for n, b in p.allocation.layers.items()}, round(p.predicted, 9),
             p.measured.get("top1")) for p in result.points]


def _run_worker(sf, monkeypatch, db_url):
    from service.jobs.local import work_loop

    monkeypatch.setenv("BITSEARCH_DATABASE_URL", db_url)
    monkeypatch.setenv("BITSEARCH_POLL_INTERVAL", "0.05")
    monkeypatch.setenv("BITSEARCH_HEARTBEAT_INTERVAL", "0.1")
    get_settings.cache_clear()
    done: list = []
    t = threading.Thread(target=lambda: done.append(work_loop(max_jobs=1, idle_exit=20, db_url=db_url)))
    t.start()
    t.join(300)
    assert done == [1]


@pytest.mark.slow
def test_python_cli_and_rest_give_the_same_front(trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    model, sp = trained
    x, y = sp.test.x.numpy(), sp.test.y.numpy()
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=x, y=y)
    pt2 = tmp_path / "tiny.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (sp.test.x[:2],), dynamic_shapes=({0: batch},)), str(pt2))

    # Python: the module object and numpy arrays
    py = bitsearch.search(model, (x, y), **SPEC)
    assert py.model == "module:TinyNet" and py.recommendation is not None and len(py.points) >= 4
    assert not model.training  # left as it was given

    # CLI: the exported file and the .npz, the same settings as flags
    out = tmp_path / "cli.json"
    r = CliRunner().invoke(app, ["search", "--model", str(pt2), "--data", str(npz), "--budget", "avg_wbits=4",
                                 "--weight-bits", "2,4,8", "--method", "fisher", "--samples", "64",
                                 "--pareto", "3", "--calib-size", "64", "--json", str(out)])
    assert r.exit_code == 0, r.output
    cli = SearchResult.load(out)
    assert cli.spec.model_dump(exclude={"model", "data"}) == py.spec.model_dump(exclude={"model", "data"})

    # REST: the uploaded model and data set, run by a worker
    settings = Settings(data_dir=tmp_path / "srv")
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "contract")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, sf)) as client:
        mid = client.post("/models", files={"file": ("tiny.pt2", pt2.read_bytes())}, headers=h).json()["id"]
        did = client.post("/datasets", files={"file": ("eval.npz", npz.read_bytes())}, headers=h).json()["id"]
        acc = client.post("/search", json={"model": mid, "data": did, **SPEC}, headers=h)
        assert acc.status_code == 202, acc.text
        _run_worker(sf, monkeypatch, sf.kw["bind"].url.render_as_string(hide_password=False))
        job = job_repo.get(sf, acc.json()["job_id"])
        assert job.status == JobStatus.succeeded, job.error
        pareto = client.get(f"/searches/{acc.json()['id']}/pareto", headers=h).json()
        rest_points = pareto["points"] + pareto["uniform"]
        rest_allocs = [client.get(p["allocation_url"], headers=h).json() for p in rest_points]

    assert _front(cli) == _front(py)
    from quant import Allocation

    rest = [(p["kind"], {n: b.label() for n, b in Allocation.from_dict(a).layers.items()},
             round(p["predicted"], 9), p["measured"].get("top1")) for p, a in zip(rest_points, rest_allocs)]
    assert rest == _front(py)
    assert [r["index"] for r in pareto["recommendations"]] == [r.index for r in py.recommendations]


def test_the_spec_is_the_one_source_of_defaults():
    import typer

    from service.api.schemas import REST_ONLY, SERVER_ONLY, SearchRequest
    from service.api.search_job import build_spec, pipeline_spec
    from service.cli import app

    defaults = spec_defaults()
    # the CLI's flags take the spec's defaults
    cmd = typer.main.get_command(app)
    search = cmd.commands["search"]
    flag = {p.name: p.default for p in search.params}
    assert flag["method"] == defaults["sensitivity.method"] and flag["solver"] == defaults["solver.name"]
    assert flag["pareto"] == defaults["pareto_points"] and flag["samples"] == defaults["sensitivity.samples"]
    assert flag["weight_bits"] == ",".join(map(str, defaults["options.weight_bits"]))
    assert flag["activation_bits"] == ",".join(map(str, defaults["options.activation_bits"]))
    assert flag["calib_size"] == defaults["calib_size"] and flag["seed"] == defaults["seed"]
    assert flag["keep_first_last"] == defaults["options.keep_first_last"]
    from service.cli_search import search_spec_from_flags

    built = search_spec_from_flags("zoo:digits-mlp", None, None, None, [], flag["method"], [], flag["solver"], [],
                                   flag["pareto"], flag["metric"], flag["weight_bits"], flag["activation_bits"],
                                   flag["keep_first_last"], flag["clip"], flag["samples"], flag["calib_size"],
                                   flag["limit"], flag["no_measure"], flag["seed"])
    assert built == SearchSpec(model="zoo:digits-mlp")  # the CLI's defaults are exactly the spec's

    # the REST schema is the spec plus the job's metadata, with the same defaults
    assert set(SearchRequest.model_fields) == set(SearchSpec.model_fields) | set(REST_ONLY)
    rest = SearchRequest(model="zoo:digits-mlp")
    assert rest.spec_part() == SearchSpec(model="zoo:digits-mlp").model_dump(mode="json")
    props = SearchRequest.model_json_schema()["properties"]
    assert set(props) == set(SearchSpec.model_fields) - set(SERVER_ONLY) | set(REST_ONLY)

    # the job stores the spec (plus private "_" keys), and the worker reads it back unchanged
    job = build_spec(rest, {"model": "zoo:digits-mlp", "weights": None}, None, search_id="s", tenant_id="t")
    assert set(pipeline_spec(job)) == set(SearchSpec.model_fields)
    assert SearchSpec.parse(pipeline_spec(job)) == SearchSpec(model="zoo:digits-mlp")


def test_search_result_round_trips_and_recommendations_name_points(trained):
    model, sp = trained
    r = bitsearch.search(model, sp.test, budgets=["avg_wbits=4"], method="fisher", pareto=2,
                         options={"weight_bits": [2, 8]}, sensitivity={"samples": 32}, calib_size=32)
    text = r.to_json()
    back = SearchResult.from_json(text)
    assert back.to_json() == text and back.recommendation.index == r.recommendation.index
    assert back.recommendation.allocation.to_dict() == r.points[r.recommendation.index].allocation.to_dict()
    # the roles are disjoint, and their sizes and seed are recorded
    assert set(r.data) == {"calibration", "selection", "report"}
    assert sum(d["size"] for d in r.data.values()) == len(sp.test) and r.data["report"]["seed"] == 0
    assert r.recommendation.report["n"] == r.data["report"]["size"]
    with pytest.raises(BitsearchError, match="schema"):
        SearchResult.from_dict({"front": {}})
    q = bitsearch.quantize(model, r.recommendation.allocation, calibration=sp.calibration)
    assert q is not model and q(sp.test.x[:3]).shape == (3, 10)


def test_data_roles_are_disjoint_by_construction():
    from bitsearch.data import resolve_data
    from bitsearch.spec import DataRoles

    x = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 4)
    y = torch.arange(100) % 10
    roles = DataRoles(report={"split_of": "data", "size": 30}, selection={"split_of": "report", "size": 10})
    r = resolve_data((x, y), roles, calib_size=20, seed=3)
    ids = {role: set(r.get(role).x[:, 0].int().tolist()) for role in ("calibration", "selection", "report")}
    assert len(ids["selection"]) == 10 and len(ids["report"]) == 20 and len(ids["calibration"]) == 20
    assert not (ids["selection"] & ids["report"]) and not (ids["calibration"] & (ids["selection"] | ids["report"]))
    assert r.record["selection"] == {"split_of": "report", "source": None, "size": 10, "seed": 3}
    with pytest.raises(Exception, match="cycle"):
        DataRoles(report={"split_of": "selection", "size": 1}, selection={"split_of": "report", "size": 1})
    with pytest.raises(BitsearchError, match="label of 12"):
        resolve_data((x, torch.arange(100) % 13), calib_size=10, num_classes=10)


def test_registries_refuse_duplicates_and_check_settings():
    from search.solvers import SOLVERS, Solver
    from sensitivity import METHODS

    class Impostor(Solver):
        name = "ilp"

    with pytest.raises(ValueError, match="already registered"):
        SOLVERS.register(Impostor)
    assert SOLVERS["ilp"].__name__ == "IlpSolver"
    with pytest.raises(BitsearchError, match=r"unknown setting\(s\) \['tim_limit'\]"):
        SOLVERS.check("ilp", {"tim_limit": 3})
    with pytest.raises(BitsearchError, match="time_limit"):
        SOLVERS.check("ilp", {"time_limit": -1})
    with pytest.raises(BitsearchError, match="estimater"):
        METHODS.check("hessian", {"estimater": "auto"})
    with pytest.raises(BitsearchError, match="probing"):
        METHODS.check("hessian", {"probing": "sideways"})
    assert METHODS.check("hessian", {"tol": 0.1}).tol == 0.1
    assert SOLVERS.capabilities("qbitopt").needs_train and not SOLVERS.capabilities("ilp").needs_train
    with pytest.raises(BitsearchError, match="estimater"):  # the library path checks too, not only the API
        from sensitivity import SensitivityOptions, compute_sensitivity

        compute_sensitivity(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(4, 4), "hessian",
                            SensitivityOptions(params={"estimater": "auto"}))


@pytest.fixture
def api(tmp_path):
    settings = Settings(data_dir=tmp_path / "srv")
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "refusals")
    with TestClient(create_app(settings, sf)) as client:
        yield client, {"Authorization": f"Bearer {key}"}, sf


def test_what_a_worker_would_refuse_is_a_422_at_submission(api):
    client, h, sf = api
    base = {"model": "zoo:digits-cnn", "data": "zoo:digits"}
    refused = {
        "bayes with an unknown scorer": ({"solver": {"name": "bayes", "settings": {"scorer": "magic"}}}, "scorer"),
        "qbitopt without a budget": ({"solver": {"name": "qbitopt"}}, "budget"),
        "bomp-nas inheriting weights it lacks": ({"model": "zoo:cifar-resnet20", "solver": {"name": "bomp-nas"}},
                                                  "pretrained weights"),
        "unknown solver setting": ({"solver": {"name": "ilp", "settings": {"tim_limit": 5}}}, "tim_limit"),
        "negative time limit": ({"solver": {"name": "ilp", "settings": {"time_limit": -1}}}, "time_limit"),
        "unknown method setting": ({"sensitivity": {"method": "hessian", "settings": {"x": 1}}}, "unknown setting"),
        "pin on a missing layer": ({"options": {"pins": {"conv9": "8/8"}}}, "conv9"),
        "tie of a missing layer": ({"options": {"ties": [["conv1", "nope"]]}}, "nope"),
        "data-free without BatchNorm": ({"model": "zoo:digits-mlp", "data": "none"}, "BatchNorm"),
        "a budget of true": ({"budgets": [{"metric": "bops", "value": True}]}, "true/false"),
        "a server path as weights": ({"weights": "/etc/passwd"}, "upload"),
    }
    before = len(job_repo.list_jobs(sf))
    for what, (change, reason) in refused.items():
        r = client.post("/search", json={**base, **change}, headers=h)
        assert r.status_code == 422 and reason in r.text, (what, r.status_code, r.text)
    assert len(job_repo.list_jobs(sf)) == before  # nothing was queued


def test_pins_are_accepted_and_reach_the_worker_in_a_form_it_reads(api):
    from service.api.search_job import pipeline_spec

    client, h, sf = api
    body = {"model": "zoo:digits-cnn", "data": "zoo:digits",
            "options": {"pins": {"conv1": "8/8"}, "pin_first": "8/8", "pin_last": "4/8"}}
    r = client.post("/search", json=body, headers=h)
    assert r.status_code == 202, r.text
    spec = SearchSpec.parse(pipeline_spec(job_repo.get(sf, r.json()["job_id"]).spec))
    c = spec.options.constraints()  # what the worker builds: the pins parse back to the same options
    assert c.pinned["conv1"].weight_bits == 8 and c.pinned["conv1"].activation_bits == 8
    assert (c.pin_last.weight_bits, c.pin_last.activation_bits) == (4, 8)
    data_free = client.post("/search", json={"model": "zoo:digits-cnn", "data": "none"}, headers=h)
    assert data_free.status_code == 202, data_free.text  # a model with BatchNorm may go data-free


def test_labels_beyond_any_class_are_refused(tmp_path, api):
    from zoo.data import as_dataset, load_npz

    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 2**40]))
    with pytest.raises(BitsearchError, match="class indices"):
        load_npz(path)
    client, h, _ = api
    r = client.post("/datasets", files={"file": ("big.npz", path.read_bytes())}, headers=h)
    assert r.status_code == 422 and "class indices" in r.text and str(tmp_path) not in r.text
    np.savez(path, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 11]))  # 12 classes; the model has 10
    did = client.post("/datasets", files={"file": ("c12.npz", path.read_bytes())}, headers=h).json()["id"]
    for body in ({"data": did}, {"data": "zoo:digits", "roles": {"report": did}}):
        r = client.post("/search", json={"model": "zoo:digits-mlp", **body}, headers=h)
        assert r.status_code == 422 and "labels up to 11" in r.text, r.text
    with pytest.raises(BitsearchError, match="class indices"):
        as_dataset((np.zeros((2, 3), np.float32), np.array([0, 2**40])))


def _npz_bytes(ds) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=ds.x.numpy(), y=ds.y.numpy())
    return buf.getvalue()


@pytest.mark.slow
def test_qat_on_an_uploaded_train_set_through_the_rest_api(tmp_path, monkeypatch):
    from service.api.search_job import persist_outcome
    from tests.test_api import fake_outcome, finish_job
    from zoo import load_digits_splits

    sp = load_digits_splits()
    settings = Settings(data_dir=tmp_path / "srv")
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "qat")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, sf)) as client:
        train = client.post("/datasets", files={"file": ("train.npz", _npz_bytes(sp.train))}, headers=h)
        assert train.status_code == 201, train.text
        body = {"model": "zoo:digits-mlp", "data": "zoo:digits", "roles": {"train": train.json()["id"]}}
        acc = client.post("/search", json=body, headers=h).json()
        persist_outcome(sf, acc["id"], fake_outcome())
        finish_job(sf, acc["job_id"])
        r = client.post(f"/searches/{acc['id']}/finetune", json={"recipe": {"steps": 5, "batch_size": 32}},
                        headers=h)
        assert r.status_code == 202, r.text
        (ft,) = r.json()["jobs"]
        job = job_repo.get(sf, ft["job_id"])
        assert job.spec["roles"]["train"].endswith(".npz")  # the stored upload, not the zoo set
        _run_worker(sf, monkeypatch, sf.kw["bind"].url.render_as_string(hide_password=False))
        job = job_repo.get(sf, ft["job_id"])
        assert job.status == JobStatus.succeeded, job.error
        assert job.result["steps"] == 5 and job.result["data"]["train"]["size"] == len(sp.train)
        assert job.result["metrics"]["top1"] is not None


def test_cli_finetune_from_an_npz_train_set(tmp_path):
    from typer.testing import CliRunner

    from quant import Allocation, LayerBits
    from service.cli import app
    from zoo import load_digits_splits

    sp = load_digits_splits()
    npz = tmp_path / "train.npz"
    npz.write_bytes(_npz_bytes(sp.train))
    alloc = tmp_path / "alloc.json"
    Allocation({n: LayerBits(4, 32) for n in ("fc1", "fc2", "fc3")}, model="zoo:digits-mlp").save(alloc)
    out = tmp_path / "qat.json"
    r = CliRunner().invoke(app, ["finetune", "--model", "zoo:digits-mlp", "--allocation", str(alloc), "--data",
                                 str(npz), "--steps", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(out.read_text())
    held = res["data"]["report"]
    assert held["split_of"] == "train" and held["size"] + res["data"]["train"]["size"] == len(sp.train)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "bitsearch.search(" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    result = SearchResult.load(tmp_path / "search.json")
    assert result.recommendation.index == scope["best"].index
    assert scope["qmodel"](scope["data"].x[:2]).shape == (2, 10)


def test_sensitivity_and_finetune_from_python(trained):
    from quant import Allocation, LayerBits

    model, sp = trained
    table = bitsearch.sensitivity(model, (sp.test.x.numpy(), sp.test.y.numpy()), method="fisher",
                                  weight_bits=[2, 8], samples=32)
    assert table.method == "fisher" and table.layer_names == ["conv", "fc1", "fc2"]
    assert table.data["samples"] == 32
    alloc = Allocation({n: LayerBits(4, 32) for n in table.layer_names}, model="module:TinyNet")
    res = bitsearch.finetune(model, alloc, (sp.train.x, sp.train.y), recipe={"steps": 3, "batch_size": 32})
    assert res.steps == 3 and res.metrics["top1"] is not None
    with pytest.raises(BitsearchError, match="no labels"):
        bitsearch.finetune(model, alloc, sp.train.x, recipe={"steps": 1})


def test_a_batch_of_fine_tunes_is_all_or_nothing(api, monkeypatch):
    """The service layer queues a batch in one transaction; when the broker fails half-way, none of it stays
    queued, so a retry queues each point exactly once."""
    from service import searches as service
    from service.api.search_job import persist_outcome
    from tests.test_api import fake_outcome, finish_job

    client, h, sf = api
    acc = client.post("/search", json={"model": "zoo:digits-mlp", "data": "zoo:digits"}, headers=h).json()
    persist_outcome(sf, acc["id"], fake_outcome())
    finish_job(sf, acc["job_id"])
    real_send, calls = service.send, []

    def flaky(job_id, queue, settings=None):
        calls.append(job_id)
        if len(calls) == 2:
            raise ConnectionError("broker gone")
        return real_send(job_id, queue, settings)

    monkeypatch.setattr(service, "send", flaky)
    r = client.post(f"/searches/{acc['id']}/finetune", json={"points": [0, 1, 2]}, headers=h)
    assert r.status_code == 503 and "try again" in r.json()["detail"]
    qat = [j for j in job_repo.list_jobs(sf, kind="qat")]
    assert len(qat) == 3 and all(j.status == JobStatus.cancelled for j in qat)
    monkeypatch.setattr(service, "send", real_send)
    r = client.post(f"/searches/{acc['id']}/finetune", json={"points": [0, 1, 2]}, headers=h)
    assert r.status_code == 202
    queued = [j for j in job_repo.list_jobs(sf, kind="qat") if j.status == JobStatus.queued]
    assert sorted(j.id for j in queued) == sorted(j["job_id"] for j in r.json()["jobs"])
    assert client.post(f"/searches/{acc['id']}/finetune", json={"points": [0, 9]}, headers=h).status_code == 422
    assert len(job_repo.list_jobs(sf, kind="qat")) == 6  # a refused batch adds nothing


def test_a_schedule_is_stored_with_its_owner_at_once(api):
    from db.models import Schedule

    client, h, sf = api
    r = client.post("/schedules", json={"name": "nightly", "cron": "0 3 * * *", "enabled": False,
                                        "spec": {"model": "zoo:digits-mlp"}}, headers=h)
    assert r.status_code == 201, r.text
    with sf() as s:
        (row,) = s.query(Schedule).all()
        assert row.tenant_id is not None and row.enabled is False


def test_an_exported_program_is_a_model_too(trained):
    model, sp = trained
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (sp.test.x[:2],), dynamic_shapes=({0: batch},))
    r = bitsearch.search(ep, sp.test, method="fisher", pareto=1, measure=False, options={"weight_bits": [4, 8]},
                         sensitivity={"samples": 16}, calib_size=16)
    assert r.table.layer_names == ["conv", "fc1", "fc2"] and r.recommendations == [] and r.points
    assert r.data["calibration"]["size"] == 16 and r.data["selection"]["source"] == sp.test.name
