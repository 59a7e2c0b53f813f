"""The cost model against numbers worked out by hand from the CIFAR ResNet-20 architecture.

ResNet-20: conv1 3→16 3×3 on 32×32; three stages of 3 basic blocks (two 3×3 convs each) with 16, 32 and 64
channels on 32×32, 16×16 and 8×8 maps; the first conv of stages 2 and 3 has stride 2 (its input is the
previous stage's map); option-A shortcuts have no weights; linear 64→10 after global average pooling.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.allocation import Allocation, LayerBits
from quant.cost import METRICS, CostModel, CostReport, LatencyTable
from quant.errors import BitsearchError
from quant.layers import discover_layers
from zoo.resnet import cifar_resnet

# --- the architecture, by hand ---------------------------------------------------------------------------
K = 3 * 3  # kernel area

# (name, c_in, c_out, input H=W, output H=W)
CONVS = [("conv1", 3, 16, 32, 32)]
for i in range(3):
    CONVS += [(f"layer1.{i}.conv1", 16, 16, 32, 32), (f"layer1.{i}.conv2", 16, 16, 32, 32)]
CONVS += [("layer2.0.conv1", 16, 32, 32, 16), ("layer2.0.conv2", 32, 32, 16, 16)]
for i in (1, 2):
    CONVS += [(f"layer2.{i}.conv1", 32, 32, 16, 16), (f"layer2.{i}.conv2", 32, 32, 16, 16)]
CONVS += [("layer3.0.conv1", 32, 64, 16, 8), ("layer3.0.conv2", 64, 64, 8, 8)]
for i in (1, 2):
    CONVS += [(f"layer3.{i}.conv1", 64, 64, 8, 8), (f"layer3.{i}.conv2", 64, 64, 8, 8)]

NAMES = [c[0] for c in CONVS] + ["linear"]
PARAMS = {n: cin * cout * K for n, cin, cout, _, _ in CONVS} | {"linear": 64 * 10}
MACS = {n: cin * cout * K * hout * hout for n, cin, cout, _, hout in CONVS} | {"linear": 64 * 10}
INPUT = {n: cin * hin * hin for n, cin, _, hin, _ in CONVS} | {"linear": 64}
CHANNELS = {n: cout for n, _, cout, _, _ in CONVS} | {"linear": 10}

# conv1 + stage 1 (6 × 16·16·9) + stage 2 (16·32·9 + 5 × 32·32·9) + stage 3 (32·64·9 + 5 × 64·64·9) + linear
TOTAL_PARAMS = 432 + 6 * 2304 + (4608 + 5 * 9216) + (18432 + 5 * 36864) + 640
# conv1 on 32×32, stage 1 on 32×32, stage 2 on 16×16, stage 3 on 8×8, linear once
TOTAL_MACS = 432 * 1024 + 6 * 2304 * 1024 + (4608 + 5 * 9216) * 256 + (18432 + 5 * 36864) * 64 + 640
TOTAL_CHANNELS = 16 + 6 * 16 + 6 * 32 + 6 * 64 + 10  # one scale per output channel: 698
N_LAYERS = 1 + 18 + 1


@pytest.fixture(scope="module")
def layers():
    return discover_layers(cifar_resnet(20), torch.zeros(2, 3, 32, 32))


@pytest.fixture(scope="module")
def model(layers):
    return CostModel(layers)


def alloc(default: str, **overrides: str) -> Allocation:
    """An allocation with `default` everywhere and per-layer overrides (dots in names written as __)."""
    layers = {n: LayerBits.parse(default) for n in NAMES}
    for k, v in overrides.items():
        layers[k.replace("__", ".")] = LayerBits.parse(v)
    return Allocation(layers)


# --- the hand numbers themselves ---------------------------------------------------------------------------


def test_hand_numbers_are_the_known_resnet20_totals():
    assert TOTAL_PARAMS == 268_336 == sum(PARAMS.values())
    assert TOTAL_MACS == 40_551_040 == sum(MACS.values())
    assert TOTAL_CHANNELS == 698 == sum(CHANNELS.values())
    assert len(NAMES) == N_LAYERS == 20


def test_discovered_layers_match_the_architecture(layers):
    assert [layer.name for layer in layers] == NAMES
    for layer in layers:
        assert layer.params == PARAMS[layer.name], layer.name
        assert layer.macs == MACS[layer.name], layer.name
        assert layer.input_numel == INPUT[layer.name], layer.name
        assert layer.out_channels == CHANNELS[layer.name], layer.name


def test_metric_names():
    assert METRICS == ("weight_memory", "avg_weight_bits", "bpw", "bops", "peak_activation_memory", "latency")


# --- weight memory -----------------------------------------------------------------------------------------


def test_w8a8_weight_memory_per_channel(model):
    r = model.uniform("8/8")
    assert isinstance(r, CostReport)
    # 268,336 weights × 8 bits + 698 channel scales × 32 bits = 2,146,688 + 22,336
    assert r.weight_memory_bits == 268_336 * 8 + 698 * 32 == 2_169_024
    assert r.weight_memory_bytes == 271_128
    assert r.avg_weight_bits == 8.0  # the scale overhead is not part of the average


def test_w8a8_weight_memory_per_tensor(layers):
    r = CostModel(layers, weight_granularity="per_tensor").uniform("8/8")
    assert r.weight_memory_bits == 268_336 * 8 + 20 * 32 == 2_147_328


def test_scale_bits_option(layers):
    assert CostModel(layers, scale_bits=16).uniform("4/4").weight_memory_bits == 268_336 * 4 + 698 * 16
    assert CostModel(layers, scale_bits=0).uniform("4/4").weight_memory_bits == 268_336 * 4


def test_per_layer_overhead(model):
    r = model.uniform("4/8")
    by = {c.name: c for c in r.layers}
    assert by["conv1"].weight_memory_bits == 432 * 4 + 16 * 32
    assert by["conv1"].scale_overhead_bits == 16 * 32
    assert by["layer3.2.conv2"].weight_memory_bits == 36_864 * 4 + 64 * 32
    assert by["linear"].weight_memory_bits == 640 * 4 + 10 * 32


def test_float_layers_have_no_overhead(model):
    fp32 = model.fp32()
    assert fp32.weight_memory_bits == 268_336 * 32 == 8_586_752
    assert all(c.scale_overhead_bits == 0 for c in fp32.layers)
    assert fp32.avg_weight_bits == 32.0
    fp16 = model.uniform("fp16/fp16")
    assert fp16.weight_memory_bits == 268_336 * 16
    # W4 everywhere but the first and last layer left in float32
    r = model.cost(alloc("4/8", conv1="fp/fp", linear="fp/fp"))
    assert r.weight_memory_bits == (432 + 640) * 32 + (268_336 - 1072) * 4 + (698 - 16 - 10) * 32


def test_binary_is_per_channel_even_per_tensor(layers):
    per_tensor = CostModel(layers, weight_granularity="per_tensor")
    assert per_tensor.uniform("1/8").weight_memory_bits == 268_336 * 1 + 698 * 32
    explicit = Allocation.uniform(NAMES, LayerBits(1, 8, "binary"))
    assert per_tensor.cost(explicit).weight_memory_bits == 268_336 + 698 * 32
    # ternary (a 2-bit slot) follows the granularity like any integer quantizer
    ternary = Allocation.uniform(NAMES, LayerBits(2, 8, "ternary"))
    assert per_tensor.cost(ternary).weight_memory_bits == 268_336 * 2 + 20 * 32
    assert CostModel(layers).cost(ternary).weight_memory_bits == 268_336 * 2 + 698 * 32


def test_avg_bits_of_a_mixed_allocation(model):
    # first and last layer at 8 bits, stage 3 at 2 bits, everything else at 4
    stage3 = [n for n in NAMES if n.startswith("layer3")]
    a = alloc("4/4", conv1="8/8", linear="8/8")
    for n in stage3:
        a.layers[n] = LayerBits(2, 4)
    r = model.cost(a)
    stage3_params = 18_432 + 5 * 36_864  # 202,752
    rest = 268_336 - 432 - 640 - stage3_params  # 64,512
    expected = ((432 + 640) * 8 + stage3_params * 2 + rest * 4) / 268_336
    assert r.avg_weight_bits == pytest.approx(expected, rel=1e-12)
    # 1,072 × 8 + 202,752 × 2 + 64,512 × 4 = 8,576 + 405,504 + 258,048 = 672,128 bits
    assert r.avg_weight_bits == pytest.approx(672_128 / 268_336, rel=1e-12)  # ≈ 2.5048
    assert r.weight_memory_bits == (432 + 640) * 8 + stage3_params * 2 + rest * 4 + 698 * 32


# --- BOPs ---------------------------------------------------------------------------------------------------


def test_bops_uniform(model):
    assert model.uniform("8/8").bops == 40_551_040 * 64 == 2_595_266_560
    assert model.uniform("4/4").bops == 40_551_040 * 16
    assert model.uniform("2/8").bops == 40_551_040 * 16
    # float counts as 32 (or 16): the fp32 baseline is MACs × 32 × 32
    assert model.fp32().bops == 40_551_040 * 1024
    assert model.uniform("4").bops == 40_551_040 * 4 * 32  # weight-only: activations stay float32


def test_bops_mixed(model):
    r = model.cost(alloc("4/4", conv1="8/8", linear="fp/fp"))
    assert r.bops == 442_368 * 8 * 8 + 640 * 32 * 32 + (40_551_040 - 442_368 - 640) * 4 * 4
    by = {c.name: c for c in r.layers}
    assert by["layer2.0.conv1"].bops == 16 * 32 * 9 * 16 * 16 * 16  # stride 2: 16×16 outputs
    assert by["layer2.0.conv1"].macs == 1_179_648


# --- activation memory --------------------------------------------------------------------------------------


def test_per_layer_input_activation_sizes(model):
    r = model.uniform("8/8")
    by = {c.name: c.activation_memory_bits for c in r.layers}
    assert by["conv1"] == 3 * 32 * 32 * 8
    assert by["layer1.0.conv1"] == 16 * 32 * 32 * 8
    assert by["layer2.0.conv1"] == 16 * 32 * 32 * 8  # the stride-2 conv reads the stage-1 map
    assert by["layer2.0.conv2"] == 32 * 16 * 16 * 8
    assert by["layer3.0.conv1"] == 32 * 16 * 16 * 8
    assert by["layer3.1.conv2"] == 64 * 8 * 8 * 8
    assert by["linear"] == 64 * 8
    for name, bits in by.items():
        assert bits == INPUT[name] * 8


def test_peak_activation(model):
    # the largest input is a 16×32×32 map (stage 1 and layer2.0.conv1)
    assert model.uniform("8/8").peak_activation_bits == 16_384 * 8 == 131_072
    assert model.uniform("8/8").peak_activation_bytes == 16_384
    assert model.fp32().peak_activation_bits == 16_384 * 32
    # a float first layer moves the peak: 3×32×32×32 = 98,304 > 16,384×4 = 65,536
    assert model.cost(alloc("4/4", conv1="8/fp")).peak_activation_bits == 98_304
    # ...but not at 8-bit activations elsewhere: 131,072 > 98,304
    assert model.cost(alloc("4/8", conv1="8/fp")).peak_activation_bits == 131_072
    # only the stage-1 layers at 2 bits: the peak is layer2.0.conv1's 16×32×32 input at 4 bits
    a = alloc("4/4")
    for n in NAMES:
        if n.startswith("layer1"):
            a.layers[n] = LayerBits(4, 2)
    assert model.cost(a).peak_activation_bits == 16_384 * 4


# --- allocation checks, constructor, report -----------------------------------------------------------------


def test_allocation_must_fit_the_model(model):
    a = alloc("4/4")
    del a.layers["layer2.1.conv2"]
    with pytest.raises(BitsearchError, match=r"missing layer\(s\) \['layer2.1.conv2'\]"):
        model.cost(a)
    b = alloc("4/4")
    b.layers["fc"] = LayerBits(4, 4)
    with pytest.raises(BitsearchError, match=r"unknown layer\(s\) \['fc'\]"):
        model.cost(b)


def test_cost_accepts_a_plain_mapping(model):
    r = model.cost({n: LayerBits(8, 8) for n in NAMES})
    assert r.weight_memory_bits == 2_169_024


def test_constructor_validation(layers):
    with pytest.raises(BitsearchError, match="weight_granularity"):
        CostModel(layers, weight_granularity="per_group")
    with pytest.raises(BitsearchError, match="scale_bits"):
        CostModel(layers, scale_bits=-1)
    with pytest.raises(BitsearchError, match="at least one layer"):
        CostModel([])
    with pytest.raises(BitsearchError, match="twice"):
        CostModel([layers[0], layers[0]])


def test_unknown_layer_in_layer_metrics(model):
    with pytest.raises(BitsearchError, match="unknown layer 'nope'"):
        model.layer_metrics("nope", LayerBits(4, 4))


def test_report_to_dict_is_json(model):
    r = model.cost(alloc("4/8", conv1="fp/fp"))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["weight_memory_bits"] == r.weight_memory_bits
    assert d["bops"] == r.bops
    assert d["latency_s"] is None
    assert len(d["layers"]) == 20
    assert d["layers"][0]["name"] == "conv1" and d["layers"][0]["label"] == "WfpAfp"
    assert r.metrics() == {
        "weight_memory": r.weight_memory_bits,
        "avg_weight_bits": r.avg_weight_bits,
        "bpw": r.weight_memory_bits / model.total_params,
        "bops": r.bops,
        "peak_activation_memory": r.peak_activation_bits,
        "latency": None,
    }


# --- latency table ------------------------------------------------------------------------------------------

# The seven distinct layer shapes of ResNet-20 and how many layers share each one.
SHAPES = {
    "Conv2d(w=16x3x3x3,in=3x32x32,padding=1)": 1,
    "Conv2d(w=16x16x3x3,in=16x32x32,padding=1)": 6,
    "Conv2d(w=32x16x3x3,in=16x32x32,padding=1,stride=2)": 1,
    "Conv2d(w=32x32x3x3,in=32x16x16,padding=1)": 5,
    "Conv2d(w=64x32x3x3,in=32x16x16,padding=1,stride=2)": 1,
    "Conv2d(w=64x64x3x3,in=64x8x8,padding=1)": 5,
    "Linear(w=10x64,in=64)": 1,
}


def shape_table() -> dict[str, dict[str, float]]:
    # shape i costs (i+1) ms at W8A8 and half that at W4A4; float costs 10 ms per layer
    return {
        key: {"8/8": (i + 1) * 1e-3, "4/4": (i + 1) * 0.5e-3, "fp": 10e-3}
        for i, key in enumerate(SHAPES)
    }


def test_shape_keys_are_the_documented_ones(layers):
    assert {layer.shape_key for layer in layers} == set(SHAPES)


def test_latency_by_shape_key(layers):
    m = CostModel(layers, latency_table=LatencyTable.from_dict(shape_table()))
    counts = list(SHAPES.values())
    expected_88 = sum((i + 1) * 1e-3 * n for i, n in enumerate(counts))  # 1+12+3+20+5+30+7 = 78 ms
    assert m.uniform("8/8").latency_s == pytest.approx(expected_88) == pytest.approx(0.078)
    assert m.uniform("4/4").latency_s == pytest.approx(0.039)
    assert m.fp32().latency_s == pytest.approx(20 * 10e-3)
    assert m.cost(alloc("4/4", conv1="8/8")).latency_s == pytest.approx(0.039 - 0.5e-3 + 1e-3)


def test_latency_name_wins_over_shape_key(layers):
    table = shape_table() | {"layer1.0.conv1": {"8/8": 1.0}}
    m = CostModel(layers, latency_table=table)  # a plain mapping is accepted too
    by = {c.name: c.latency_s for c in m.uniform("8/8").layers}
    assert by["layer1.0.conv1"] == 1.0
    assert by["layer1.0.conv2"] == 2e-3  # same shape, no name entry
    # an option the name entry lacks falls back to the shape key
    assert {c.name: c.latency_s for c in m.uniform("4/4").layers}["layer1.0.conv1"] == 1e-3
    assert m.latency_table.lookup(layers[1], LayerBits(8, 8)) == 1.0


def test_latency_by_name_only(layers):
    table = {n: {"4/8": 1e-4, "8/8": 2e-4} for n in NAMES}
    m = CostModel(layers, latency_table=table)
    assert m.uniform("4/8").latency_s == pytest.approx(20 * 1e-4)
    assert m.has_latency


def test_latency_missing_option(layers):
    m = CostModel(layers, latency_table=shape_table())
    with pytest.raises(BitsearchError) as exc:
        m.uniform("2/4")
    msg = str(exc.value)
    assert "'conv1'" in msg and "2/4" in msg
    assert "4/4" in msg and "8/8" in msg and "fp/fp" in msg  # the options it does have


def test_latency_missing_layer(layers):
    table = shape_table()
    del table["Linear(w=10x64,in=64)"]
    m = CostModel(layers, latency_table=table)
    with pytest.raises(BitsearchError, match="no entry for layer 'linear'"):
        m.uniform("8/8")


def test_no_table_no_latency(model):
    assert model.uniform("8/8").latency_s is None
    assert not model.has_latency
    assert "latency" not in model.layer_metrics("conv1", LayerBits(8, 8))


@pytest.mark.parametrize(
    "row, match",
    [
        ({"8/8": -1e-3}, "non-negative"),
        ({"8/8": float("nan")}, "finite"),
        ({"8/8": float("inf")}, "finite"),
        ({"8/8": "fast"}, "must be a number"),
        ({"8/8": True}, "must be a number"),
        ({"8/8": None}, "must be a number"),
        ({"8/8/8": 1e-3}, "W or W/A"),
        ({"0/8": 1e-3}, "weight_bits"),
        ({"8/1": 1e-3}, "activation_bits"),
        ({"eight": 1e-3}, "W or W/A"),
        ({"4": 1e-3, "4/fp": 2e-3}, "given twice"),
        ({}, "non-empty"),
        ([1e-3], "non-empty object"),
    ],
)
def test_latency_table_bad_values(row, match):
    with pytest.raises(BitsearchError, match=match) as exc:
        LatencyTable.from_dict({"conv1": row})
    assert "conv1" in str(exc.value)


def test_latency_table_bad_shapes():
    with pytest.raises(BitsearchError, match="empty"):
        LatencyTable.from_dict({})
    with pytest.raises(BitsearchError, match="JSON object"):
        LatencyTable.from_dict([["conv1", 1e-3]])  # type: ignore[arg-type]


def test_latency_option_forms():
    # JSON strings ("4" = weight-only, "fp" = float), and in Python also (w, a) tuples and LayerBits
    t = LatencyTable.from_dict(
        {"x": {"4/8": 1.0, "4": 2.0, "fp": 3.0, "fp16/8": 4.0, (2, 4): 5.0, LayerBits(1, 8): 0}}
    )
    expected = {(4, 8): 1.0, (4, 32): 2.0, (32, 32): 3.0, (16, 8): 4.0, (2, 4): 5.0, (1, 8): 0.0}
    assert t.entries["x"] == expected


def test_latency_from_json(tmp_path, layers):
    p = tmp_path / "lat.json"
    p.write_text(json.dumps(shape_table()))
    t = LatencyTable.from_json(p)
    assert CostModel(layers, latency_table=t).uniform("8/8").latency_s == pytest.approx(0.078)
    # to_dict round-trips through from_dict
    assert LatencyTable.from_dict(t.to_dict()).entries == t.entries
    with pytest.raises(BitsearchError, match="not found"):
        LatencyTable.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BitsearchError, match="not valid JSON"):
        LatencyTable.from_json(bad)


# --- option_table -------------------------------------------------------------------------------------------

OPTIONS = [
    LayerBits(1, 8),
    LayerBits(2, 4, "ternary"),
    LayerBits(2, 8),
    LayerBits(4, 4),
    LayerBits(4, 8),
    LayerBits(8, 8),
    LayerBits(4, 32),
    LayerBits(16, 16),
    LayerBits(32, 32),
]


def test_option_table_shape_and_values(model):
    t = model.option_table(OPTIONS)
    assert list(t) == ["weight_memory", "avg_weight_bits", "bpw", "bops", "peak_activation_memory"]
    for arr in t.values():
        assert arr.shape == (20, len(OPTIONS)) and arr.dtype == np.float64
    j = OPTIONS.index(LayerBits(8, 8))
    assert t["weight_memory"][:, j].sum() == 2_169_024
    assert t["avg_weight_bits"][:, j].sum() == pytest.approx(8.0)
    assert t["bops"][:, j].sum() == 40_551_040 * 64
    assert t["peak_activation_memory"][:, j].max() == 131_072
    assert t["weight_memory"][0, OPTIONS.index(LayerBits(32, 32))] == 432 * 32  # float: no scales


def test_option_table_matches_layer_metrics(layers):
    m = CostModel(layers, weight_granularity="per_tensor")
    t = m.option_table(OPTIONS)
    for i, layer in enumerate(layers):
        for j, o in enumerate(OPTIONS):
            lm = m.layer_metrics(layer.name, o)
            for metric, arr in t.items():
                assert arr[i, j] == pytest.approx(lm[metric], rel=1e-12), (layer.name, o, metric)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, len(OPTIONS) - 1), min_size=20, max_size=20), st.booleans())
def test_option_table_consistent_with_cost(layers, choice, per_tensor):
    gran = "per_tensor" if per_tensor else "per_channel"
    m = CostModel(layers, latency_table=_full_table(), weight_granularity=gran)
    t = m.option_table(OPTIONS)
    r = m.cost(Allocation({n: OPTIONS[j] for n, j in zip(NAMES, choice)}))
    rows = np.arange(20)
    cols = np.array(choice)
    assert t["weight_memory"][rows, cols].sum() == r.weight_memory_bits
    assert t["avg_weight_bits"][rows, cols].sum() == pytest.approx(r.avg_weight_bits, rel=1e-12)
    assert t["bops"][rows, cols].sum() == r.bops
    assert t["peak_activation_memory"][rows, cols].max() == r.peak_activation_bits
    assert t["latency"][rows, cols].sum() == pytest.approx(r.latency_s, rel=1e-12)


def _full_table() -> dict[str, dict[str, float]]:
    opts = {f"{o.weight_bits}/{o.activation_bits}" for o in OPTIONS}
    return {
        key: {o: (i + 1) * 1e-4 * (1 + k) for k, o in enumerate(sorted(opts))} for i, key in enumerate(SHAPES)
    }


def test_option_table_metric_selection(layers, model):
    assert list(model.option_table(OPTIONS, metrics=["bops"])) == ["bops"]
    with pytest.raises(BitsearchError, match="latency table"):
        model.option_table(OPTIONS, metrics=["latency"])
    with pytest.raises(BitsearchError, match="unknown metric"):
        model.option_table(OPTIONS, metrics=["energy"])
    with pytest.raises(BitsearchError, match="at least one"):
        model.option_table([])
    m = CostModel(layers, latency_table=_full_table())
    assert list(m.option_table(OPTIONS)) == list(METRICS)
    # a table that lacks an option fails loudly when latency is asked for, not silently
    with pytest.raises(BitsearchError, match="no option 3/3"):
        m.option_table([LayerBits(3, 3)])
    assert "latency" not in m.option_table([LayerBits(3, 3)], metrics=["bops"])


def test_peak_is_max_not_sum(model):
    t = model.option_table([LayerBits(8, 8)])["peak_activation_memory"][:, 0]
    assert t.max() == 131_072
    assert t.sum() == sum(INPUT.values()) * 8
    assert math.isclose(t[0], 3072 * 8)
