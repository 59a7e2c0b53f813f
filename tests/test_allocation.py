"""`Allocation` and `LayerBits`: the JSON form, parsing and every validation error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.allocation import (
    FLOAT_BITS,
    INTEGER_BITS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    VALID_BITS,
    Allocation,
    LayerBits,
    is_float_bits,
)
from quant.errors import BitsearchError

# --- strategies ---------------------------------------------------------------------------------------------


@st.composite
def layer_bits(draw) -> LayerBits:
    kind = draw(st.sampled_from(["plain", "int", "ternary", "binary"]))
    a = draw(st.sampled_from([b for b in VALID_BITS if b != 1]))
    if kind == "ternary":
        return LayerBits(2, a, "ternary")
    if kind == "binary":
        return LayerBits(1, a, "binary")
    if kind == "int":
        return LayerBits(draw(st.sampled_from(INTEGER_BITS)), a, "int")
    return LayerBits(draw(st.sampled_from(VALID_BITS)), a)


layer_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=10,
)


@st.composite
def allocations(draw) -> Allocation:
    layers = draw(st.dictionaries(layer_names, layer_bits(), min_size=1, max_size=12))
    model = draw(st.none() | st.text(max_size=20))
    metadata = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    return Allocation(layers, model=model, metadata=metadata)


def valid_dict(**changes):
    d = {
        "schema": SCHEMA_NAME,
        "version": SCHEMA_VERSION,
        "model": "resnet20",
        "layers": {"conv1": {"weight_bits": 8, "activation_bits": 8}, "fc": {"weight_bits": 4}},
        "metadata": {},
    }
    d.update(changes)
    return d


# --- round trip ---------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(allocations(), st.sampled_from([None, 2]))
def test_json_round_trip(a, indent):
    text = a.to_json(indent=indent)
    back = Allocation.from_json(text)
    assert back == a
    assert list(back.layers) == list(a.layers)  # order is kept
    assert back.to_json(indent=indent) == text


@settings(max_examples=30, deadline=None)
@given(allocations())
def test_save_load_round_trip(tmp_path_factory, a):
    p = tmp_path_factory.mktemp("alloc") / "a.json"
    a.save(p)
    assert p.read_text().endswith("\n")
    assert Allocation.load(p) == a


def test_to_dict_shape():
    layers = {"conv1": LayerBits(8, 8), "l.0": LayerBits(2, 4, "ternary")}
    a = Allocation(layers, model="m", metadata={"k": 1})
    assert a.to_dict() == {
        "schema": "bitsearch.allocation",
        "version": 2,
        "model": "m",
        "layers": {
            "conv1": {"weight_bits": 8, "activation_bits": 8},  # no weight_quantizer when it is the default
            "l.0": {"weight_bits": 2, "activation_bits": 4, "weight_quantizer": "ternary"},
        },
        "metadata": {"k": 1},
    }


def test_from_dict_defaults():
    d = valid_dict()
    del d["model"], d["metadata"]
    a = Allocation.from_dict(d)
    assert a.model is None and a.metadata == {}
    assert a["fc"] == LayerBits(4, 32)  # activation_bits defaults to float
    assert Allocation.from_dict(valid_dict(metadata=None)).metadata == {}


def test_unknown_top_level_fields_are_ignored():
    # documented forward-compatibility: only the layer objects are strict
    assert len(Allocation.from_dict(valid_dict(comment="made by hand"))) == 2


# --- LayerBits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, w, a",
    [
        ("4/8", 4, 8),
        ("4", 4, 32),
        ("1/2", 1, 2),
        ("8/8", 8, 8),
        ("fp", 32, 32),
        ("fp/8", 32, 8),
        ("4/fp", 4, 32),
        ("fp32", 32, 32),
        ("float", 32, 32),
        ("fp16", 16, 32),
        ("fp16/fp16", 16, 16),
        ("16/8", 16, 8),
        ("32", 32, 32),
        (" 4 / 8 ", 4, 8),
        ("FP/8", 32, 8),
    ],
)
def test_parse_forms(text, w, a):
    assert LayerBits.parse(text) == LayerBits(w, a)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "W or W/A"),
        ("/", "W or W/A"),
        ("4/", "W or W/A"),
        ("/8", "W or W/A"),
        ("4/8/2", "W or W/A"),
        ("w4a8", "W or W/A"),
        ("4.5", "W or W/A"),
        ("0", "weight_bits"),
        ("9", "weight_bits"),
        ("64", "weight_bits"),
        ("4/12", "activation_bits"),
        ("4/1", "activation_bits must be at least 2"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(BitsearchError, match=match):
        LayerBits.parse(text)


def test_labels():
    assert LayerBits(4, 8).label() == "W4A8"
    assert LayerBits(32, 32).label() == "WfpAfp"
    assert LayerBits(16, 8).label() == "WfpA8"
    assert LayerBits(2, 8, "ternary").label() == "WtA8"
    assert LayerBits(4).label() == "W4Afp"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_bits": 0}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": 4.0}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"weight_bits": "4"}, "weight_bits"),
        ({"weight_bits": 4, "activation_bits": 1}, "at least 2"),
        ({"weight_bits": 4, "activation_bits": 64}, "activation_bits"),
        ({"weight_bits": 4, "activation_bits": None}, "activation_bits"),
        ({"weight_bits": 4, "weight_quantizer": "fp8"}, "weight_quantizer must be one of"),
        ({"weight_bits": 4, "weight_quantizer": "ternary"}, "ternary layer takes weight_bits 2"),
        ({"weight_bits": 1, "weight_quantizer": "ternary"}, "ternary layer takes weight_bits 2"),
        ({"weight_bits": 4, "weight_quantizer": "binary"}, "binary layer takes weight_bits 1"),
        ({"weight_bits": 32, "weight_quantizer": "int"}, "needs integer weight_bits"),
    ],
)
def test_layer_bits_validation(kwargs, match):
    with pytest.raises(BitsearchError, match=match):
        LayerBits(**kwargs)


def test_valid_bits_and_float():
    assert VALID_BITS == (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
    assert all(is_float_bits(b) for b in FLOAT_BITS)
    assert not any(is_float_bits(b) for b in INTEGER_BITS)


def test_layer_bits_sort_with_and_without_quantizer():
    opts = [LayerBits(8, 8), LayerBits(2, 8, "ternary"), LayerBits(2, 8)]
    opts += [LayerBits(1, 8, "binary"), LayerBits(1, 8)]
    assert sorted(opts) == [
        LayerBits(1, 8),
        LayerBits(1, 8, "binary"),
        LayerBits(2, 8),
        LayerBits(2, 8, "ternary"),
        LayerBits(8, 8),
    ]
    assert LayerBits(2, 8) < LayerBits(2, 8, "ternary") <= LayerBits(2, 8, "ternary") < LayerBits(3, 2)
    assert len({LayerBits(4, 8), LayerBits(4, 8), LayerBits(4, 8, "int")}) == 2  # hashable, quantizer counts


# --- Allocation.from_dict / from_json errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"schema": "bitsearch.alloc"}, "not an allocation: 'schema' must be 'bitsearch.allocation'"),
        ({"schema": None}, "not an allocation"),
        ({"version": 3}, "version 3 is not supported"),
        ({"version": 0}, "version 0 is not supported"),
        ({"version": "1"}, "version '1' is not supported"),
        ({"version": None}, "version None is not supported"),
        ({"version": True}, "version True is not supported"),
        ({"version": 1.0}, "version 1.0 is not supported"),
        ({"layers": {}}, "non-empty 'layers'"),
        ({"layers": None}, "non-empty 'layers'"),
        ({"layers": [{"weight_bits": 4}]}, "non-empty 'layers'"),
        ({"layers": {"conv1": 4}}, "layer 'conv1': expected an object"),
        ({"layers": {"conv1": {"activation_bits": 8}}}, "layer 'conv1': weight_bits is required"),
        (
            {"layers": {"conv1": {"weight_bits": 4, "bits": 8}}},
            r"layer 'conv1': unknown field\(s\) \['bits'\]",
        ),
        ({"layers": {"conv1": {"weight_bits": 3.5}}}, "layer 'conv1': weight_bits must be one of"),
        ({"layers": {"conv1": {"weight_bits": 12}}}, "layer 'conv1': weight_bits must be one of"),
        ({"layers": {"conv1": {"weight_bits": "4"}}}, "layer 'conv1': weight_bits must be one of"),
        ({"layers": {"conv1": {"weight_bits": 4, "activation_bits": 1}}}, "layer 'conv1': activation_bits"),
        (
            {"layers": {"conv1": {"weight_bits": 4, "weight_quantizer": "ternary"}}},
            "layer 'conv1': a ternary layer takes weight_bits 2",
        ),
        (
            {"layers": {"conv1": {"weight_bits": 2, "weight_quantizer": "nf4"}}},
            "layer 'conv1': weight_quantizer",
        ),
        ({"metadata": []}, "'metadata' must be an object"),
        ({"metadata": 0}, "'metadata' must be an object"),
        ({"metadata": "note"}, "'metadata' must be an object"),
        ({"model": 20}, "'model' must be a string or null"),
    ],
)
def test_from_dict_errors(changes, match):
    with pytest.raises(BitsearchError, match=match):
        Allocation.from_dict(valid_dict(**changes))


@pytest.mark.parametrize("data", [[], [1, 2], "allocation", 3, None])
def test_from_dict_not_an_object(data):
    with pytest.raises(BitsearchError, match="must be a JSON object"):
        Allocation.from_dict(data)


@pytest.mark.parametrize("text", ["", "not json", "{'schema': 1}", '{"schema": ', "{} trailing"])
def test_from_json_not_json(text):
    with pytest.raises(BitsearchError, match="not valid JSON"):
        Allocation.from_json(text)


def test_from_json_valid_but_not_object():
    with pytest.raises(BitsearchError, match="must be a JSON object"):
        Allocation.from_json("[1, 2]")


def test_from_json_example():
    a = Allocation.from_json(json.dumps(valid_dict()))
    assert a.model == "resnet20"
    assert a["conv1"] == LayerBits(8, 8) and a["fc"] == LayerBits(4, 32)
    assert len(a) == 2


# --- check_layers, uniform ----------------------------------------------------------------------------------


def test_check_layers():
    a = Allocation.uniform(["a", "b", "c"], "4/8")
    a.check_layers(["a", "b", "c"])
    a.check_layers(["c", "a", "b"])  # order does not matter
    with pytest.raises(BitsearchError, match=r"does not fit the model: missing layer\(s\) \['d'\]$"):
        a.check_layers(["a", "b", "c", "d"])
    with pytest.raises(BitsearchError, match=r"does not fit the model: unknown layer\(s\) \['c'\]$"):
        a.check_layers(["a", "b"])
    with pytest.raises(BitsearchError, match=r"missing layer\(s\) \['x'\]; unknown layer\(s\) \['c'\]"):
        a.check_layers(["a", "b", "x"])


def test_check_layers_truncates_long_lists():
    a = Allocation.uniform([f"l{i}" for i in range(3)], "4")
    with pytest.raises(BitsearchError) as exc:
        a.check_layers([f"m{i}" for i in range(8)])
    msg = str(exc.value)
    assert "['m0', 'm1', 'm2', 'm3', 'm4'] …" in msg and "m5" not in msg
    assert "['l0', 'l1', 'l2']" in msg and "l2'] …" not in msg


def test_uniform():
    a = Allocation.uniform(["x", "y"], "4/8", model="tiny")
    assert a.layers == {"x": LayerBits(4, 8), "y": LayerBits(4, 8)}
    assert a.model == "tiny" and a.metadata == {"uniform": "W4A8"}
    b = Allocation.uniform(["x"], LayerBits(2, 4, "ternary"))
    assert b["x"].weight_quantizer == "ternary" and b.metadata == {"uniform": "WtA4"}


# --- files --------------------------------------------------------------------------------------------------


def test_save_and_load(tmp_path):
    a = Allocation({"conv1": LayerBits(32, 32), "layer1.0.conv1": LayerBits(4, 8)}, model="resnet20")
    p = tmp_path / "alloc.json"
    a.save(p)
    assert json.loads(p.read_text())["schema"] == "bitsearch.allocation"
    assert Allocation.load(p) == a
    assert Allocation.load(str(p)) == a


def test_load_errors(tmp_path):
    with pytest.raises(BitsearchError, match="allocation file not found"):
        Allocation.load(tmp_path / "missing.json")
    with pytest.raises(BitsearchError, match="allocation file not found"):
        Allocation.load(tmp_path)  # a directory
    bad = tmp_path / "bad.json"
    bad.write_text("layers: conv1=4")
    with pytest.raises(BitsearchError, match="not valid JSON"):
        Allocation.load(bad)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(BitsearchError, match="not UTF-8"):
        Allocation.load(binary)
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps({"schema": "something.else", "version": 1}))
    with pytest.raises(BitsearchError, match="not an allocation"):
        Allocation.load(wrong)


def test_float_metadata_survives(tmp_path):
    a = Allocation({"x": LayerBits(4, 8)}, metadata={"accuracy": 0.9123456789012345, "tiny": 5e-324})
    p = tmp_path / "a.json"
    a.save(p)
    back = Allocation.load(p)
    assert back.metadata["accuracy"] == 0.9123456789012345
    assert back.metadata["tiny"] == 5e-324
