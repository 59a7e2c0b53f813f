"""Paired statistical selection, disjoint data roles, per-item evaluation and interaction-aware refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.allocation import Allocation, LayerBits
from quant.cost import CostModel
from quant.errors import BitsearchError
from search import AllocationProblem, measure_front, pareto_front, recommend
from search.pareto import ParetoFront, ParetoPoint
from search.refine import RefineConfig, refine, refined_point
from search.selection import (
    check_disjoint,
    mean_interval,
    paired_test,
    select,
    split_roles,
)
from sensitivity.table import SensitivityTable

# --- data roles ------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=5000),
    frac=st.floats(min_value=0.01, max_value=0.99),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    min_items=st.integers(min_value=1, max_value=300),
)
def test_selection_and_report_never_overlap(n, frac, seed, min_items):
    s = split_roles(n, frac, seed=seed, min_items=min_items)
    sel, rep = set(s.selection.tolist()), set(s.report.tolist())
    assert not sel & rep
    assert sel | rep == set(range(n))  # every item has one role
    assert len(sel) == len(s.selection) and len(rep) == len(s.report)
    if s.honest:
        assert len(sel) >= min_items and len(rep) >= min_items
    else:
        assert len(rep) == 0 and "too few" in s.note
    check_disjoint(selection=s.selection, report=s.report)


def test_split_counts_and_errors():
    s = split_roles(10_000, 2000, seed=3)
    assert s.honest and len(s.selection) == 2000 and len(s.report) == 8000
    assert not np.array_equal(s.selection, np.arange(2000))  # random, not the first items
    small = split_roles(150, 0.5)
    assert not small.honest and len(small.selection) == 150 and "150 evaluation items" in small.note
    for bad in (0, -1, 1.0, 1.5, True, "half"):
        with pytest.raises(BitsearchError, match="selection"):
            split_roles(100, bad)
    with pytest.raises(BitsearchError, match="both the selection and the report"):
        check_disjoint(selection=[1, 2, 3], report=[3, 4])


# --- statistics ------------------------------------------------------------------------------------------------


def test_paired_test_exact_mcnemar_and_interval():
    rng = np.random.default_rng(0)
    b = (rng.random(2000) < 0.75).astype(float)
    a = b.copy()
    flip = rng.choice(2000, 120, replace=False)
    a[flip[:90]] = 1.0  # mostly fixes
    a[flip[90:]] = 0.0
    t = paired_test(a, b)
    wins = int(((a == 1) & (b == 0)).sum())
    losses = int(((a == 0) & (b == 1)).sum())
    from scipy.stats import binomtest

    assert t.p_value == pytest.approx(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)
    two = paired_test(a, b, alternative="two-sided")
    assert two.p_value == pytest.approx(binomtest(wins, wins + losses, 0.5).pvalue)
    assert two.p_value > t.p_value
    assert t.bound > t.low and two.low == t.low  # the one-sided bound is tighter than the interval's end
    assert t.delta == pytest.approx((wins - losses) / 20.0)  # points of percent
    assert t.low < t.delta < t.high and t.n == 2000
    assert t.significant == (t.p_value < 0.05)
    same = paired_test(b, b)
    assert same.delta == 0 and same.p_value == 1.0 and not same.significant
    # continuous values: the bootstrap interval decides, in the direction given
    kl_a, kl_b = rng.random(500) * 0.1, rng.random(500) * 0.1 + 0.05
    lower = paired_test(kl_a, kl_b, "kl", larger_is_better=False)
    assert lower.significant and lower.high < 0 and lower.p_value is None and lower.bound < 0
    assert not paired_test(kl_b, kl_a, "kl", larger_is_better=False).significant  # worse is never significant
    assert not paired_test(b, a).significant
    with pytest.raises(BitsearchError, match="same items"):
        paired_test(a, b[:10])
    with pytest.raises(BitsearchError, match="confidence"):
        paired_test(a, b, confidence=1.0)


def test_mean_interval_covers_the_mean():
    v = np.r_[np.ones(80), np.zeros(20)]
    lo, hi = mean_interval(v, scale=100.0)
    assert lo < 80 < hi and hi - lo < 20
    lo, hi = mean_interval(np.linspace(0, 1, 101))
    assert lo < 0.5 < hi


# --- selection on synthetic fronts -------------------------------------------------------------------------


def _point(kind, avg, correct, kl, label=None):
    p = ParetoPoint(
        allocation=Allocation({"a": LayerBits(4)}),
        predicted=float(kl.mean()),
        metrics={"avg_weight_bits": avg},
        kind=kind,
        label=label,
        budget=None if kind == "uniform" else avg,
    )
    p.samples["selection"] = {"correct": correct.astype(float), "kl": kl}
    return p


def _synthetic_front(rng, n, advantage, n_mixed=20):
    """Uniform W3 at 76 % and `n_mixed` mixed points at 3 bits: each differs from W3 on random items,
    fixing `advantage` more of them than it breaks on average (0: pure noise)."""
    base = rng.random(n) < 0.76
    uniform = [
        _point("uniform", 3.0, base, rng.random(n) * 0.5 + 0.4, "W3"),
        _point("uniform", 2.0, rng.random(n) < 0.3, rng.random(n) + 2, "W2"),
    ]
    mixed = []
    for _ in range(n_mixed):
        c = base.copy()
        touched = rng.random(n) < 0.12  # the items whose outcome this allocation re-rolls
        c[touched] = rng.random(int(touched.sum())) < (base.mean() + advantage)
        mixed.append(_point("mixed", 2.999, c, rng.random(n) * 0.5 + 0.4 - (0.05 if advantage else 0)))
    return ParetoFront("avg_weight_bits", mixed, uniform, "ilp", "test")


def test_noise_advantage_keeps_uniform_real_advantage_takes_mixed():
    kept_uniform = naive_mixed = 0
    for seed in range(20):
        front = _synthetic_front(np.random.default_rng(seed), 2000, 0.0)
        point, ev = select(front, "avg_wbits=3")
        kept_uniform += point.kind == "uniform"
        assert ev.baseline == "W3" and ev.selection.n == 2000 and ev.recommended == point.kind
        # the arg-max of 20 noisy candidates (the old `recommend`) is nearly always a mixed point
        for p in front.candidates():
            p.measured = {
                "top1": p.samples["selection"]["correct"].mean() * 100,
                "loss": float(p.samples["selection"]["kl"].mean()),
            }
        naive_mixed += recommend(front, "avg_wbits=3").kind == "mixed"
    assert kept_uniform >= 18  # 5 % false positives expected; 18/20 leaves room for chance
    assert naive_mixed >= 15
    for seed in range(10):
        front = _synthetic_front(np.random.default_rng(100 + seed), 2000, 0.5)
        point, ev = select(front, "avg_wbits=3")
        assert point.kind == "mixed", ev.reason
        assert ev.selection.significant and ev.selection.low > 0 and "significant" in ev.reason


def test_select_reports_on_report_data_and_explains_missing_values():
    rng = np.random.default_rng(1)
    front = _synthetic_front(rng, 400, 0.5, n_mixed=3)
    bare = ParetoFront(
        "avg_weight_bits",
        [ParetoPoint(Allocation({"a": LayerBits(4)}), 0.0, {"avg_weight_bits": 3.0})],
        [],
        "ilp",
        "t",
    )
    with pytest.raises(BitsearchError, match="role='selection'"):
        select(bare, "avg_wbits=3")
    for p in front.candidates():
        p.samples["report"] = {k: v[::-1].copy() for k, v in p.samples["selection"].items()}
    point, ev = select(front, "avg_wbits=3")
    assert ev.report is not None and ev.report.n == 400
    assert ev.recommended_report["n"] == 400 and len(ev.recommended_report["top1"]["ci"]) == 2
    d = ev.to_dict()
    assert d["selection"]["ci"][0] <= d["selection"]["delta"] <= d["selection"]["ci"][1]
    assert 0 <= d["disagreement"]["disagree"] <= d["disagreement"]["pairs"]
    # no uniform allocation fits: the mixed one, said so
    only_mixed = ParetoFront("avg_weight_bits", front.points, [], "ilp", "t")
    point, ev = select(only_mixed, "avg_wbits=3")
    assert point.kind == "mixed" and "no uniform" in ev.reason


# --- per-item evaluation and measured fronts on the digits CNN --------------------------------------------


@pytest.fixture(scope="module")
def digits():
    import zoo
    from quant.layers import discover_layers

    loaded = zoo.load_model("zoo:digits-cnn")
    splits = zoo.load_digits_splits()
    layers = discover_layers(loaded.model, loaded.example_input)
    return loaded.model.eval(), splits, layers


def _table(layers, options):
    return SensitivityTable(
        "test",
        list(layers),
        list(options),
        np.outer(np.linspace(1, 2, len(layers)), [1.0 / o.weight_bits for o in options]),
    )


def pinned_tied_problem(layers):
    """A weight-only problem over W{2,3,4,8} with the last layer pinned at 8 bits, the second and third tied,
    and a slack-free budget: that of its start (2/4/4/8 bits), which it returns too."""
    names = [l.name for l in layers]
    options = [LayerBits(w) for w in (2, 3, 4, 8)]
    cost = CostModel(layers)
    start = Allocation(
        {names[0]: LayerBits(2), names[1]: LayerBits(4), names[2]: LayerBits(4), names[3]: LayerBits(8)}
    )
    problem = AllocationProblem(
        _table(layers, options),
        cost,
        [f"avg_wbits={cost.cost(start).avg_weight_bits}"],
        {"pinned": {names[3]: "8"}, "ties": [[names[1], names[2]]]},
    )
    return problem, start


def test_evaluate_keeps_per_item_values_behind_the_means(digits):
    from zoo.evaluate import evaluate

    model, splits, _ = digits
    ref = evaluate(model, splits.test)
    noisy = torch.nn.Sequential(model, torch.nn.Dropout(0.0))
    r = evaluate(noisy, splits.test, reference_logits=ref.logits + torch.randn_like(ref.logits))
    ps = r.per_sample
    assert set(ps) == {"correct", "ce", "agree", "kl"} and all(len(v) == 360 for v in ps.values())
    assert ps["correct"].mean().item() * 100 == pytest.approx(r.top1)
    assert ps["ce"].mean().item() == pytest.approx(r.loss, rel=1e-5)
    assert ps["agree"].mean().item() * 100 == pytest.approx(r.agreement)
    assert ps["kl"].mean().item() == pytest.approx(r.kl, rel=1e-5) and r.kl > 0


def test_measure_front_fills_roles_intervals_and_round_trips(digits):
    model, splits, layers = digits
    options = [LayerBits(w) for w in (2, 3, 4, 8)]
    problem = AllocationProblem(_table(layers, options), CostModel(layers))
    front = pareto_front(problem, "avg_weight_bits", 4)
    sel, rep = splits.test.subset(np.arange(0, 180)), splits.test.subset(np.arange(180, 360))
    mf = measure_front(front, model, splits.calibration, sel)
    mf = measure_front(mf, model, splits.calibration, rep, role="report")
    for p in mf.candidates():
        assert p.measured["n"] == 180 and p.report["n"] == 180
        lo, hi = p.intervals["selection"]["top1"]
        assert lo <= p.measured["top1"] <= hi
        assert set(p.samples) == {"selection", "report"}
    assert mf.reference["n"] == 180 and mf.report_reference["n"] == 180
    again = ParetoFront.from_json(mf.to_json())
    assert (
        again.points[0].intervals == mf.points[0].intervals and again.points[0].report == mf.points[0].report
    )
    assert again.report_reference == mf.report_reference
    _point, ev = select(mf, "avg_wbits=4")
    assert ev.report is not None and ev.report.n == 180 and ev.selection.n == 180


# --- refinement --------------------------------------------------------------------------------------------


def _start(problem, bits: dict[str, LayerBits]) -> Allocation:
    return Allocation({n: bits[n] for n in problem.layer_names})


@pytest.mark.parametrize("activations", [False, True])
def test_refinement_stays_in_budget_and_never_worsens_the_objective(digits, activations):
    model, splits, layers = digits
    a = (4, 8) if activations else (32,)
    options = [LayerBits(w, ab) for w in (2, 3, 4, 8) for ab in a]
    names = [l.name for l in layers]
    cost = CostModel(layers)
    # A poor but feasible start: the first layer at 2 bits, the rest at 4 (4-bit activations: bad too).
    low = LayerBits(2, a[0])
    start = Allocation({n: (low if i == 0 else LayerBits(4, a[0])) for i, n in enumerate(names)})
    limits = cost.cost(start)
    problem = AllocationProblem(
        _table(layers, options),
        cost,
        [f"avg_wbits={limits.avg_weight_bits}"] + ([f"bops={limits.bops}"] if activations else []),
    )
    r = refine(
        problem,
        start,
        model,
        splits.calibration,
        splits.calibration,
        splits.test,
        settings=RefineConfig(max_passes=40),
    )
    assert problem.feasible(r.choice)
    after = cost.cost(r.allocation)
    assert after.avg_weight_bits <= limits.avg_weight_bits * (1 + 1e-9)
    if activations:  # a budget only then: weight-only moves may trade BOPs for the same average bits
        assert after.bops <= limits.bops * (1 + 1e-9)
    assert r.kl_end <= r.kl_start and r.guard_end >= r.guard_start
    assert r.steps, "a 2-bit first layer under a slack-free budget should be worth a swap"
    assert r.kl_end < r.kl_start
    assert r.cost["passes"] <= 40 and r.cost["moves_measured"] > 0
    # the recorded figures are what the allocation measures
    from quant.apply import apply_allocation
    from zoo.evaluate import evaluate

    q = apply_allocation(model, r.allocation, splits.calibration)
    assert evaluate(q, splits.test).top1 == pytest.approx(r.guard_end)
    pt = refined_point(problem, r, budget=limits.avg_weight_bits)
    assert pt.label == "refined" and pt.refinement["steps"] == r.steps


def test_refinement_respects_pins_ties_and_its_budget_of_passes(digits):
    model, splits, layers = digits
    names = [l.name for l in layers]
    problem, start = pinned_tied_problem(layers)
    r = refine(
        problem,
        start,
        model,
        splits.calibration,
        splits.calibration,
        splits.test,
        settings=RefineConfig(max_passes=40),
    )
    assert r.allocation[names[3]] == LayerBits(8)
    assert r.allocation[names[1]] == r.allocation[names[2]]
    assert problem.feasible(r.choice) and r.kl_end <= r.kl_start and r.guard_end >= r.guard_start
    tiny = refine(
        problem,
        start,
        model,
        splits.calibration,
        splits.calibration,
        None,
        settings=RefineConfig(max_passes=2.5),
    )
    assert tiny.steps == [] and "budget" in tiny.stopped and tiny.cost["passes"] <= 2.5
    with pytest.raises(BitsearchError, match="not feasible"):
        refine(problem.with_budget("avg_wbits", 2.0), start, model, splits.calibration, splits.calibration)
    with pytest.raises(BitsearchError, match="max_passes"):
        RefineConfig(max_passes=0)
    with pytest.raises(BitsearchError, match="unknown refine"):
        RefineConfig.from_dict({"passes": 3})


# --- the search pipeline ---------------------------------------------------------------------------------


def _search(**kw):
    import bitsearch

    fields = {"budgets": ["avg_wbits=4"], "method": "fisher", "pareto": 3, "calib_size": 64,
              "options": {"weight_bits": [2, 4, 8]}, **kw}
    return bitsearch.search("zoo:digits-mlp", "zoo:digits", **fields)


def test_search_selects_on_one_part_reports_on_another_and_carries_evidence():
    from bitsearch.result import SearchResult

    r = _search(refine={"max_passes": 12})
    assert r.data["selection"]["size"] == r.data["report"]["size"] == 180
    rec = r.recommendation
    ev = rec.evidence
    assert ev["recommended"] in ("mixed", "uniform") and ev["reason"]
    assert ev["selection"]["n"] == 180 and ev["report"]["n"] == 180
    lo, hi = ev["selection"]["ci"]
    assert lo <= ev["selection"]["delta"] <= hi
    assert ev["recommended_report"]["top1"]["ci"][0] <= ev["recommended_report"]["top1"]["value"]
    assert rec.point.metrics["avg_weight_bits"] <= 4 + 1e-9
    assert rec.report["n"] == 180 and "report" in rec.point.intervals
    assert all("selection" in p.intervals for p in r.points)
    # by default only the points shown with evidence are measured on report (tests/test_report_points.py)
    on_report = [p for p in r.points if "report" in p.intervals]
    assert rec.point in on_report and 1 <= len(on_report) <= 3
    assert r.costs["refine"]["passes"] <= 12 and r.costs["measure_report"]["samples"] == 180
    assert r.costs["measure_report"]["points"] == len(on_report)
    assert r.reference_report["n"] == 180
    back = SearchResult.from_json(r.to_json())
    assert back.recommendation.evidence == r.recommendation.evidence == r.to_dict()["recommendations"][-1]["evidence"]
    assert back.costs == r.to_dict()["costs"] and back.points[0].intervals == r.points[0].intervals


def test_a_search_on_too_little_data_says_so_and_refinement_can_be_turned_off():
    r = _search(eval_limit=120, refine=False)
    assert r.data["selection"]["size"] + r.data["report"]["size"] <= 120
    assert any("too few" in n and "not a reliable out-of-sample accuracy" in n for n in r.notes)
    assert "refine" not in r.costs and r.recommendation.evidence["selection"]["n"] < 100
    with pytest.raises(BitsearchError, match="confidence"):
        _search(confidence=1.5)
    with pytest.raises(BitsearchError, match="max_passes"):
        _search(refine={"max_passes": -1})


def test_evidence_reaches_the_cli_json_the_rest_pareto_and_the_dashboard(tmp_path, monkeypatch):
    import json

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from db import jobs as job_repo
    from db.models import JobStatus
    from service.api.app import create_app
    from service.api.auth import create_key
    from service.api.schemas import ParetoOut
    from service.cli import app
    from service.dashboard import data as dash
    from service.settings import Settings, get_settings
    from tests.helpers import make_sf
    from tests.test_contract import _run_worker

    flags = ["--model", "zoo:digits-mlp", "--data", "zoo:digits", "--budget", "avg_wbits=4", "--weight-bits",
             "2,4,8", "--method", "fisher", "--samples", "64", "--pareto", "2", "--calib-size", "64"]
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["search", *flags, "--no-refine", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "why: " in r.output and "report" in r.output
    d = json.loads(out.read_text())
    assert d["spec"]["refine"] is False and d["recommendations"][-1]["evidence"]["selection"]["n"] == 180
    assert "intervals" in d["front"]["points"][0]

    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "evidence")
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "zoo:digits-mlp", "data": "zoo:digits", "budgets": ["avg_wbits=4"],
            "options": {"weight_bits": [2, 4, 8]}, "sensitivity": {"method": "fisher", "samples": 64},
            "pareto_points": 2, "calib_size": 64, "refine": {"max_passes": 8}}
    try:
        with TestClient(create_app(Settings(data_dir=tmp_path / "srv"), sf)) as client:
            acc = client.post("/search", json=body, headers=h)
            assert acc.status_code == 202, acc.text
            bad = client.post("/search", json={**body, "confidence": 1.2}, headers=h)
            assert bad.status_code == 422 and "confidence" in bad.text
            _run_worker(sf, monkeypatch, sf.kw["bind"].url.render_as_string(hide_password=False))
            job = job_repo.get(sf, acc.json()["job_id"])
            assert job.status == JobStatus.succeeded, job.error
            pareto = client.get(f"/searches/{acc.json()['id']}/pareto", headers=h).json()
    finally:
        get_settings.cache_clear()
    rec = next(x for x in pareto["recommendations"] if x["requested"])
    ev = rec["evidence"]
    assert ev["selection"]["n"] == 180 and ev["report"]["n"] == 180 and ev["reason"]
    assert rec["point"]["intervals"]["report"]["top1"]
    assert all("selection" in p["intervals"] for p in pareto["points"] + pareto["uniform"])
    chart = dash.front_data(ParetoOut.model_validate(pareto), [])
    rows = chart["series"]["mixed"] + chart["series"]["uniform"]
    assert all("(selection data)" in row["hover"] for row in rows)
    # the recommended point was measured on report; points outside the evidence show selection figures only
    chosen = next(row["hover"] for row in rows if row["index"] == rec["index"])
    assert "on the report data" in chosen and "[" in chosen
    assert any("on the report data" not in row["hover"] for row in rows)
