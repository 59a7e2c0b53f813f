"""Which points a search measures on the report data (`SearchSpec.report_points`), and that one wrapped and
calibrated model serves the refinement and both roles (`search.pareto.MeasuringModel`).

By default only the points shown with evidence (the recommendation at the requested budgets, its uniform
baseline and its mixed contender) are measured on report; "all" measures every point. The choice is made on
the selection data alone, so both give the same recommendations and selection figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from quant.allocation import LayerBits
from quant.errors import BitsearchError

FIELDS = {"budgets": ["avg_wbits=4"], "method": "fisher", "pareto": 3, "calib_size": 64,
          "options": {"weight_bits": [2, 4, 8]}, "refine": {"max_passes": 8}}


def _search(**kw):
    import bitsearch

    return bitsearch.search("zoo:digits-mlp", "zoo:digits", **{**FIELDS, **kw})


@pytest.fixture(scope="module")
def both():
    """The same search with report_points 'evidence' (the default) and 'all'."""
    return _search(), _search(report_points="all")


def _shown_indices(result) -> set[int]:
    """Indices of the requested recommendation's point, uniform baseline and mixed contender."""
    rec = next(r for r in result.recommendations if r.requested)
    ev = rec.evidence
    out = {rec.index}
    for i, p in enumerate(result.points):
        label = p.label or f"{p.kind} @ {p.budget:.4g}"
        if label == ev["baseline"] or (ev["contender"] and label == ev["contender"]["label"]
                                       and p.metrics == ev["contender"]["metrics"]):
            out.add(i)
    return out


def test_by_default_only_the_points_shown_with_evidence_are_measured_on_report(both):
    r, _ = both
    assert r.spec.report_points == "evidence"
    on_report = {i for i, p in enumerate(r.points) if p.report}
    assert on_report == _shown_indices(r) and len(on_report) < len(r.points)
    for i, p in enumerate(r.points):
        assert p.measured["n"] == 180 and "selection" in p.intervals
        if i not in on_report:
            assert p.report == {} and "report" not in p.intervals
    rec = r.recommendation
    assert rec.report["n"] == 180 and rec.evidence["recommended_report"]["n"] == 180
    # a baseline and a contender: the paired test is there on both roles
    assert rec.evidence["selection"]["n"] == 180 and rec.evidence["report"]["n"] == 180
    assert r.costs["measure_report"]["points"] == len(on_report)
    assert r.costs["measure_report"]["report_points"] == "evidence"
    assert r.costs["measure_selection"]["points"] == len(r.points)
    # the refinement's guard already ran its start point (a front point) on the selection data
    distinct = len({frozenset(p.allocation.layers.items()) for p in r.points})
    assert r.costs["refine"]["guard_samples"] == 180 and r.costs["measure_selection"]["passes"] < distinct
    assert any(f"evidence points only ({len(on_report)} of {len(r.points)}" in n for n in r.notes)
    assert r.reference_report["n"] == 180
    # swept recommendations keep working without report figures, and survive a JSON round trip
    from bitsearch.result import SearchResult

    sweeps = [x for x in r.recommendations if not x.requested]
    assert sweeps and all(x.evidence["recommended"] in ("mixed", "uniform") for x in sweeps)
    back = SearchResult.from_json(r.to_json())
    assert [x.report for x in back.recommendations] == [x.report for x in r.recommendations]


def test_all_measures_every_point_and_the_choice_is_the_same(both):
    ev_, all_ = both
    assert all(p.report["n"] == 180 and "report" in p.intervals for p in all_.points)
    assert all_.costs["measure_report"]["points"] == len(all_.points)
    assert not any("evidence points only" in n for n in all_.notes)
    assert [p.allocation.to_dict() for p in ev_.points] == [p.allocation.to_dict() for p in all_.points]
    assert [p.measured for p in ev_.points] == [p.measured for p in all_.points]
    assert [p.intervals["selection"] for p in ev_.points] == [p.intervals["selection"] for p in all_.points]
    for a, b in zip(ev_.recommendations, all_.recommendations):
        assert a.index == b.index and a.requested == b.requested
        assert a.evidence["selection"] == b.evidence["selection"]
        assert a.evidence["reason"] == b.evidence["reason"]
    # the points measured on report in both runs have the same report figures, and so the same evidence
    for p, q in zip(ev_.points, all_.points):
        if p.report:
            assert p.report == q.report
    assert ev_.recommendation.evidence == all_.recommendation.evidence
    assert ev_.reference_report == all_.reference_report


def test_an_invalid_report_points_is_refused_with_its_name():
    from bitsearch import SearchSpec

    with pytest.raises(BitsearchError, match="report_points"):
        _search(report_points="some")
    with pytest.raises(BitsearchError, match="report_points"):
        SearchSpec.parse({"model": "zoo:digits-mlp", "report_points": 3})
    from search.selection import check_report_points

    with pytest.raises(BitsearchError, match="evidence"):
        check_report_points("every")


def test_rest_refuses_an_invalid_report_points_before_queueing(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_key
    from service.settings import Settings, get_settings
    from tests.helpers import make_sf

    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "report-points")
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "zoo:digits-mlp", "data": "zoo:digits", "budgets": ["avg_wbits=4"]}
    try:
        with TestClient(create_app(Settings(data_dir=tmp_path / "srv"), sf)) as client:
            bad = client.post("/search", json={**body, "report_points": "most"}, headers=h)
            assert bad.status_code == 422 and "report_points" in bad.text
            assert client.get("/jobs", headers=h).json()["items"] == []
            ok = client.post("/search", json={**body, "report_points": "all"}, headers=h)
            assert ok.status_code == 202, ok.text
    finally:
        get_settings.cache_clear()


def test_the_cli_flag_sets_report_points(tmp_path, capsys):
    from typer.testing import CliRunner

    from service.cli import app, main

    flags = ["search", "--model", "zoo:digits-mlp", "--data", "zoo:digits", "--budget", "avg_wbits=4",
             "--weight-bits", "2,4,8", "--method", "fisher", "--samples", "64", "--pareto", "2",
             "--calib-size", "64", "--no-refine"]
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, [*flags, "--report-points", "all", "--json", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["spec"]["report_points"] == "all"
    assert all(p["report"]["n"] == 180 for p in d["front"]["points"] + d["front"]["uniform"])
    capsys.readouterr()
    assert main([*flags, "--report-points", "some"]) == 2  # refused before anything loads
    err = capsys.readouterr().err
    assert "report_points" in err and "'evidence' or 'all'" in err


# --- the library level ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """(model, calibration, selection, report, layers) of the digits MLP; selection and report disjoint."""
    import zoo
    from quant.layers import discover_layers

    loaded = zoo.load_model("zoo:digits-mlp")
    splits = zoo.load_digits_splits()
    layers = discover_layers(loaded.model, loaded.example_input)
    n = len(splits.test)
    sel, rep = splits.test.subset(np.arange(0, n // 2)), splits.test.subset(np.arange(n // 2, n))
    return loaded.model.eval(), splits.calibration, sel, rep, layers


def _problem(layers, bits=(2, 4, 8)):
    from quant.cost import CostModel
    from search import AllocationProblem
    from sensitivity.table import SensitivityTable

    options = [LayerBits(w) for w in bits]
    table = SensitivityTable("test", list(layers), options,
                             np.outer(np.linspace(1, 2, len(layers)), [1.0 / o.weight_bits for o in options]))
    return AllocationProblem(table, CostModel(layers))


def test_a_pure_sweep_measures_every_swept_recommendations_evidence_points(digits):
    from search import pareto_front
    from search.selection import evidence_points, recommend_with_evidence

    model, calibration, selection, report, layers = digits
    problem = _problem(layers, (2, 3, 4, 8))
    # two swept budgets, the cheapest and the dearest: uniform W3 and W4 are nobody's baseline or contender
    front = pareto_front(problem, "avg_weight_bits", 2)
    out, recs, costs = recommend_with_evidence(front, problem, [], model, calibration, selection, report)
    assert recs and not any(r.requested for r in recs)
    shown = evidence_points(recs)
    ids = {id(p) for p in shown}
    for r in recs:
        assert id(r.point) in ids
        for p in (r.evidence.baseline_point, r.evidence.contender_point):
            assert p is None or id(p) in ids
    for p in out.candidates():
        assert bool(p.report) == (id(p) in ids) and "selection" in p.samples
    assert costs["measure_report"]["points"] == len(shown) < len(out.candidates())
    assert any(f"evidence points only ({len(shown)} of {len(out.candidates())}: each swept budget's" in n
               for n in out.notes)
    for r in recs:  # every sweep recommendation carries its report evidence
        assert r.evidence.recommended_report is not None
        if r.evidence.selection is not None:
            assert r.evidence.report is not None and r.evidence.report.n == len(report)


def test_one_wrapped_model_serves_both_roles_with_the_figures_of_fresh_copies(digits):
    from quant.apply import search_quant_config
    from search import measure_front, pareto_front
    from search.pareto import MeasuringModel

    model, calibration, selection, report, layers = digits
    problem = _problem(layers)
    front = pareto_front(problem, "avg_weight_bits", 3)
    config = search_quant_config({})  # the search's recipe: GPTQ and output-MSE clipping, memoised per layer
    m = MeasuringModel(model, calibration, config)
    shared = measure_front(front, None, None, selection, measuring=m)
    shared = measure_front(shared, None, None, report, role="report", measuring=m)
    fresh = measure_front(front, model, calibration, selection, config)
    fresh = measure_front(fresh, model, calibration, report, config, role="report")
    assert m.calibrated_items == min(len(calibration), config.calibration_samples or len(calibration))
    for a, b in zip(shared.candidates(), fresh.candidates()):
        assert a.measured == b.measured and a.report == b.report
    assert shared.reference == fresh.reference and shared.report_reference == fresh.report_reference
    # the FP32 logits of each data set were computed once, each allocation run once per data set
    assert len(m._references) == 2
    assert m.passes == 2 * len({frozenset(p.allocation.layers.items()) for p in front.candidates()})


def test_an_allocation_on_the_front_twice_is_measured_once_with_the_same_figures(digits):
    from quant.apply import apply_allocation, search_quant_config
    from search import measure_front, pareto_front
    from zoo.evaluate import evaluate

    model, calibration, selection, _, layers = digits
    front = pareto_front(_problem(layers), "avg_weight_bits", 4)
    config = search_quant_config({})
    key = lambda p: frozenset(p.allocation.layers.items())  # noqa: E731
    keys = [key(p) for p in front.candidates()]
    assert len(set(keys)) < len(keys), "the sweep's ends are the uniform W2 and W8 allocations"
    measured = measure_front(front, model, calibration, selection, config)
    ref = evaluate(model, selection)
    for p in measured.candidates():
        twins = [q for q in measured.candidates() if key(q) == key(p)]
        assert all(q.measured == p.measured and q.intervals == p.intervals for q in twins)
        if len(twins) > 1:  # the copied figures are what the allocation measures on a fresh copy
            fresh = evaluate(apply_allocation(model, p.allocation, calibration, config), selection,
                             reference_logits=ref.logits)
            assert fresh.to_dict() == p.measured
