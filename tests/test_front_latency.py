"""End-to-end latency of a measured front, timed in ONNX Runtime (SearchSpec.measure_latency)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bitsearch.spec import SearchSpec  # noqa: E402

SMALL = {"model": "zoo:digits-cnn", "data": "zoo:digits", "budgets": ["avg_wbits=6"], "pareto_points": 2,
         "calib_size": 64, "eval_limit": 120, "refine": False, "options": {"weight_bits": [4, 8],
                                                                            "activation_bits": [8]},
         "sensitivity": {"method": "hessian", "samples": 32}}


def test_spec_rejects_bad_latency_settings():
    with pytest.raises(Exception, match="provider"):
        SearchSpec.parse({"measure_latency": {"enabled": True, "provider": "NoSuchExecutionProvider"}})
    with pytest.raises(Exception, match="repeats"):
        SearchSpec.parse({"measure_latency": {"enabled": True, "repeats": 0}})
    assert SearchSpec().measure_latency.enabled is False  # off by default


def test_front_points_get_measured_latency_and_dashboard_axis():
    from bitsearch.pipeline import run_search
    from service.api.schemas import ParetoOut
    from service.dashboard.data import MEASURED_LATENCY, front_data

    spec = SearchSpec.parse({**SMALL, "measure_latency": {"enabled": True, "repeats": 3, "warmup": 1}})
    result = run_search(spec)
    points = list(result.front.points) + list(result.front.uniform)
    assert any(p.kind == "mixed" for p in points) and any(p.kind == "uniform" for p in points)
    for p in points:
        assert p.measured[MEASURED_LATENCY] > 0
        assert p.measured["latency_p25_s"] <= p.measured[MEASURED_LATENCY] <= p.measured["latency_p75_s"]
    assert "latency" in result.timings

    def out(p, i):
        return {"index": i, "kind": p.kind, "label": p.label or p.kind, "predicted": p.predicted,
                "recommended": False, "allocation_url": None, "metrics": p.metrics, "measured": p.measured}

    stored = json.loads(json.dumps(result.to_dict()))  # what the service keeps
    assert all(MEASURED_LATENCY in p["measured"] for p in stored["front"]["points"])
    n = len(result.front.points)
    pareto = ParetoOut(search_id="s", status="succeeded",
                       points=[out(p, i) for i, p in enumerate(result.front.points)],
                       uniform=[out(p, n + i) for i, p in enumerate(result.front.uniform)],
                       recommendations=[], front={"metric": result.front.metric})
    chart = front_data(pareto, [])
    assert "latency_measured" in [x["key"] for x in chart["x_metrics"]]
    assert all(r["x"]["latency_measured"] > 0 for r in chart["series"]["mixed"] + chart["series"]["uniform"])


def test_cli_measure_latency_flag(tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["search", "--model", "zoo:digits-cnn", "--data", "zoo:digits", "--budget",
                                   "avg_wbits=6", "--pareto", "2", "--weight-bits", "4,8", "--activation-bits", "8",
                                   "--samples", "32", "--calib-size", "64", "--limit", "120", "--no-refine",
                                   "--measure-latency", "--latency-repeats", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "end-to-end latency in ONNX Runtime" in res.output
    d = json.loads(out.read_text())
    assert d["spec"]["measure_latency"]["enabled"] is True and d["spec"]["measure_latency"]["repeats"] == 3
    assert all(p["measured"]["latency_s"] > 0 for p in d["front"]["points"])
    bad = CliRunner().invoke(app, ["search", "--model", "zoo:digits-cnn", "--measure-latency",
                                   "--latency-provider", "NoSuchExecutionProvider"])
    assert bad.exit_code != 0 and "NoSuchExecutionProvider" in bad.output + str(bad.exception)
