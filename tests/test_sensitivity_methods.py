"""The `measured` and `orthogonality` sensitivity methods and data-free (distilled) inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.allocation import LayerBits
from quant.errors import BitsearchError
from sensitivity import SensitivityOptions, SensitivityTable, compute_sensitivity
from sensitivity.datafree import bn_statistics_gap, distill_inputs
from sensitivity.orthogonality import centred_gram, importance_from_orm, orm_matrix


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread is faster than two and immune to a busy machine's oversubscription.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """The zoo's digits CNN and its splits (conftest points the zoo's cache at a per-session folder)."""
    import zoo

    return zoo.load_model("zoo:digits-cnn"), zoo.load_digits_splits()


# --- small models built for the tests -------------------------------------------------------------


class TwoLayer(nn.Module):
    """fc1 is robust (every weight ±c: exact on any symmetric grid), fc2 fragile (one outlier per row)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.sign(torch.randn(32, 16, generator=g)) * 0.25)
            w2 = torch.randn(32, 32, generator=g) * 0.2
            w2[:, 0] = 8.0  # the outlier stretches every row's range: at low bits the rest rounds to 0
            self.fc2.weight.copy_(w2)
            self.out.weight.copy_(torch.sign(torch.randn(10, 32, generator=g)) * 0.1)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Residual(nn.Module):
    """Skip connections, a module called twice (shared ReLU), in-place ops: the prefix cache must cope."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.side = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        y = self.body(x)
        y += self.side(x)  # in-place on the output of a module
        y = self.act(y)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _gaussian_data(n=96, d=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# --- data-free inputs -----------------------------------------------------------------------------


def test_distilled_inputs_match_batchnorm_statistics(digits):
    loaded, _ = digits
    model = loaded.model
    model.train()  # flags must come back as they were
    grads = [p.requires_grad for p in model.parameters()]
    info: dict = {}
    x = distill_inputs(model, loaded.example_input, 48, seed=1, steps=100, info=info)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grads
    model.eval()
    assert x.shape == (48, *loaded.example_input.shape[1:]) and torch.isfinite(x).all()
    gap = bn_statistics_gap(model, x)
    noise = bn_statistics_gap(model, torch.randn_like(x))
    assert set(gap) == {"bn1", "bn2", "bn3"}
    for name in gap:
        for k in ("mean_err", "std_err"):
            assert gap[name][k] < 0.05, (name, k, gap[name][k])
    worst_random = max(max(v.values()) for v in noise.values())
    worst_distilled = max(max(v.values()) for v in gap.values())
    assert worst_distilled < worst_random / 5
    # The defaults (fewer steps) are already far closer than noise; and a seed gives the same inputs.
    quick = distill_inputs(model, loaded.example_input, 48, seed=1)
    assert max(max(v.values()) for v in bn_statistics_gap(model, quick).values()) < worst_random / 3
    assert torch.equal(quick, distill_inputs(model, loaded.example_input, 48, seed=1))


def test_data_free_without_batchnorm_is_a_clear_error():
    model = TwoLayer().eval()
    with pytest.raises(BitsearchError, match="no BatchNorm statistics to distil inputs from; give data"):
        distill_inputs(model, torch.randn(2, 16), 8)
    with pytest.raises(BitsearchError, match="no BatchNorm"):
        compute_sensitivity(
            model, None, "measured", SensitivityOptions(samples=8), example_input=torch.randn(2, 16)
        )


# --- measured --------------------------------------------------------------------------------------


def test_measured_ranks_fragile_layer_above_robust():
    model = TwoLayer().eval()
    x, _ = _gaussian_data()
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the float model gets right: quantization can only cost
    opts = SensitivityOptions(weight_bits=(2, 3, 4), samples=96, batch_size=32)
    table = compute_sensitivity(model, (x, y), "measured", opts)
    assert table.layer_names == ["fc1", "fc2", "out"]
    assert table.covers_activations and table.settings["metric"] == "loss"
    for o in table.options:
        assert table.value("fc2", o) > 10 * abs(table.value("fc1", o)) + 1e-3
    assert np.allclose(table.values[0], 0.0, atol=1e-6)  # ±c weights are exact on every grid
    assert table.stderr is not None and np.all(table.stderr[1] > 0)
    assert table.cost["passes"] <= table.cost["naive_passes"]
    # Without labels: KL to the float model, non-negative.
    kl = compute_sensitivity(model, x, "measured", opts)
    assert kl.settings["metric"] == "kl" and np.all(kl.values >= 0)
    assert kl.value("fc2", LayerBits(2)) > 10 * kl.value("fc1", LayerBits(2))


def test_measured_activation_bits_change_the_values(digits):
    loaded, splits = digits
    opts = SensitivityOptions(weight_bits=(8,), activation_bits=(2, 4, 32), samples=64, batch_size=32)
    table = compute_sensitivity(loaded.model, splits.calibration, "measured", opts)
    a2, a4, a32 = (table.options.index(LayerBits(8, a)) for a in (2, 4, 32))
    v = table.values
    assert np.all(np.isfinite(v))
    assert np.all(v[:, a2] > v[:, a32])  # 2-bit inputs hurt every layer more than 8-bit weights alone
    assert v[:, a2].sum() > v[:, a4].sum()
    # 4-bit inputs barely hurt this CNN: on 64 samples their summed loss change can fall below float's by
    # noise (one layer's A4 value is within one standard error of 0), so the order is checked up to that noise.
    assert not np.allclose(v[:, a4], v[:, a32])
    assert v[:, a4].sum() > v[:, a32].sum() - 3 * np.sqrt((table.stderr[:, a4] ** 2).sum())


def test_measured_suffix_replay_equals_full_passes():
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(40, 3, 8, 8)
    opts = dict(weight_bits=(2, 4), activation_bits=(3, 32), samples=40, batch_size=16)
    fast = compute_sensitivity(model, x, "measured", SensitivityOptions(**opts))
    no_cache = SensitivityOptions(**opts, params={"suffix_cache": False})
    slow = compute_sensitivity(model, x, "measured", no_cache)
    np.testing.assert_allclose(fast.values, slow.values, rtol=1e-5, atol=1e-7)
    assert fast.cost["passes"] < slow.cost["passes"]
    # A tiny cache budget forces one batch per chunk: same numbers.
    tiny = compute_sensitivity(model, x, "measured", SensitivityOptions(**opts, params={"cache_mb": 1e-6}))
    np.testing.assert_allclose(tiny.values, fast.values, rtol=1e-5, atol=1e-7)
    # The model given is never modified.
    assert not any(type(m).__name__ == "QuantizedLayer" for m in model.modules())


def test_measured_rejects_unknown_metric():
    x, y = _gaussian_data(n=8)
    with pytest.raises(BitsearchError, match="metric"):
        opts = SensitivityOptions(samples=8, params={"metric": "mse"})
        compute_sensitivity(TwoLayer(), (x, y), "measured", opts)


# --- orthogonality ---------------------------------------------------------------------------------


def test_orm_is_linear_cka():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=g)
    b = a @ torch.randn(12, 7, generator=g) + 0.3 * torch.randn(30, 7, generator=g)
    c = torch.randn(30, 9, generator=g)
    m = orm_matrix([centred_gram(t) for t in (a, b, c, 3 * a)])

    def cka(x, y):  # the feature-space form: ||XᵀY||² / (||XᵀX|| ||YᵀY||) on centred features
        x, y = x.double(), y.double()
        x, y = x - x.mean(0), y - y.mean(0)
        return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

    assert m[0, 1] == pytest.approx(cka(a, b), rel=1e-9)
    assert m[0, 2] == pytest.approx(cka(a, c), rel=1e-9)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)
    assert m[0, 3] == pytest.approx(1.0)  # invariant to scale
    gamma, theta, w = importance_from_orm(m, beta=2.0)
    assert theta.max() == pytest.approx(1.0) and np.argmax(theta) == 2  # c is orthogonal to the rest
    assert w[-1] == pytest.approx(theta[-1]) and w[0] == pytest.approx(theta.mean())


def test_orthogonality_ranks_fragile_layer_above_robust():
    model = TwoLayer().eval()
    x, _ = _gaussian_data()
    opts = SensitivityOptions(weight_bits=(2, 3, 4, 8), activation_bits=(4, 32), samples=64)
    table = compute_sensitivity(model, x, "orthogonality", opts)
    assert not table.covers_activations and table.cost["passes"] == 1.0
    for o in table.options:
        assert table.value("fc2", o) > 10 * table.value("fc1", o) + 1e-6
        # Activation bits are not covered: the same value whatever they are.
        assert table.value("fc2", o) == table.value("fc2", LayerBits(o.weight_bits, 32))
    assert np.all(np.diff(table.values[1, ::2]) <= 0) and table.values[1, 0] > 10 * table.values[1, -2]
    ex = table.extra
    theta = ex["orthogonality_importance"]
    assert len(theta) == 3 and max(theta) == pytest.approx(1.0)
    assert np.array(ex["orthogonality_matrix"]).shape == (3, 3)
    assert len(ex["lp_weight"]) == 3 and ex["beta"] == 1.0
    assert "mapping" in table.settings and "definition" in table.settings
    lp = compute_sensitivity(model, x, "orthogonality", SensitivityOptions(weight_bits=(2, 4, 8, 32),
                                                                               params={"mapping": "lp"}))
    w = np.array(lp.extra["lp_weight"]) / np.mean(lp.extra["lp_weight"])
    np.testing.assert_allclose(lp.values, w[:, None] * np.array([0.75, 0.5, 0.0, 0.0])[None, :])


# --- compute_sensitivity on a zoo model --------------------------------------------------------------


@pytest.mark.parametrize("method", ["measured", "orthogonality"])
def test_zoo_digits_with_data_and_data_free(digits, method):
    loaded, splits = digits
    opts = SensitivityOptions(weight_bits=(2, 4, 8), samples=64, batch_size=32)
    with_data = compute_sensitivity(loaded.model, splits.calibration, method, opts)
    assert with_data.data["data_free"] is False and with_data.data["labels"] is True
    assert with_data.data["samples"] == 64
    free = compute_sensitivity(loaded.model, None, method, opts, example_input=loaded.example_input)
    assert free.data["data_free"] is True and free.data["labels"] is False
    for t in (with_data, free):
        assert t.method == method and t.layer_names == ["conv1", "conv2", "conv3", "fc"]
        assert np.all(np.isfinite(t.values))
        assert np.all(t.values[:, 0] >= t.values[:, 2])  # 2 bits cost at least as much as 8
        assert t.cost["seconds"] > 0 and t.cost["passes"] > 0
    if method == "measured":
        assert with_data.settings["metric"] == "loss" and free.settings["metric"] == "kl"


def test_json_round_trip(digits, tmp_path):
    loaded, splits = digits
    opts = SensitivityOptions(weight_bits=(2, 4), activation_bits=(4, 32), samples=32, batch_size=32)
    for method in ("measured", "orthogonality"):
        table = compute_sensitivity(loaded.model, splits.calibration, method, opts)
        table.values[0, 0] = float("nan")  # NaN survives as null
        path = tmp_path / f"{method}.json"
        table.save(path)
        back = SensitivityTable.load(path)
        assert back.method == method and back.layer_names == table.layer_names
        assert back.options == table.options
        np.testing.assert_array_equal(back.values, table.values)  # NaN == NaN for this check
        if table.stderr is None:
            assert back.stderr is None
        else:
            np.testing.assert_array_equal(back.stderr, table.stderr)
        assert back.extra == table.extra and back.settings == table.settings
        assert back.covers_activations == table.covers_activations and back.cost == table.cost
        assert math.isnan(back.values[0, 0])


def test_unknown_method_is_an_error():
    x, y = _gaussian_data(n=8)
    with pytest.raises(BitsearchError, match="unknown sensitivity method"):
        compute_sensitivity(TwoLayer(), (x, y), "no-such-method", SensitivityOptions(samples=8))
