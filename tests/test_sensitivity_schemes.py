"""Named weight schemes priced by the Fisher and Hessian proxies: ΔW = Q(W) − W from each scheme's own grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant import LayerBits
from quant.formats import parse_scheme
from sensitivity import SensitivityOptions, compute_sensitivity


def _outlier_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(128 → 3) whose every row has one outlier in its first 32-input group: a per-channel 4-bit scale
    is then set by the outlier and rounds the other three groups coarsely, a per-32-group scale does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 3, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight[:, 5] = 20 * model[0].weight.abs().amax(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 128, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def _dw(w: torch.Tensor, option: LayerBits) -> torch.Tensor:
    """Q(W) − W by hand: the scheme's exact fake-quant, or per-row symmetric min-max for plain int bits."""
    if option.scheme:
        return parse_scheme(option.scheme).fake_quant(w).double() - w
    qmax = 2 ** (option.weight_bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale - w


OPTIONS = (LayerBits(4, 32), LayerBits.of("int4-g32"), LayerBits.of("nvfp4"), LayerBits.of("mxfp4"))


def test_fisher_prices_each_scheme_from_its_own_grid():
    model, x, y = _outlier_linear()
    w = model[0].weight.detach()
    resid = torch.softmax(x @ w.T, 1) - F.one_hot(y, 3).double()
    fisher = (resid[:, :, None] * x[:, None, :]).pow(2).mean(0)  # per-sample gradients (p − e_y) xᵀ, squared
    opts = SensitivityOptions(weight_bits=(4,), schemes=("int4-g32", "nvfp4", "mxfp4"), samples=24, batch_size=7)
    assert opts.options == list(OPTIONS)
    t = compute_sensitivity(model, (x, y), "fisher", opts)
    for o in OPTIONS:
        expected = 0.5 * float((fisher * _dw(w, o).pow(2)).sum())
        assert t.value("0", o) == pytest.approx(expected, rel=1e-4), o.label()
    # group-wise scales beat one scale per row on outlier rows, by a wide margin
    assert t.value("0", LayerBits.of("int4-g32")) < 0.5 * t.value("0", LayerBits(4, 32))
    assert set(t.extra["weight_noise_sq"]["0"]) == {"4", "int4-g32", "nvfp4", "mxfp4"}


def test_hessian_prices_each_scheme_from_its_own_grid():
    model, x, y = _outlier_linear()
    w = model[0].weight.detach()
    opts = SensitivityOptions(weight_bits=(4,), schemes=("int4-g32", "nvfp4", "mxfp4"), samples=24, batch_size=24)
    t = compute_sensitivity(model, (x, y), "hessian", opts)
    assert t.settings["estimator"].startswith("gauss-newton")
    trace = t.extra["trace_per_param"]["0"]
    for o in OPTIONS:
        noise = float(_dw(w, o).pow(2).sum())
        assert t.extra["weight_noise_sq"]["0"][o.scheme or "4"] == pytest.approx(noise, rel=1e-4)
        assert t.value("0", o) == pytest.approx(0.5 * trace * noise, rel=1e-4), o.label()
    assert t.value("0", LayerBits.of("int4-g32")) < 0.5 * t.value("0", LayerBits(4, 32))


@pytest.mark.parametrize("method", ["fisher", "hessian"])
def test_schemes_priced_on_token_data(method):
    transformers = pytest.importorskip("transformers")
    from zoo.hf import CausalLM
    from zoo.tokens import token_dataset

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, attn_implementation="eager",
    )
    lm = CausalLM(transformers.LlamaForCausalLM(cfg).eval())
    ds = token_dataset(torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(3)))
    params = {"max_probes": 4, "min_probes": 2} if method == "hessian" else {}
    opts = SensitivityOptions((), (32,), samples=8, batch_size=4, params=params,
                              schemes=("int2-g32", "int4-g32", "fp8-e4m3"))
    t = compute_sensitivity(lm, ds, method, opts)
    assert t.values.shape == (8, 3)
    noise = t.extra["weight_noise_sq"]
    for name in noise:  # the coarser grid has the larger error on every layer, the finest the smallest
        assert noise[name]["int2-g32"] > noise[name]["int4-g32"] > noise[name]["fp8-e4m3"] > 0
    if method == "fisher":  # F ≥ 0: the prices follow the errors
        assert (t.values[:, 0] > t.values[:, 1]).all() and (t.values[:, 1] > t.values[:, 2]).all()
