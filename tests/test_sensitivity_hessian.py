"""The `hessian` and `fisher` sensitivity methods against exact values on tiny models.

Exact per-layer Hessian traces come from the full Hessian block of the mean cross-entropy with respect to one
layer's weights (torch.func.hessian, float64), so every estimator is checked against the definition.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sensitivity.plumbing as plumbing_module
from quant.allocation import LayerBits
from quant.apply import QuantConfig, QuantizedLayer
from quant.layers import discover_layers
from sensitivity import SensitivityOptions, SensitivityTable, compute_sensitivity
from sensitivity.hessian import (
    PerSampleGrads,
    gauss_newton_traces,
    gn_numeric_check,
    gn_structure_check,
    hutchinson_traces,
)

torch.set_default_dtype(torch.float32)

# torch.func.hessian (the exact reference) loads forward-AD decompositions through torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# --- tiny models ------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Piecewise linear in its weights: conv-ReLU-maxpool-conv-ReLU-linear (36, 216, 120 weights)."""

    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, bias=False)
        self.fc = nn.Linear(24, 5)
        self.act = act or nn.ReLU()

    def forward(self, x):
        x = F.max_pool2d(self.act(self.conv1(x)), 2)
        x = self.act(self.conv2(x))
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, d: int = 16, classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _cnn_data(n=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def _model(cls=TinyCNN, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return cls(**kw).to(dtype).eval()


def _modules(model, x):
    named = dict(model.named_modules())
    return {l.name: named[l.name] for l in discover_layers(model, x[:2])}


def exact_block_traces(model, x, y) -> dict[str, float]:
    """Tr of the exact Hessian block of the mean cross-entropy for each layer's weight."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for name in _modules(model, x):
        key = f"{name}.weight"

        def loss(w, key=key):
            p = dict(params)
            p[key] = w
            return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

        w = params[key]
        h = torch.func.hessian(loss)(w).reshape(w.numel(), w.numel())
        out[name] = float(h.diagonal().sum())
    return out


@pytest.fixture(scope="module")
def pl_case():
    """The piecewise-linear TinyCNN (float64), 32 samples, and its exact per-layer block traces."""
    model = _model()
    x, y = _cnn_data()
    return model, x, y, exact_block_traces(model, x, y)


# --- traces ----------------------------------------------------------------------------------------------


def test_gauss_newton_equals_exact_hessian_block_on_piecewise_linear_net(pl_case):
    model, x, y, exact = pl_case
    mods = _modules(model, x)
    res = gauss_newton_traces(model, mods, [(x[:20], y[:20]), (x[20:], y[20:])])  # two batches
    assert res.estimator == "gauss-newton-exact"
    assert res.backward_passes == 2 * 5  # one per class per batch
    for name, t in res.as_dict().items():
        assert t == pytest.approx(exact[name], rel=1e-4)
    assert np.all(res.stderr == 0)
    # The numerical check certifies it: the term GN drops is exactly zero.
    assert max(gn_numeric_check(model, mods, x[:4], y[:4]).values()) == 0.0


def test_in_place_relu_after_a_layer_does_not_corrupt_its_captured_output():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.relu = nn.ReLU(inplace=True)  # overwrites the conv's output tensor
            self.fc = nn.Linear(3 * 36, 4)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).flatten(1))

    model = _model(InPlace)
    x, y = _cnn_data(n=16)
    y = y % 4
    exact = exact_block_traces(model, x, y)
    res = gauss_newton_traces(model, _modules(model, x), [(x, y)])
    for name, t in res.as_dict().items():
        assert t == pytest.approx(exact[name], rel=1e-6)
    # fisher's per-sample gradients see the same: its weight part against a per-sample autograd loop
    opts = SensitivityOptions(weight_bits=(3,), samples=16)
    t = compute_sensitivity(model, (x, y), "fisher", opts)
    q = QuantizedLayer(copy.deepcopy(model.conv), "conv", QuantConfig())
    q.set_bits(LayerBits(3, 32))
    with torch.no_grad():
        dw2 = (q.weight_quant(q.layer.weight) - q.layer.weight).pow(2)
    per = [
        torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.conv.weight)[0]
        for i in range(16)
    ]
    expected = 0.5 * float(sum((g.pow(2) * dw2).sum() for g in per)) / 16
    assert t.value("conv", LayerBits(3, 32)) == pytest.approx(expected, rel=1e-5)


def test_gauss_newton_monte_carlo_columns_are_unbiased(pl_case):
    model, x, y, exact = pl_case
    res = gauss_newton_traces(model, _modules(model, x), [(x, y)], max_classes=2, columns=64, seed=3)
    assert res.estimator == "gauss-newton-mc"
    for i, name in enumerate(res.names):
        assert res.stderr[i] > 0
        assert abs(res.trace[i] - exact[name]) <= 3.5 * res.stderr[i]


def test_hutchinson_per_layer_within_three_standard_errors(pl_case):
    model, x, y, exact = pl_case
    res = hutchinson_traces(
        model,
        _modules(model, x),
        [(x, y)],
        probing="per-layer",
        tol=0.0,
        min_probes=300,
        max_probes=300,
        probe_batch=100,
        seed=1,
    )
    assert res.probes == 300
    for i, name in enumerate(res.names):
        assert 0 < res.stderr[i] < 0.2 * abs(exact[name])
        assert abs(res.trace[i] - exact[name]) <= 3 * res.stderr[i]


def test_joint_probing_agrees_with_per_layer_probing(pl_case):
    model, x, y, exact = pl_case
    mods = _modules(model, x)
    joint = hutchinson_traces(
        model,
        mods,
        [(x[:16], y[:16]), (x[16:], y[16:])],
        probing="joint",
        tol=0.0,
        min_probes=600,
        max_probes=600,
        probe_batch=100,
        seed=2,
        keep_graph=False,
    )
    single = hutchinson_traces(
        model,
        mods,
        [(x, y)],
        probing="per-layer",
        tol=0.0,
        min_probes=300,
        max_probes=300,
        probe_batch=100,
        seed=5,
    )
    # 6 vmapped rounds of 100 probes, each over 2 batches whose gradient graphs are rebuilt every round
    assert joint.probes == 600 and joint.hvp_passes == 6 * 2 and joint.backward_passes == 6 * 2
    # The one-probe-at-a-time path gives the same numbers as the vmapped one for the same draws.
    a = hutchinson_traces(model, mods, [(x, y)], probing="joint", tol=0.0, min_probes=6, max_probes=6, seed=9)
    b = hutchinson_traces(
        model, mods, [(x, y)], probing="per-layer", tol=0.0, min_probes=6, max_probes=6, probe_batch=3, seed=9
    )
    c = hutchinson_traces(
        model, mods, [(x, y)], probing="per-layer", tol=0.0, min_probes=6, max_probes=6, seed=9
    )
    np.testing.assert_allclose(b.trace, c.trace, rtol=1e-10)
    assert a.hvp_passes == 6 and c.hvp_passes == 18
    for i, name in enumerate(joint.names):
        se = math.hypot(joint.stderr[i], single.stderr[i])
        assert abs(joint.trace[i] - single.trace[i]) <= 3 * se
        assert abs(joint.trace[i] - exact[name]) <= 3 * joint.stderr[i]


def test_hutchinson_stops_at_tolerance(pl_case):
    model, x, y, _ = pl_case
    res = hutchinson_traces(
        model,
        _modules(model, x),
        [(x, y)],
        probing="per-layer",
        tol=0.1,
        min_probes=5,
        max_probes=400,
        seed=0,
    )
    assert all(5 <= k < 400 for k in res.details["probes_per_layer"])
    assert np.all(res.stderr <= 0.1 * np.abs(res.trace) + 1e-12)


def test_non_piecewise_linear_net_falls_back_to_hutchinson():
    model = _model(act=nn.Tanh())
    x, y = _cnn_data()
    mods = _modules(model, x)
    ok, _, reason = gn_structure_check(model, mods, {n: 1 for n in mods})
    assert not ok and "Tanh" in reason  # a known non-piecewise-linear module

    # A functional non-linearity is invisible to the structure check but not to the numerical one.
    class Gelu(TinyCNN):
        def forward(self, x):
            x = F.max_pool2d(F.gelu(self.conv1(x)), 2)
            return self.fc(F.gelu(self.conv2(x)).flatten(1))

    g = _model(Gelu)
    assert gn_structure_check(g, _modules(g, x), {n: 1 for n in mods})[0]
    ratios = gn_numeric_check(g, _modules(g, x), x[:4], y[:4])
    assert ratios["conv1"] > 1e-3 and ratios["fc"] == 0.0  # the last layer is always linear in its weights
    opts = SensitivityOptions(
        weight_bits=(4,),
        samples=32,
        batch_size=32,
        params={"max_probes": 200, "probe_batch": 100, "tol": 0.0},
    )
    t = compute_sensitivity(g, (x, y), "hessian", opts)
    assert t.settings["estimator"] == "hutchinson" and t.extra["estimator"] == "hutchinson"
    assert t.extra["gn_check"]["numeric_max_ratio"] > 1e-3
    assert "curvature the Gauss-Newton block drops" in t.extra["gn_check"]["decision"]
    exact = exact_block_traces(g, x, y)
    for name, tr in t.extra["trace"].items():
        assert abs(tr - exact[name]) <= 4 * t.extra["trace_stderr"][name]
    # On the piecewise-linear net the same call takes the exact route.
    t2 = compute_sensitivity(_model(), (x, y), "hessian", opts)
    assert t2.extra["estimator"] == "gauss-newton-exact" and t2.cost["hvp_passes"] == 0


def test_shared_layer_is_not_gauss_newton():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(F.relu(self.fc(F.relu(self.fc(x)))))

    m = _model(Shared)
    x = torch.randn(16, 6, dtype=torch.float64)
    t = compute_sensitivity(m, x, "hessian", SensitivityOptions(weight_bits=(4,), params={"max_probes": 10}))
    assert t.extra["estimator"] == "hutchinson"
    assert "more than once" in t.extra["gn_check"]["structure"]
    assert t.extra["gn_check"]["decision"].startswith("hutchinson: layers run more than once")
    assert "argmax" in t.settings["labels"]


def test_dense_outputs_use_hutchinson():
    """(N, C, H, W) logits (per-pixel cross-entropy): the exact route needs (N, C), so it falls back."""
    m = _model(lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)))
    x, _ = _cnn_data(n=8)
    t = compute_sensitivity(m, x, "hessian", SensitivityOptions(weight_bits=(4,), params={"max_probes": 10}))
    assert t.extra["estimator"] == "hutchinson" and "not (N, classes)" in t.extra["gn_check"]["decision"]
    assert np.all(np.isfinite(t.values))


# --- per-sample gradients for every layer kind -------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (5, 4, 7, 7)),
        (nn.Conv2d(3, 4, 2, padding="same", padding_mode="reflect", dilation=2), (5, 3, 6, 6)),
        (nn.Conv1d(3, 4, 3, padding=2), (5, 3, 9)),
        (nn.Linear(4, 3), (5, 2, 4)),  # a token dimension
        (nn.Conv3d(2, 3, 2), (5, 2, 3, 3, 3)),  # vmap fallback
        (nn.ConvTranspose2d(3, 2, 3, stride=2), (5, 3, 4, 4)),  # vmap fallback
    ],
)
@pytest.mark.parametrize("budget", [None, 64])  # 64: patches are unfolded again per tiny chunk
def test_per_sample_grads_match_autograd(layer, shape, budget, monkeypatch):
    if budget:
        monkeypatch.setattr(plumbing_module, "_PER_SAMPLE_BUDGET", budget)
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(*shape, dtype=torch.float64)
    out = layer(x)
    gout = torch.randn_like(out)
    ref = torch.stack(
        [
            torch.autograd.grad((layer(x[i : i + 1]) * gout[i : i + 1]).sum(), layer.weight)[0]
            for i in range(shape[0])
        ]
    )
    psg = PerSampleGrads(layer, [x], norm_uses=10)
    got = psg.grads([gout], slice(0, shape[0]))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(psg.sq_norms([gout]), ref.flatten(1).pow(2).sum(1))


# --- fisher ----------------------------------------------------------------------------------------------


def _sym_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric min-max quantization, by hand."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def test_fisher_weight_part_equals_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    w = model[0].weight.detach()
    p = torch.softmax(x @ w.T, 1)
    resid = p - F.one_hot(y, 3).double()  # ∂ℓ_n/∂logits
    per_sample = resid[:, :, None] * x[:, None, :]  # ∂ℓ_n/∂W = (p − e_y) xᵀ
    fisher = per_sample.pow(2).mean(0)
    dw = _sym_quant(w, 4) - w
    expected_w = 0.5 * float((fisher * dw.pow(2)).sum())

    opts = SensitivityOptions(weight_bits=(4, 32), activation_bits=(4, 32), samples=16, batch_size=5)
    t = compute_sensitivity(model, (x, y), "fisher", opts)
    assert t.covers_activations
    # (the quantizer keeps its scales in float32, hence the tolerance)
    assert t.value("0", LayerBits(4, 32)) == pytest.approx(expected_w, rel=1e-5)
    assert t.value("0", LayerBits(32, 32)) == 0.0
    # Activation part: the input gradient Wᵀ(p − e_y) against the input quantizer's own noise.
    q = QuantizedLayer(copy.deepcopy(model[0]), "0", QuantConfig())
    q.observing = True
    q(x)
    q.observing = False
    q.set_bits(LayerBits(32, 4))
    dx = q.input_quant(x) - x
    gx = resid @ w
    expected_a = 0.5 * float((gx.pow(2) * dx.pow(2)).sum(1).mean())
    assert expected_a > 0
    assert t.value("0", LayerBits(32, 4)) == pytest.approx(expected_a, rel=1e-5)
    assert t.value("0", LayerBits(4, 4)) == pytest.approx(expected_w + expected_a, rel=1e-5)  # additive
    # Standard error over samples, for the combined per-sample values.
    ps = 0.5 * (per_sample.pow(2) * dw.pow(2)).sum((1, 2)) + 0.5 * (gx.pow(2) * dx.pow(2)).sum(1)
    i, j = t.index("0", LayerBits(4, 4))
    assert t.stderr[i, j] == pytest.approx(float(ps.std() / math.sqrt(16)), rel=1e-5)


# --- both methods: a fragile layer, weights-only semantics, JSON ------------------------------------------


def _fragile_mlp():
    """fc1 has an outlier weight column on a near-constant-zero input feature: harmless in float, but it sets
    every row's min-max range, so at 3 bits all of fc1's useful weights round to zero. fc2 is ordinary."""
    m = _model(MLP, seed=4, dtype=torch.float32)
    with torch.no_grad():
        w = m.fc1.weight
        w[:, 0] = 30 * w.abs().amax(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    x[:, 0] *= 1e-3
    with torch.no_grad():
        y = m(x).argmax(1)
    return m, x, y


def _measured_increase(model, x, y, layer, bits):
    m = copy.deepcopy(model)
    lin = getattr(m, layer)
    with torch.no_grad():
        lin.weight.copy_(_sym_quant(lin.weight, bits))
        return float(F.cross_entropy(m(x), y) - F.cross_entropy(model(x), y))


@pytest.mark.parametrize(
    "method, params", [("hessian", {}), ("hessian", {"estimator": "hutchinson"}), ("fisher", {})]
)
def test_fragile_layer_ranks_above_robust_one(method, params):
    model, x, y = _fragile_mlp()
    assert _measured_increase(model, x, y, "fc1", 3) > 5 * _measured_increase(model, x, y, "fc2", 3)
    probes = {"max_probes": 50} if method == "hessian" else {}  # fisher takes no settings: it would refuse it
    opts = SensitivityOptions(weight_bits=(3, 8), samples=128, params={**probes, **params})
    t = compute_sensitivity(model, (x, y), method, opts)
    o = LayerBits(3, 32)
    assert t.value("fc1", o) > 3 * t.value("fc2", o)
    assert t.value("fc1", o) > t.value("fc1", LayerBits(8, 32)) > 0


def test_hessian_is_weights_only_and_float_bits_are_free():
    model = _model(dtype=torch.float32)
    x, y = _cnn_data(dtype=torch.float32)
    opts = SensitivityOptions(weight_bits=(2, 4, 16, 32), activation_bits=(4, 32), samples=32)
    t = compute_sensitivity(model, (x, y), "hessian", opts)
    assert not t.covers_activations
    for name in t.layer_names:
        for wb in (2, 4, 16, 32):
            assert t.value(name, LayerBits(wb, 4)) == t.value(name, LayerBits(wb, 32))
        assert (
            t.value(name, LayerBits(2, 32))
            > t.value(name, LayerBits(4, 32))
            > t.value(name, LayerBits(16, 32))
        )
        assert 0 < t.value(name, LayerBits(16, 32)) < 1e-4 * t.value(name, LayerBits(4, 32))
        assert t.value(name, LayerBits(32, 32)) == 0.0
    # value = ½ · Tr/n · ‖ΔW‖² with the QuantizedLayer's own weight error
    q = QuantizedLayer(copy.deepcopy(model.conv2), "conv2", QuantConfig())
    q.set_bits(LayerBits(4, 32))
    with torch.no_grad():
        dw2 = float((q.weight_quant(q.layer.weight) - q.layer.weight).pow(2).sum())
    tr = t.extra["trace"]["conv2"]
    assert t.value("conv2", LayerBits(4, 32)) == pytest.approx(0.5 * tr / 216 * dw2, rel=1e-6)


@pytest.mark.parametrize("method", ["hessian", "fisher"])
def test_tables_round_trip_through_json(method):
    model = _model(dtype=torch.float32)
    x, y = _cnn_data(dtype=torch.float32)
    opts = SensitivityOptions(weight_bits=(2, 4, 8), activation_bits=(8, 32), samples=32, batch_size=16)
    seen: list[float] = []
    t = compute_sensitivity(model, (x, y), method, opts, progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0 <= a <= b <= 1 for a, b in itertools.pairwise(seen))
    back = SensitivityTable.from_json(t.to_json())
    np.testing.assert_array_equal(back.values, t.values)
    np.testing.assert_array_equal(back.stderr, t.stderr)
    assert back.extra == t.extra and back.settings == t.settings and back.method == method
    assert back.cost["passes"] == t.cost["passes"] > 0
