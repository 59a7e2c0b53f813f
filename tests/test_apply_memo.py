"""Re-deriving a layer's weight quantizer is memoised per option, and the memo never serves stale weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from quant import Allocation, LayerBits, QuantConfig
from quant.apply import apply_allocation, collect_statistics, set_allocation, wrap_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


def test_switching_options_matches_a_fresh_quantization_and_follows_new_statistics():
    model = _net()
    calib = torch.randn(64, 3, 6, 6)
    x = torch.randn(16, 3, 6, 6)
    cfg = QuantConfig(weight_clip="auto", weight_rounding="gptq", activation_clip="mse")
    names = ["0", "3"]
    a3 = Allocation.uniform(names, LayerBits(3, 4))
    a5 = Allocation.uniform(names, LayerBits(5, 8))
    q = copy.deepcopy(model)
    layers = wrap_model(q, cfg)
    collect_statistics(q, layers, calib, cfg)
    for a in (a3, a5, a3, a5, a3):  # the later ones come from the memo
        set_allocation(q, a)
        with torch.no_grad():
            assert torch.equal(q(x), apply_allocation(model, a, calib, cfg)(x))
    # new statistics (other calibration data) must not reuse the weights rounded for the old ones
    calib2 = torch.randn(64, 3, 6, 6) * 3 + 1
    collect_statistics(q, layers, calib2, cfg)
    set_allocation(q, a5)
    with torch.no_grad():
        assert torch.equal(q(x), apply_allocation(model, a5, calib2, cfg)(x))
    # a changed weight is re-quantized, not served from the memo
    with torch.no_grad():
        q[3].layer.weight.mul_(2.0)
    layers["3"].bits = None
    set_allocation(q, a5)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[3].weight.mul_(2.0)
    with torch.no_grad():
        assert torch.equal(q(x), apply_allocation(ref, a5, calib2, cfg)(x))
