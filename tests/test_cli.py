"""The command line: readable output, JSON results, clear errors without tracebacks."""

import json

import pytest

from service.cli import main


def test_ptq_on_digits_writes_json(tmp_path, capsys):
    out = tmp_path / "ptq.json"
    code = main(["ptq", "--model", "zoo:digits-mlp", "--bits", "8/8", "--bits", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "W8A8" in text and "FP32" in text
    result = json.loads(out.read_text())
    assert result["model"] == "zoo:digits-mlp"
    fp, (w8, w2) = result["reference"], result["results"]
    assert fp["metrics"]["top1"] >= 95
    assert abs(w8["metrics"]["top1"] - fp["metrics"]["top1"]) <= 1.0
    assert w2["metrics"]["top1"] < w8["metrics"]["top1"]
    assert w2["cost"]["weight_memory_bits"] < w8["cost"]["weight_memory_bits"] < fp["cost"]["weight_memory_bits"]
    assert w8["allocation"]["schema"] == "bitsearch.allocation"


def test_ptq_evaluates_any_allocation_file(tmp_path, capsys):
    from quant import Allocation, LayerBits

    mixed = tmp_path / "mixed.json"
    Allocation({"fc1": LayerBits(2, 32), "fc2": LayerBits(8, 32), "fc3": LayerBits(8, 32)},
               model="zoo:digits-mlp").save(mixed)
    out = tmp_path / "ptq.json"
    assert main(["ptq", "--model", "zoo:digits-mlp", "--allocation", str(mixed), "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]  # only the file: no default uniform bits beside it
    assert r["label"] == "mixed" and r["cost"]["avg_weight_bits"] < 8
    assert {n: b["weight_bits"] for n, b in r["allocation"]["layers"].items()} == {"fc1": 2, "fc2": 8, "fc3": 8}
    wrong = tmp_path / "wrong.json"
    Allocation({"conv1": LayerBits(4, 32)}, model="zoo:digits-mlp").save(wrong)
    assert main(["ptq", "--model", "zoo:digits-mlp", "--allocation", str(wrong)]) == 2
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["ptq", "--model", "zoo:nope"], "unknown zoo model"),
        (["ptq", "--model", "zoo:digits-mlp", "--bits", "9/8"], "weight_bits must be one of"),
        (["ptq", "--model", "zoo:digits-mlp", "--clip", "foo"], "unknown weight_clip"),
        (["ptq", "--model", "zoo:digits-mlp", "--data", "/no/such.npz"], "does not exist"),
        (["ptq", "--model", "zoo:cifar-resnet20"], "give --data"),
    ],
)
def test_user_errors_are_messages_not_tracebacks(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ")
    assert "Traceback" not in err


def test_missing_option_is_a_usage_error(capsys):
    assert main(["ptq"]) == 2
    assert "--model" in capsys.readouterr().err


def test_serve_demo_prints_a_working_key_a_curl_example_and_the_dashboard(tmp_path, capsys):
    from db.session import session_factory
    from service.api.auth import authenticate
    from service.cli import _demo

    sf = session_factory(f"sqlite:///{tmp_path / 'demo.db'}")
    _demo(sf, "0.0.0.0", 8123)
    out = capsys.readouterr().out
    key = next(line for line in out.splitlines() if line.startswith("bsk_"))
    assert authenticate(sf, key) is not None
    assert f"curl -s -X POST http://127.0.0.1:8123/search -H 'Authorization: Bearer {key}'" in out
    assert "dashboard: http://127.0.0.1:8123/" in out
