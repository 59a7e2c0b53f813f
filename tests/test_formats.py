"""Weight schemes: published value tables, hand-computed grids, exact storage cost, allocation v2, apply, GPTQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.allocation import Allocation, LayerBits
from quant.apply import QuantConfig, apply_allocation, quantized_layers
from quant.cost import CostModel
from quant.errors import BitsearchError
from quant.formats import E2M1, E4M3, FORMATS, parse_scheme, standard_schemes
from quant.gptq import GPTQConfig, gptq_format, gptq_rounding
from quant.layers import discover_layers
from quant.quantizers import SchemeQuantizer

DATA = Path(__file__).parent / "data"


# --- element types: the published value tables ---------------------------------------------------------


def test_e2m1_values_are_the_ocp_mx_table():
    # OCP MX spec v1.0, table of FP4 E2M1 values
    assert E2M1.values() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M1.bits == 4 and E2M1.emax == 2


def test_e2m1_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -5.0, -0.3, 0.0])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -4.0, -0.5, 0.0])
    assert torch.equal(E2M1.quantize(x), want)


def test_e4m3_table():
    v = E4M3.values()
    # OCP FP8 E4M3: 2^7 magnitudes minus the NaN pattern S.1111.111; max normal 448, smallest subnormal 2^-9
    assert len(v) == 127 and v[0] == 0.0 and v[1] == 2.0**-9 and v[-1] == 448.0 and v[-2] == 416.0
    assert 2.0**-6 in v and E4M3.emax == 8
    t = torch.tensor(v)
    assert torch.equal(E4M3.quantize(t), t)
    assert torch.equal(E4M3.quantize(-t), -t)
    # 17 lies halfway between 16 (mantissa 000) and 18 (001): ties to even; above 448 saturates
    x = torch.tensor([17.0, 19.0, 464.0, 1e6, 0.001, 2.0**-10])
    assert torch.equal(E4M3.quantize(x), torch.tensor([16.0, 20.0, 448.0, 448.0, 2.0**-9, 0.0]))


# --- formats: hand-computed grids ------------------------------------------------------------------------


def test_int_group_symmetric_grid():
    fmt = parse_scheme("int4-g32")
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = 7.0, 2.4, -3.5, 0.6  # group 0: amax 7 -> scale 7/7 = 1
    w[0, 32], w[0, 33], w[0, 34] = 0.35, -0.1, 0.2  # group 1: amax .35 -> scale .05 (fp16: 0.04998779296875)
    q = fmt.fake_quant(w)
    assert q[0, :4].tolist() == [7.0, 2.0, -4.0, 1.0]  # round half to even at -3.5
    s = float(torch.tensor(0.35 / 7).half())
    assert q[0, 32:35].tolist() == pytest.approx([7 * s, -2 * s, 4 * s], abs=0)


def test_int_group_asymmetric_grid():
    fmt = parse_scheme("int4-g32-asym")
    w = torch.linspace(-1.0, 2.0, 32)[None, :]
    s = float(torch.tensor(3.0 / 15).half())  # (hi - lo) / 15 stored in fp16
    zp = round(1.0 / s)
    want = ((torch.clamp(torch.round(w / s) + zp, 0, 15) - zp) * s)
    assert torch.equal(fmt.fake_quant(w), want)
    assert len(set(fmt.fake_quant(w).flatten().tolist())) == 16  # all 16 levels used
    assert float(fmt.fake_quant(torch.zeros(1, 32)).abs().max()) == 0.0  # zero stays exact


def test_int_partial_last_group_and_per_channel():
    w = torch.randn(3, 40)
    fmt = parse_scheme("int8-g32")
    q = fmt.fake_quant(w)
    assert q.shape == w.shape
    tail = w[:, 32:]
    s = (tail.abs().amax(1, keepdim=True) / 127).half().float()
    assert torch.equal(q[:, 32:], torch.clamp(torch.round(tail / s), -127, 127) * s)
    pc = parse_scheme("int8")
    s = (w.abs().amax(1, keepdim=True) / 127).half().float()
    assert torch.equal(pc.fake_quant(w), torch.clamp(torch.round(w / s), -127, 127) * s)


def test_mxfp4_shared_power_of_two_scale():
    fmt = parse_scheme("mxfp4")
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([5.0, 0.3, -2.6, 1.2])  # amax 5: X = 2^(floor(log2 5) - 2) = 1
    w[1, :3] = torch.tensor([0.7, 0.1, -0.26])  # amax .7: X = 2^(-1 - 2) = 1/8
    q = fmt.fake_quant(w)
    assert q[0, :4].tolist() == [4.0, 0.5, -3.0, 1.0]
    assert q[1, :3].tolist() == [0.75, 0.125, -0.25]  # 5.6 -> 6, 0.8 -> 1, -2.08 -> -2 (x 1/8)
    big = torch.zeros(1, 32)
    big[0, 0] = 7.9  # amax/X in [4, 8): values above 6·X saturate, as the spec says
    assert fmt.fake_quant(big)[0, 0] == 6.0
    assert torch.equal(fmt.fake_quant(torch.zeros(1, 32)), torch.zeros(1, 32))


def test_nvfp4_two_level_scales():
    fmt = parse_scheme("nvfp4")
    w = torch.zeros(2, 16)
    w[0, 0] = 6.0 * 448.0  # tensor amax -> tensor scale S = amax / (6·448) = 1
    w[1, :3] = torch.tensor([6.6, 3.0, -1.0])  # block scale E4M3(6.6/6 = 1.1) = 1.125
    q = fmt.fake_quant(w)
    assert q[0, 0] == 6.0 * 448.0
    s = 1.125
    assert q[1, :3].tolist() == [6 * s, 3 * s, -1 * s]  # 5.87 -> 6, 2.67 -> 3, -0.89 -> -1
    assert torch.equal(fmt.fake_quant(torch.zeros(2, 16)), torch.zeros(2, 16))


def test_fp8_per_channel_and_per_tensor():
    w = torch.tensor([[448.0, 17.0, -1.0], [0.5, 0.25, 0.0]])
    q = parse_scheme("fp8-e4m3").fake_quant(w)
    assert q[0].tolist() == [448.0, 16.0, -1.0]
    assert q[1].tolist() == [0.5, 0.25, 0.0]  # scale .5/448: elements 448, 224, 0
    qt = parse_scheme("fp8-e4m3-tensor").fake_quant(w)
    assert qt[0].tolist() == [448.0, 16.0, -1.0] and qt[1].tolist() == [0.5, 0.25, 0.0]


def test_every_standard_scheme_parses_and_round_trips():
    names = standard_schemes()
    for must in ("int4-g128", "int4-g128-asym", "fp8-e4m3", "mxfp4", "nvfp4", "int8", "ternary"):
        assert must in names
    for n in names:
        fmt = parse_scheme(n)
        assert fmt.name == n and parse_scheme(n.upper()) == fmt
        assert fmt.family in FORMATS
    with pytest.raises(BitsearchError, match="weight scheme 'int4-g100': group size must be one of"):
        parse_scheme("int4-g100")
    with pytest.raises(BitsearchError, match="unknown weight scheme"):
        parse_scheme("nf4")


# --- cost: bits per weight including scales ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, bpw",
    [
        ("int4-g128", 4 + 16 / 128),  # 4.125: fp16 scale per 128
        ("int4-g128-asym", 4 + (16 + 4) / 128),  # + a 4-bit zero point per group
        ("int4-g64", 4 + 16 / 64),
        ("int3-g32", 3 + 16 / 32),
        ("int8", 8 + 16 / 4096),  # one fp16 scale per output channel
        ("fp8-e4m3", 8 + 32 / 4096),  # one fp32 scale per output channel
        ("fp8-e4m3-tensor", 8 + 32 / 4096**2),
        ("mxfp4", 4 + 8 / 32),  # 4.25: E8M0 per 32
        ("mxfp8", 8 + 8 / 32),
        ("nvfp4", 4 + 8 / 16 + 32 / 4096**2),  # 4.5 + one fp32 tensor scale
        ("ternary", 2 + 32 / 4096),
    ],
)
def test_bits_per_weight_exact(name, bpw):
    assert parse_scheme(name).bits_per_weight(4096, 4096) == bpw


def test_partial_groups_are_counted():
    assert parse_scheme("int4-g128").storage_bits(2, 200) == 2 * 200 * 4 + 2 * 2 * 16
    assert parse_scheme("mxfp4").storage_bits(1, 33) == 33 * 4 + 2 * 8


class TwoLinear(nn.Module):
    def __init__(self, d=128, h=64, out=8):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_cost_model_bpw_metric_and_option_table():
    model = TwoLinear()
    layers = discover_layers(model, torch.randn(2, 128))
    cm = CostModel(layers)
    n = 128 * 64 + 64 * 8
    alloc = Allocation({"fc1": LayerBits.of("int4-g128"), "fc2": LayerBits.of("nvfp4", 8)})
    r = cm.cost(alloc)
    want = (64 * 128 * 4 + 64 * 16) + (8 * 64 * 4 + 8 * 4 * 8 + 32)
    assert r.weight_memory_bits == want and r.bpw == want / n
    assert r.metrics()["bpw"] == want / n
    assert r.avg_weight_bits == 4.0  # nominal element bits, no scales
    opts = [LayerBits(4), LayerBits.of("int4-g128"), LayerBits.of("mxfp4"), LayerBits(32)]
    t = cm.option_table(opts, ["bpw", "weight_memory"])
    assert t["bpw"][:, 1].sum() == pytest.approx((64 * 128 * 4 + 64 * 16 + 8 * 64 * 4 + 8 * 16) / n)
    assert t["bpw"][:, 2].sum() == pytest.approx(4.25)
    assert t["bpw"][:, 3].sum() == 32.0
    # legacy integer options keep the model's scale convention (fp32 per channel by default)
    assert t["weight_memory"][0, 0] == 64 * 128 * 4 + 64 * 32


def test_bpw_budget_is_a_metric():
    from search.problem import Budget

    b = Budget.parse("bpw=4.25")
    assert b.metric == "bpw" and b.limit == 4.25
    assert Budget.parse("bits_per_weight=3.5bits").metric == "bpw"


# --- LayerBits and the allocation schema -----------------------------------------------------------------


def test_layerbits_schemes():
    b = LayerBits.of("INT4-G128", 8)
    assert b == LayerBits(4, 8, None, "int4-g128") and b.scheme == "int4-g128"
    assert b.label() == "int4-g128/8" and LayerBits.parse(b.label()) == b
    assert LayerBits.parse("mxfp4") == LayerBits(4, 32, None, "mxfp4")
    assert LayerBits.parse("nvfp4/fp16") == LayerBits.of("nvfp4", 16)
    assert LayerBits.parse("fp8-e4m3").weight_bits == 8
    # the legacy names keep their legacy spelling, so equal options compare equal
    assert LayerBits.of("ternary", 4) == LayerBits(2, 4, "ternary")
    assert LayerBits.of("fp16") == LayerBits(16)
    assert LayerBits(4).scheme_name == "int4" and LayerBits(4).format is None
    assert sorted([LayerBits.of("mxfp4"), LayerBits(4), LayerBits(2)]) == [LayerBits(2), LayerBits(4), LayerBits.of("mxfp4")]
    with pytest.raises(BitsearchError, match="stores 4-bit elements, but weight_bits is 8"):
        LayerBits(8, 32, None, "mxfp4")
    with pytest.raises(BitsearchError, match="cannot both be given"):
        LayerBits(2, 32, "ternary", "int2-g32")
    with pytest.raises(BitsearchError, match="group size must be one of"):
        LayerBits.parse("int4-g7")


def test_version_1_file_written_by_the_previous_release_still_loads():
    a = Allocation.load(DATA / "allocation_v1.json")
    assert a["conv1"] == LayerBits(8, 8)
    assert a["layer1.0.conv2"] == LayerBits(2, 4, "ternary")
    assert a["layer1.1.conv2"] == LayerBits(3, 32, "int")
    assert all(b.scheme is None for b in a.layers.values())
    d = a.to_dict()
    assert d["version"] == 2 and Allocation.from_dict(d) == a  # upgraded in memory, written as v2


def test_version_2_round_trip_and_scheme_needs_v2(tmp_path):
    a = Allocation({"fc1": LayerBits.of("int4-g128-asym"), "fc2": LayerBits.of("fp8-e4m3", 8)}, model="m")
    p = tmp_path / "a.json"
    a.save(p)
    d = json.loads(p.read_text())
    assert d["version"] == 2
    assert d["layers"]["fc1"] == {"weight_bits": 4, "activation_bits": 32, "scheme": "int4-g128-asym"}
    assert Allocation.load(p) == a
    d["version"] = 1
    with pytest.raises(BitsearchError, match="'scheme' needs allocation schema version 2"):
        Allocation.from_dict(d)
    d["version"] = 2
    d["layers"]["fc1"] = {"scheme": "mxfp4"}  # weight_bits may be left to the scheme
    assert Allocation.from_dict(d)["fc1"] == LayerBits.of("mxfp4")
    d["layers"]["fc1"] = {"weight_bits": 4, "scheme": 4}
    with pytest.raises(BitsearchError, match="layer 'fc1': scheme must be a string"):
        Allocation.from_dict(d)


# --- applying an allocation of schemes --------------------------------------------------------------------


def _data(n=512, d=128, seed=0):
    """Samples of one input distribution (fixed mixing), drawn with `seed`."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(12345)) / d**0.5
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven scales, as real activations are
    return (torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)) @ (torch.eye(d) + mix)


@pytest.mark.parametrize("scheme", ["int4-g32", "int3-g64-asym", "fp8-e4m3", "mxfp4", "nvfp4"])
def test_apply_allocation_realises_the_scheme_exactly(scheme):
    torch.manual_seed(0)
    model = TwoLinear().eval()
    alloc = Allocation({"fc1": LayerBits.of(scheme), "fc2": LayerBits(8)})
    qm = apply_allocation(model, alloc)
    x = torch.randn(4, 128)
    fmt = parse_scheme(scheme)
    w1 = fmt.fake_quant(model.fc1.weight.detach())
    h = torch.relu(F.linear(x, w1, model.fc1.bias))
    got = quantized_layers(qm)["fc1"](x)
    assert torch.equal(got, F.linear(x, w1, model.fc1.bias))
    assert torch.allclose(qm(x), qm.fc2(h))
    assert isinstance(quantized_layers(qm)["fc1"].weight_quant, SchemeQuantizer)


def test_scheme_quantizer_straight_through_gradient_and_codes():
    q = SchemeQuantizer("int4-g32")
    w = torch.randn(4, 64, requires_grad=True)
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    codes = q.quantize(w.detach())
    assert codes.dtype == torch.int32 and int(codes.abs().max()) == 7
    fp = SchemeQuantizer("mxfp4").quantize(w.detach())
    assert set(fp.abs().flatten().tolist()) <= set(E2M1.values())


def test_scheme_clipping_search_lowers_weight_error():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 0] = 8.0  # an outlier per row stretches the first group's range
    fmt = parse_scheme("int3-g64")
    r = fmt.search_clip(w)
    assert r.shape == (16, 4) and float(r.min()) < 1.0
    err_clip = (fmt.fake_quant(w, r) - w).pow(2).sum()
    assert err_clip < (fmt.fake_quant(w) - w).pow(2).sum()
    assert parse_scheme("mxfp4").search_clip(w) is None  # block-float scales are defined by the block max


# --- GPTQ ------------------------------------------------------------------------------------------------


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = torch.randn(8, 64)
    fmt = parse_scheme("int4")
    q = gptq_format(fmt, w, torch.eye(64), GPTQConfig(damp=0.01))
    assert torch.allclose(q, fmt.fake_quant(w), atol=1e-6)


@pytest.mark.parametrize("scheme", ["int3", "int4-g32", "int3-g64-asym", "nvfp4", "mxfp4"])
def test_gptq_lowers_output_mse_on_held_out_inputs(scheme):
    torch.manual_seed(1)
    d, rows = 128, 32
    w = torch.randn(rows, d)
    x_cal, x_test = _data(1024, d, seed=2), _data(1024, d, seed=3)  # calibration and report data disjoint
    h = x_cal.T @ x_cal / x_cal.shape[0]
    fmt = parse_scheme(scheme)
    q_rtn = fmt.fake_quant(w)
    q_gptq = gptq_format(fmt, w, h)
    mse = lambda q: float((x_test @ (q - w).T).pow(2).mean())  # noqa: E731
    assert mse(q_gptq) < 0.8 * mse(q_rtn), (mse(q_gptq), mse(q_rtn))
    assert q_gptq.shape == w.shape and torch.isfinite(q_gptq).all()


def test_gptq_through_apply_allocation():
    torch.manual_seed(0)
    model = TwoLinear().eval()
    x_cal, x_test = _data(512, seed=4), _data(512, seed=5)
    ref = model(x_test)
    errs = {}
    for rounding in ("nearest", "gptq"):
        for bits in (LayerBits.of("int3-g32"), LayerBits(3)):
            cfg = QuantConfig(weight_rounding=rounding, calibration_samples=512)
            alloc = Allocation({"fc1": bits, "fc2": LayerBits(8)})
            qm = apply_allocation(model, alloc, calibration=x_cal, config=cfg)
            with torch.no_grad():
                errs[rounding, bits.label()] = float((qm(x_test) - ref).pow(2).mean())
    for label in ("int3-g32", "W3Afp"):
        assert errs["gptq", label] < errs["nearest", label], errs
    with pytest.raises(BitsearchError, match="calibration data are needed"):
        apply_allocation(model, Allocation.uniform(["fc1", "fc2"], "4"), config=QuantConfig(weight_rounding="gptq"))
    with pytest.raises(BitsearchError, match="unknown weight_rounding"):
        QuantConfig(weight_rounding="awq")


def _gptq_model(bits: str, seed: int) -> nn.Module:
    """TwoLinear, GPTQ-rounded at `bits` in both layers from 256 samples drawn with `seed`."""
    torch.manual_seed(0)
    return apply_allocation(TwoLinear().eval(), Allocation.uniform(["fc1", "fc2"], bits),
                            calibration=_data(256, seed=seed), config=QuantConfig(weight_rounding="gptq"))


def test_gptq_result_gives_way_when_the_weight_changes():
    layer = quantized_layers(_gptq_model("int4-g32", seed=6))["fc1"]
    with torch.no_grad():
        layer.layer.weight.mul_(2.0)
    w = layer.layer.weight.detach()
    assert torch.equal(layer.quantized_weight(), parse_scheme("int4-g32").fake_quant(w))


def test_gptq_rounding_validates_shapes():
    with pytest.raises(BitsearchError, match="do not match"):
        gptq_rounding(torch.randn(4, 8), torch.eye(4), lambda g: (), lambda x, p: x, None)
    with pytest.raises(BitsearchError, match="damping"):
        GPTQConfig(damp=0.0)


# --- sensitivity options carry schemes -------------------------------------------------------------------


def test_sensitivity_options_carry_schemes_and_measured_prices_them():
    from sensitivity.base import SensitivityOptions, compute_sensitivity

    opts = SensitivityOptions(weight_bits=(), schemes=("int4-g32", "mxfp4", "ternary"), samples=32, batch_size=32)
    assert opts.options == [LayerBits.of("int4-g32"), LayerBits.of("mxfp4"), LayerBits(2, 32, "ternary")]
    assert opts.to_dict()["schemes"] == ["int4-g32", "mxfp4", "ternary"]
    torch.manual_seed(0)
    model = TwoLinear().eval()
    x = _data(32, seed=7)
    table = compute_sensitivity(model, x, "measured", opts)
    assert table.options == opts.options
    assert table.values.shape == (2, 3) and (table.values == table.values).all()
    with pytest.raises(BitsearchError, match="prices integer bit-widths only"):
        compute_sensitivity(model, x, "orthogonality", opts)
    with pytest.raises(BitsearchError, match="unknown weight scheme 'int5-fp'"):
        SensitivityOptions(schemes=("int5-fp",))


# --- solvers budget bits per weight over scheme options ----------------------------------------------------


@pytest.mark.parametrize("solver", ["ilp", "knapsack", "exhaustive"])
def test_solvers_respect_a_bpw_budget_over_schemes(solver):
    import itertools

    import numpy as np

    from search import AllocationProblem, solve
    from sensitivity.table import SensitivityTable

    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 128), nn.Linear(128, 64))
    layers = discover_layers(model, torch.randn(2, 256))
    options = [LayerBits.of(s) for s in ("int2-g32", "int3-g64", "int4-g128", "mxfp4", "nvfp4", "fp8-e4m3")]
    rng = np.random.default_rng(0)
    base = np.array([4.0, 2.0, 1.0, 0.9, 0.6, 0.05])  # falls with the bits, as sensitivities do
    values = base[None, :] * rng.uniform(0.5, 2.0, size=(3, 1))
    table = SensitivityTable("test", layers, options, values)
    cm = CostModel(layers)
    problem = AllocationProblem(table, cm, budgets=["bpw=4.3"])
    sol = solve(problem, solver)
    alloc = Allocation({l.name: problem.options[j] for l, j in zip(layers, sol.choice)})
    bpw = cm.cost(alloc).bpw
    assert bpw <= 4.3 + 1e-9 and sol.metrics["bpw"] == pytest.approx(bpw)
    # the best feasible allocation by enumeration
    best = min(
        (sum(values[i, j] for i, j in enumerate(c)), c)
        for c in itertools.product(range(len(options)), repeat=3)
        if cm.cost(Allocation({l.name: options[j] for l, j in zip(layers, c)})).bpw <= 4.3
    )
    got = sum(table.value(l.name, alloc[l.name]) for l in layers)
    assert got == pytest.approx(best[0])


def test_scheme_with_quantized_activations_and_bias_correction_on_a_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(16, 3, 8, 8)
    alloc = Allocation({"0": LayerBits.of("int4-g16", 8), "2": LayerBits.of("mxfp4", 8)})
    qm = apply_allocation(model, alloc, calibration=x, config=QuantConfig(bias_correction=True, weight_clip="mse"))
    layers = quantized_layers(qm)
    assert layers["2"].input_quant.bits == 8 and layers["2"].bias_correction is not None
    assert layers["0"].weight_quant.clip_ratio is not None  # int groups searched a clipping ratio
    with torch.no_grad():
        out, ref = qm(x), model(x)
    assert out.shape == ref.shape and 0 < float((out - ref).pow(2).mean()) < float(ref.pow(2).mean())


def test_gptq_on_a_legacy_integer_layer_keeps_its_grid():
    qm = _gptq_model("4", seed=8)
    wq = quantized_layers(qm)["fc1"].weight_quant
    w = quantized_layers(qm)["fc1"].layer.weight.detach()
    codes = wq.quantize(w)
    assert int(codes.abs().max()) <= 7
    assert torch.allclose(codes.float() * wq.scale[:, None], wq(w), atol=1e-6)  # qweight = codes × scale


def test_measured_sensitivity_with_gptq_rounding():
    from sensitivity.base import SensitivityOptions, compute_sensitivity

    torch.manual_seed(0)
    model = TwoLinear().eval()
    x = _data(64, seed=9)
    tables = {
        r: compute_sensitivity(model, x, "measured", SensitivityOptions(
            weight_bits=(3,), schemes=("int3-g32",), samples=64, batch_size=64,
            quant=QuantConfig(weight_rounding=r, calibration_samples=64)))
        for r in ("nearest", "gptq")
    }
    assert tables["gptq"].settings["quant"]["weight_rounding"] == "gptq"
    # GPTQ lowers the measured damage of the wide first layer at both options (calibration = these inputs)
    assert (tables["gptq"].values[0] < tables["nearest"].values[0]).all()
