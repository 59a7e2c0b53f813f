"""Named weight schemes (group-wise INT, MXFP4, NVFP4, FP8) as search options: through the Python API with a
`bpw` budget, refused at submission with a method that cannot price them, and spelled the same by the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitsearch
from bitsearch import SearchSpec
from quant.cost import CostModel
from quant.errors import BitsearchError


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def trained():
    from zoo import load_digits_splits

    torch.manual_seed(0)
    sp = load_digits_splits()
    m = TinyMLP()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(m(sp.train.x), sp.train.y).backward()
        opt.step()
    return m.eval(), sp


def test_a_search_over_schemes_meets_a_bpw_budget(trained):
    model, sp = trained
    result = bitsearch.search(
        model, sp.test, budgets=["bpw=5"], pareto=3,
        options={"weight_bits": [8], "schemes": ["int4-g32", "mxfp4"]}, calib_size=64, refine=False,
        sensitivity={"method": "measured", "samples": 64},
    )
    names = {b.scheme_name for b in result.table.options}
    assert {"int4-g32", "mxfp4"} <= names
    rec = result.recommendation
    assert rec is not None
    cost = CostModel(result.table.layers).cost(rec.allocation)
    assert cost.bpw <= 5 + 1e-9
    # the schemes survive the JSON round trip of the whole result
    again = type(result).from_json(result.to_json())
    assert {b.scheme_name for b in again.table.options} == names


def test_schemes_with_a_method_that_cannot_price_them_are_refused_in_the_spec():
    with pytest.raises(BitsearchError, match="prices integer bit-widths only"):
        SearchSpec.parse({"model": "zoo:digits-mlp", "options": {"schemes": ["nvfp4"]},
                          "sensitivity": {"method": "orthogonality"}})
    for method in ("fisher", "hessian", "measured"):  # ΔW from each scheme's own quantize-dequantize
        SearchSpec.parse({"model": "zoo:digits-mlp", "options": {"schemes": ["nvfp4"]},
                          "sensitivity": {"method": method}})
    with pytest.raises(BitsearchError, match="schemes"):
        SearchSpec.parse({"model": "zoo:digits-mlp", "options": {"schemes": ["int4-g7"]},
                          "sensitivity": {"method": "measured"}})
    with pytest.raises(BitsearchError, match="at least one weight option"):
        SearchSpec.parse({"model": "zoo:digits-mlp", "options": {"weight_bits": []}})
    spec = SearchSpec.parse({"model": "zoo:digits-mlp", "options": {"weight_bits": [], "schemes": ["NVFP4"]},
                             "sensitivity": {"method": "measured"}, "budgets": ["bpw=4.5"]})
    assert spec.options.schemes == ["nvfp4"] and spec.budgets[0].metric == "bpw"


def test_the_cli_spells_schemes_like_the_spec():
    from service.cli_search import search_spec_from_flags

    spec = search_spec_from_flags(
        "zoo:digits-mlp", None, None, None, ["bpw=4.5"], "measured", [], "ilp", [], 3, None, "none", "32", False,
        None, 64, 64, None, False, 0, schemes="int4-g128,mxfp4")
    assert spec.options.weight_bits == [] and spec.options.schemes == ["int4-g128", "mxfp4"]
