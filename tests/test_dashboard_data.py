"""What the search page's front chart is drawn from (`service.dashboard.data.front_data`), without a browser:
confidence intervals as error bars, the recommendation's evidence per point, and the latency axis
(predicted from the per-layer table, and measured end to end where a point carries it)."""

from __future__ import annotations

import pytest

from service.api.schemas import ParetoOut, PointOut
from service.dashboard.data import front_data


def point(index: int, kind: str, top1: float, ci: list[float] | None, latency_s: float | None = None,
          measured_latency_s: float | None = None, recommended: bool = False) -> PointOut:
    metrics = {"avg_weight_bits": 3.0 + index, "weight_memory": 8.0 * 1024 * (3 + index)}
    if latency_s is not None:
        metrics["latency"] = latency_s
    measured = {"n": 500, "top1": top1}
    if measured_latency_s is not None:
        measured["latency_s"] = measured_latency_s
    return PointOut(
        index=index, kind=kind, label=f"{kind} {index}", predicted=0.1 * (index + 1), recommended=recommended,
        allocation_url=None, metrics=metrics, measured=measured,
        intervals={"selection": {"top1": ci}} if ci else {}, report={"top1": top1 - 0.5},
    )


EVIDENCE = {
    "recommended": "mixed",
    "reason": "the mixed allocation beats uniform W4A32 significantly on selection data",
    "ranking": "top1",
    "baseline": "W4A32",
    "contender": {"label": "mixed 1"},
    "selection": {"metric": "top1", "n": 500, "delta": 1.2, "ci": [0.4, 2.0], "significant": True,
                  "p_value": 0.003, "confidence": 0.95},
    "report": {"metric": "top1", "n": 1500, "delta": 0.7, "ci": [-0.1, 1.5], "significant": False,
               "p_value": 0.08, "confidence": 0.95},
}


def pareto(points: list[PointOut], uniform: list[PointOut], recommendations=()) -> ParetoOut:
    return ParetoOut(search_id="s", status="succeeded", points=points, uniform=uniform,
                     recommendations=list(recommendations), front={"metric": "avg_weight_bits"})


def test_error_bars_are_the_selection_interval_around_the_measured_accuracy():
    front = front_data(pareto([point(0, "mixed", 80.0, [78.5, 81.0]), point(1, "mixed", 82.0, None)],
                              [point(2, "uniform", 79.0, [77.0, 80.2])]), [])
    mixed, uniform = front["series"]["mixed"], front["series"]["uniform"]
    assert mixed[0]["error"] == pytest.approx([1.5, 1.0])  # asymmetric: below, above
    assert mixed[1]["error"] is None  # no interval stored: no bar
    assert uniform[0]["error"] == pytest.approx([2.0, 1.2])
    assert "[78.50, 81.00]" in mixed[0]["hover"]


def test_the_recommended_point_carries_its_evidence_on_selection_and_report():
    rec = {"index": 1, "budgets": [{"metric": "avg_weight_bits", "limit": 4.0}], "requested": True,
           "evidence": EVIDENCE}
    front = front_data(pareto([point(0, "mixed", 80.0, None), point(1, "mixed", 82.0, None, recommended=True)],
                              [point(2, "uniform", 79.0, None)], [rec]), [])
    assert front["series"]["mixed"][0]["evidence"] == []
    (ev,) = front["series"]["mixed"][1]["evidence"]
    assert ev["baseline"] == "W4A32" and ev["contender"] == "mixed 1" and ev["recommended"] == "mixed"
    assert ev["selection"] == {"delta": 1.2, "ci": [0.4, 2.0], "n": 500, "significant": True,
                               "p_value": 0.003, "confidence": 0.95}
    assert ev["report"]["n"] == 1500 and ev["report"]["ci"] == [-0.1, 1.5] and ev["report"]["significant"] is False
    assert ev["budgets"] and ev["budgets"][0].startswith("avg weight bits ≤")


def test_evidence_without_report_data_or_a_test_is_kept_as_missing():
    rec = {"index": 0, "budgets": [], "requested": False,
           "evidence": {**EVIDENCE, "recommended": "uniform", "report": None, "selection": {"delta": None}}}
    front = front_data(pareto([point(0, "mixed", 80.0, None, recommended=True)], [], [rec]), [])
    (ev,) = front["series"]["mixed"][0]["evidence"]
    assert ev["selection"] is None and ev["report"] is None and ev["recommended"] == "uniform"


def test_latency_axis_is_labelled_predicted_when_nothing_was_measured_end_to_end():
    front = front_data(pareto([point(0, "mixed", 80.0, None, latency_s=2e-3)],
                              [point(1, "uniform", 79.0, None, latency_s=3e-3)]), [])
    titles = {m["key"]: m["title"] for m in front["x_metrics"]}
    assert titles["latency"] == "predicted latency (sum of per-layer table) (ms)"
    assert "latency_measured" not in titles
    row = front["series"]["mixed"][0]
    assert row["x"]["latency"] == pytest.approx(2.0)  # ms
    assert "predicted latency (sum of per-layer table): 2 ms" in row["hover"]


def test_no_latency_axis_without_a_latency_table():
    front = front_data(pareto([point(0, "mixed", 80.0, None)], [point(1, "uniform", 79.0, None)]), [])
    assert not {"latency", "latency_measured"} & {m["key"] for m in front["x_metrics"]}


def test_measured_end_to_end_latency_is_shown_next_to_the_prediction():
    front = front_data(pareto([point(0, "mixed", 80.0, None, latency_s=2e-3, measured_latency_s=2.5e-3)],
                              [point(1, "uniform", 79.0, None, latency_s=3e-3)]), [])
    titles = {m["key"]: m["title"] for m in front["x_metrics"]}
    assert titles["latency_measured"] == "measured end-to-end latency (ms)" and "latency" in titles
    mixed, uniform = front["series"]["mixed"][0], front["series"]["uniform"][0]
    assert mixed["x"]["latency_measured"] == pytest.approx(2.5) and uniform["x"]["latency_measured"] is None
    assert "predicted 2 ms (sum of per-layer table), measured 2.5 ms end to end (-20.0 %)" in mixed["hover"]
