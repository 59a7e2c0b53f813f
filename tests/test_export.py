"""ONNX QDQ export checked in ONNX Runtime, and latency tables measured there."""

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from quant import Allocation, BitsearchError, LayerBits, apply_allocation, discover_layers  # noqa: E402
from quant.apply import quantized_layers  # noqa: E402
from quant.cost import CostModel, LatencyTable  # noqa: E402
from quant.export.onnx_qdq import (  # noqa: E402
    ExportConfig,
    check_fidelity,
    container_for,
    dequantized_weights,
    export_onnx,
    ort_supports_int4,
    read_metadata,
)
from zoo import load_digits_splits, load_model  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


def _names(lm):
    return [l.name for l in discover_layers(lm.model, lm.example_input)]


def _mixed(names):
    opts = [LayerBits(8, 8), LayerBits(4, 8), LayerBits(3, 4), LayerBits(32, 32), LayerBits(2, 8)]
    return Allocation({n: opts[i % len(opts)] for i, n in enumerate(names)})


@pytest.mark.parametrize("model", ["zoo:digits-cnn", "zoo:digits-mlp"])
@pytest.mark.parametrize("kind", ["8/8", "4/8", "mixed"])
def test_round_trip_in_onnx_runtime_matches_fake_quant(model, kind, digits):
    lm = load_model(model)
    names = _names(lm)
    alloc = _mixed(names) if kind == "mixed" else Allocation.uniform(names, kind)
    q = apply_allocation(lm.model, alloc, calibration=digits.calibration.x)
    res = export_onnx(q, lm.example_input, allocation=alloc)
    fid = check_fidelity(q, res.model, digits.test.x, digits.test.y)
    assert fid.n == len(digits.test)
    # >= 99.9 % agreement on 360 images means none may differ; accuracy within 0.1 points likewise
    assert fid.agreement >= 0.999
    assert abs(fid.accuracy_torch - fid.accuracy_onnx) <= 0.001
    # the graph really is QDQ: one weight DequantizeLinear per integer layer, Q/DQ on quantized inputs
    ops = [n.op_type for n in res.model.graph.node]
    int_layers = [n for n in names if alloc[n].weight_bits <= 8]
    assert ops.count("QuantizeLinear") == sum(alloc[n].activation_bits <= 8 for n in names)
    assert ops.count("DequantizeLinear") == len(int_layers) + ops.count("QuantizeLinear")
    meta = read_metadata(res.model)
    assert Allocation.from_dict(meta["allocation"]).layers == alloc.layers
    assert [c["name"] for c in meta["containers"]] == names


def test_a_search_realised_allocation_gptq_and_bias_correction_exports_faithfully(digits):
    """A search realises points with its PTQ recipe (GPTQ rounding, MSE clipping, bias correction): the
    exported model must be that model. GPTQ's weights used to be off the grid by float rounding and were lost
    in the export's copy of the model, so this export was refused."""
    import copy

    from quant.apply import search_quant_config

    lm = load_model("zoo:digits-cnn")
    names = _names(lm)
    alloc = _mixed(names)
    q = apply_allocation(lm.model, alloc, calibration=digits.calibration.x, config=search_quant_config({}))
    assert any(l.config.weight_rounding == "gptq" for l in quantized_layers(q).values())
    res = export_onnx(q, lm.example_input, allocation=alloc)
    fid = check_fidelity(q, res.model, digits.test.x, digits.test.y)
    assert fid.agreement >= 0.999
    deq = dequantized_weights(res.model)
    copied = copy.deepcopy(q)  # a copy keeps GPTQ's weights (not the round-to-nearest fallback)
    for name, layer in quantized_layers(q).items():
        if alloc[name].weight_bits > 8:
            continue
        with torch.no_grad():
            ref = layer.quantized_weight().numpy()
            assert np.array_equal(quantized_layers(copied)[name].quantized_weight().numpy(), ref), name
        assert np.array_equal(deq[f"{name}.weight_q"], ref), name


def test_dequantized_weights_equal_fake_quant_weights_bit_for_bit(digits):
    lm = load_model("zoo:digits-cnn")
    names = _names(lm)
    alloc = Allocation({n: b for n, b in zip(names, [LayerBits(8, 8), LayerBits(4, 8), LayerBits(3, 8),
                                                     LayerBits(2, 8, "ternary")])})
    q = apply_allocation(lm.model, alloc, calibration=digits.calibration.x)
    res = export_onnx(q, lm.example_input, config=ExportConfig(int4="always"))
    deq = dequantized_weights(res.model)
    for name, layer in quantized_layers(q).items():
        with torch.no_grad():
            ref = layer.quantized_weight().numpy()
        got = deq[f"{name}.weight_q"]
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(got, ref), name  # exact, not approximately equal


def test_int4_and_int8_containers():
    assert container_for(8, True, int4=True) == "int8"
    assert container_for(4, True, int4=True) == "int4"
    assert container_for(3, True, int4=False) == "int8"
    assert container_for(4, False, int4=True) == "uint4"
    assert container_for(5, False, int4=True) == "uint8"
    with pytest.raises(BitsearchError):
        container_for(9, True, int4=True)
    with pytest.raises(BitsearchError, match="opset 21"):
        ExportConfig(int4="always", opset=17)
    with pytest.raises(BitsearchError, match="int4 must be"):
        ExportConfig(int4="sometimes")


def _onnx_types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


def test_export_chooses_int4_where_the_runtime_runs_it_else_int8_with_a_note(digits):
    from onnx import TensorProto, numpy_helper

    lm = load_model("zoo:digits-cnn")
    names = _names(lm)
    alloc = Allocation({n: b for n, b in zip(names, [LayerBits(8, 8), LayerBits(4, 8), LayerBits(3, 3),
                                                     LayerBits(8, 8)])})
    q = apply_allocation(lm.model, alloc, calibration=digits.calibration.x)

    narrow = export_onnx(q, lm.example_input, config=ExportConfig(int4="never"))
    assert narrow.opset == 17
    by = {l.name: l for l in narrow.layers}
    assert [by[n].weight for n in names] == ["int8"] * 4
    assert any("int8 containers" in n for n in narrow.notes)
    types = _onnx_types(narrow.model)
    w = numpy_helper.to_array(next(t for t in narrow.model.graph.initializer if t.name == "conv3.weight_q"))
    assert types["conv3.weight_q"] == TensorProto.INT8 and np.abs(w).max() <= 3  # 3-bit grid in int8
    assert by["conv3"].activation == "uint8" and by["conv3"].activation_clipped  # Clip narrows to 0..7
    assert by["conv1"].activation_clipped is False
    assert [n.op_type for n in narrow.model.graph.node].count("Clip") == 1

    auto = export_onnx(q, lm.example_input)
    if ort_supports_int4():
        assert auto.opset == 21 and not auto.notes
        types = _onnx_types(auto.model)
        assert types["conv2.weight_q"] == TensorProto.INT4 and types["conv3.weight_q"] == TensorProto.INT4
        assert types["conv1.weight_q"] == TensorProto.INT8
        assert check_fidelity(q, auto.model, digits.test.x).agreement == 1.0
    else:
        assert auto.opset == 17 and any("does not run int4" in n for n in auto.notes)


def test_batchnorm_folding_keeps_the_integers_and_the_predictions(digits):
    from onnx import numpy_helper

    lm = load_model("zoo:digits-cnn")
    names = _names(lm)
    alloc = Allocation.uniform(names, "8/8")
    q = apply_allocation(lm.model, alloc, calibration=digits.calibration.x)
    plain = export_onnx(q, lm.example_input)
    folded = export_onnx(q, lm.example_input, config=ExportConfig(fold_batchnorm=True))
    assert [n.op_type for n in plain.model.graph.node].count("BatchNormalization") == 3
    assert "BatchNormalization" not in [n.op_type for n in folded.model.graph.node]
    assert any("folded into 3" in n for n in folded.notes)
    ints = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    ints_f = {t.name: numpy_helper.to_array(t) for t in folded.model.graph.initializer}
    for i, bn in enumerate((lm.model.bn1, lm.model.bn2, lm.model.bn3), start=1):
        f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        w = f"conv{i}.weight_q"
        assert np.array_equal(np.abs(ints_f[w]), np.abs(ints[w]))  # same integers (sign follows f)
        deq, deq_f = dequantized_weights(plain.model)[w], dequantized_weights(folded.model)[w]
        assert np.allclose(deq_f, deq * f.reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)
    fid = check_fidelity(q, folded.model, digits.test.x, digits.test.y)
    assert fid.agreement >= 0.999 and abs(fid.accuracy_torch - fid.accuracy_onnx) <= 0.001


def test_affine_weights_go_in_unsigned_containers(digits):
    from quant import QuantConfig

    lm = load_model("zoo:digits-mlp")
    cfg = QuantConfig(weight_quantizer="int_asym", activation_quantizer="int_sym")
    q = apply_allocation(lm.model, Allocation.uniform(_names(lm), "8/8"), calibration=digits.calibration.x,
                         config=cfg)
    res = export_onnx(q, lm.example_input)
    assert {l.weight for l in res.layers} == {"uint8"} and {l.activation for l in res.layers} == {"int8"}
    assert all(l.activation_clipped for l in res.layers)  # int_sym grid [-127, 127] in an int8 container
    assert check_fidelity(q, res.model, digits.test.x).agreement >= 0.999
    cfg = QuantConfig(stochastic_rounding=True)
    q = apply_allocation(lm.model, Allocation.uniform(_names(lm), "8/8"), calibration=digits.calibration.x,
                         config=cfg)
    with pytest.raises(BitsearchError, match="deterministic rounding"):
        export_onnx(q, lm.example_input)


class _Odd(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)  # no ONNX form in the TorchScript exporter


class _Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), _Odd())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.fc(x))))


def test_a_model_that_cannot_be_exported_gets_an_error_naming_layer_and_operator():
    torch.manual_seed(0)
    m = _Unexportable().eval()
    x = torch.randn(16, 6)
    alloc = Allocation.uniform(_names_of(m, x), "8/8")
    q = apply_allocation(m, alloc, calibration=x)
    with pytest.raises(BitsearchError) as info:
        export_onnx(q, x[:2])
    msg = str(info.value)
    assert "aten::i0" in msg and "'block.1'" in msg and "cannot be exported" in msg


def _names_of(m, x):
    return [l.name for l in discover_layers(m, x)]


def test_export_refuses_an_unquantized_model():
    with pytest.raises(BitsearchError, match="apply_allocation"):
        export_onnx(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))


def test_profile_on_the_digits_cnn_gives_a_table_the_cost_model_reads(digits):
    from quant.profile import measure_allocations, profile_layers

    lm = load_model("zoo:digits-cnn")
    infos = discover_layers(lm.model, lm.example_input)
    res = profile_layers(lm.model, lm.example_input, ["fp", "8/8", "4/8"], batch_size=2, warmup=1, repeats=3,
                         threads=1)
    table = res.table()
    assert set(table) == {l.name for l in infos}
    assert all(set(row) == {"fp/fp", "8/8", "4/8"} for row in table.values())
    assert all(v >= 0 for row in table.values() for v in row.values())
    assert all(t.p25_s <= t.median_s <= t.p75_s and t.repeats == 3 for row in res.timings.values()
               for t in row.values())
    cost = CostModel(infos, latency_table=LatencyTable.from_dict(json.loads(json.dumps(table))))
    names = [l.name for l in infos]
    rep = cost.cost(Allocation.uniform(names, "8/8"))
    assert rep.latency_s == pytest.approx(sum(row["8/8"] for row in table.values()))
    e2e = measure_allocations(res, lm.model, lm.example_input, {"8/8": Allocation.uniform(names, "8/8")},
                              digits.calibration.x, lm.spec.input_shape)
    assert e2e["8/8"]["measured"]["median_s"] > 0
    assert e2e["8/8"]["predicted_s"] == pytest.approx(rep.latency_s)
    d = res.to_dict()
    assert d["batch_size"] == 2 and d["provider"] == "CPUExecutionProvider" and "8/8" in d["end_to_end"]


def test_profile_rejects_bad_settings():
    from quant.profile import profile_layers

    lm = load_model("zoo:digits-mlp")
    with pytest.raises(BitsearchError, match="repeats"):
        profile_layers(lm.model, lm.example_input, ["8/8"], repeats=0)
    with pytest.raises(BitsearchError, match="unknown layer"):
        profile_layers(lm.model, lm.example_input, ["8/8"], layers=["nope"])
    with pytest.raises(BitsearchError, match="not available"):
        profile_layers(lm.model, lm.example_input, ["8/8"], provider="NoSuchExecutionProvider", repeats=1)


def test_cli_export_and_profile(tmp_path, capsys):
    from service.cli import main

    lm = load_model("zoo:digits-mlp")
    alloc_path = tmp_path / "alloc.json"
    _mixed(_names(lm)).save(alloc_path)
    out, report = tmp_path / "m.onnx", tmp_path / "export.json"
    assert main(["export", "--model", "zoo:digits-mlp", "--allocation", str(alloc_path), "--out", str(out),
                 "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement 100.00 %" in text
    r = json.loads(report.read_text())
    assert r["fidelity"]["agreement"] == 1.0 and out.stat().st_size > 0
    table = tmp_path / "lat.json"
    assert main(["profile", "--model", "zoo:digits-mlp", "--out", str(table), "--bits", "fp", "--bits", "8/8",
                 "--repeats", "3", "--warmup", "1", "--no-end-to-end"]) == 0
    LatencyTable.from_json(table)
    assert main(["export", "--model", "zoo:digits-mlp", "--out", str(out)]) == 2
    assert "either --allocation" in capsys.readouterr().err
    assert main(["profile", "--model", "zoo:digits-mlp", "--out", str(table), "--provider", "gpu"]) == 2
    assert "unknown execution provider" in capsys.readouterr().err


# --- REST -------------------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_key
    from service.settings import Settings
    from tests.helpers import make_sf

    sf = make_sf("sqlite", tmp_path)
    app = create_app(Settings(data_dir=tmp_path / "data"), sf)
    key_a, _ = create_key(sf, "tenant-a")
    key_b, _ = create_key(sf, "tenant-b")
    with TestClient(app) as client:
        yield client, sf, {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}


def test_api_exports_a_point_of_a_search_as_onnx(api):
    import onnx

    from quant.export.onnx_qdq import ort_predict, ort_session
    from service.api.search_job import persist_outcome
    from tests.test_api import SEARCH, fake_outcome

    client, sf, a, b = api
    r = client.post("/search", json=SEARCH, headers=a)
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    assert client.get(f"/searches/{sid}/allocations/0/onnx", headers=a).status_code == 404  # no results yet
    persist_outcome(sf, sid, fake_outcome())
    r = client.get(f"/searches/{sid}/allocations/1/onnx", headers=a)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert "fc1=int" in r.headers["x-bitsearch-containers"]
    model = onnx.load_from_string(r.content)
    stored = client.get(f"/searches/{sid}/allocations/1", headers=a).json()
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key == "bitsearch.allocation"}
    assert meta["bitsearch.allocation"]["layers"] == stored["layers"]
    logits = ort_predict(ort_session(model), load_digits_splits().test.x[:8])
    assert logits.shape == (8, 10)
    assert client.get(f"/searches/{sid}/allocations/1/onnx", headers=b).status_code == 404  # other tenant
    assert client.get(f"/searches/{sid}/allocations/99/onnx", headers=a).status_code == 404
    assert client.get(f"/searches/{sid}/allocations/1/onnx?int4=maybe", headers=a).status_code == 422


def test_api_stores_latency_tables_and_a_search_references_one(api):
    client, sf, a, b = api
    lm = load_model("zoo:digits-mlp")
    table = {n: {"fp": 3e-5, "8/8": 2e-5, "4/8": 1.5e-5} for n in _names(lm)}
    r = client.post("/latency-tables", json={"name": "mlp cpu", "model": "zoo:digits-mlp", "table": table},
                    headers=a)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    assert r.headers["location"].endswith(f"/latency-tables/{tid}") and r.json()["layers"] == len(table)
    got = client.get(f"/latency-tables/{tid}", headers=a).json()
    assert got["table"] == table and got["provider"] == "CPUExecutionProvider"
    assert client.get(f"/latency-tables/{tid}", headers=b).status_code == 404
    listing = client.get("/latency-tables", headers=a).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == tid
    assert client.get("/latency-tables", headers=b).json()["total"] == 0
    bad = client.post("/latency-tables", json={"table": {"fc1": {"9/8": 1.0}}}, headers=a)
    assert bad.status_code == 422 and "'fc1'" in bad.text and "got 9" in bad.text
    assert client.post("/latency-tables", json={"table": {}}, headers=a).status_code == 422

    body = {**_search_body(), "budgets": [{"metric": "latency", "value": 5e-5}], "latency_table_id": tid}
    r = client.post("/search", json=body, headers=a)
    assert r.status_code == 202, r.text
    from db import repo

    view = repo.get_search(sf, _tenant(sf, a), r.json()["id"])
    assert view.search.spec["latency_table"] == table
    r = client.post("/search", json={**body, "latency_table_id": "0" * 32}, headers=a)
    assert r.status_code == 404
    r = client.post("/search", json={**body, "latency_table_id": tid}, headers=b)  # not b's table
    assert r.status_code == 404
    r = client.post("/search", json={**body, "latency_table": table}, headers=a)
    assert r.status_code == 422 and "not both" in r.text


def _search_body():
    from tests.test_api import SEARCH

    return dict(SEARCH)


def _tenant(sf, headers):
    from service.api.auth import authenticate

    return authenticate(sf, headers["Authorization"].split()[1])
