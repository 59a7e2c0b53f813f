"""The refinement's measurement budget is sized to the model, and a cheaper ranking never leaves it."""

from __future__ import annotations

import pytest

from quant.allocation import Allocation, LayerBits
from quant.cost import CostModel
from quant.errors import BitsearchError
from search import AllocationProblem
from search.refine import RefineConfig, refine
from tests.test_selection import _table, digits, pinned_tied_problem  # noqa: F401  (digits: the fixture)


def test_budget_scales_with_the_number_of_variables():
    cfg = RefineConfig()
    assert cfg.max_passes is None
    assert cfg.budget_for(20) == pytest.approx(2 * cfg.budget_for(10))
    assert cfg.budget_for(10) == pytest.approx(10 * cfg.passes_per_variable)
    assert RefineConfig(passes_per_variable=3).budget_for(7) == pytest.approx(21.0)
    assert RefineConfig(max_passes=12).budget_for(1000) == 12.0  # an explicit budget wins
    assert RefineConfig.from_dict(RefineConfig(measure_samples=None).to_dict()) == RefineConfig(measure_samples=None)
    for bad in ({"passes_per_variable": 0}, {"passes_per_variable": float("nan")}, {"measure_samples": 0},
                {"measure_samples": 1.5}, {"max_passes": True}):
        with pytest.raises(BitsearchError, match="refine"):
            RefineConfig(**bad)


@pytest.mark.parametrize("measure_samples", [None, 64])
def test_default_budget_is_kept_and_pins_ties_respected(digits, measure_samples):
    model, splits, layers = digits
    names = [l.name for l in layers]
    problem, start = pinned_tied_problem(layers)
    cfg = RefineConfig(passes_per_variable=6.0, measure_samples=measure_samples)
    r = refine(problem, start, model, splits.calibration, splits.calibration, splits.test, settings=cfg)
    budget = 6.0 * problem.n_vars
    assert r.cost["max_passes"] == pytest.approx(budget) and "variables" in r.cost["budget_rule"]
    assert r.cost["passes"] <= budget
    assert r.cost["measure_samples"] == (len(splits.calibration) if measure_samples is None else 64)
    assert r.allocation[names[3]] == LayerBits(8)
    assert r.allocation[names[1]] == r.allocation[names[2]]
    assert problem.feasible(r.choice) and r.kl_end <= r.kl_start and r.guard_end >= r.guard_start
    assert r.stopped  # why it stopped is always said


def test_ranking_on_fewer_items_costs_fewer_passes(digits):
    model, splits, layers = digits
    names = [l.name for l in layers]
    options = [LayerBits(w) for w in (2, 3, 4, 8)]
    cost = CostModel(layers)
    start = Allocation({n: LayerBits(2 if i == 0 else 4) for i, n in enumerate(names)})
    problem = AllocationProblem(_table(layers, options), cost, [f"avg_wbits={cost.cost(start).avg_weight_bits}"])
    one_round = dict(max_rounds=1, verify_per_round=1, max_passes=1000.0)
    full = refine(problem, start, model, splits.calibration, splits.calibration, None,
                  settings=RefineConfig(measure_samples=None, **one_round))
    part = refine(problem, start, model, splits.calibration, splits.calibration, None,
                  settings=RefineConfig(measure_samples=60, **one_round))
    assert full.cost["moves_measured"] == part.cost["moves_measured"] > 0
    assert part.cost["passes"] < full.cost["passes"]
