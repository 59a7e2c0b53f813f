"""Transformer models: token data, perplexity/KL, hf: loading, tie groups, sensitivity and search on a tiny Llama."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from quant import Allocation, LayerBits, apply_allocation, default_tie_groups, discover_layers  # noqa: E402
from quant.errors import BitsearchError  # noqa: E402
from zoo import evaluate, load_npz  # noqa: E402
from zoo.hf import CausalLM, load_hf_model  # noqa: E402
from zoo.tokens import IGNORE, PAD, token_dataset  # noqa: E402
from zoo.uploads import load_any_model  # noqa: E402


def tiny_llama(tie: bool = True, vocab: int = 64, hidden: int = 16, layers: int = 1):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


# --- token data -------------------------------------------------------------------------------------------


def test_token_npz_with_mask(tmp_path):
    x = np.array([[1, 2, 3, 4], [5, 6, 0, 0]], dtype=np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.int8)
    np.savez(tmp_path / "t.npz", x=x, attention_mask=mask)
    ds = load_npz(tmp_path / "t.npz")
    assert ds.x.dtype == torch.int64
    assert ds.x.tolist() == [[1, 2, 3, 4], [5, 6, PAD, PAD]]
    assert ds.y.tolist() == [[2, 3, 4], [6, IGNORE, IGNORE]]
    assert len(ds.take(1)) == 1 and ds.take(1).y.shape == (1, 3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.array([[1, 2], [3, 4]]), "attention_mask": np.array([[0, 1], [1, 1]])}, "left"),
        ({"x": np.array([[1, 2], [3, 4]]), "attention_mask": np.array([[1, 1]])}, "must match"),
        ({"x": np.array([[1, 2], [3, 4]]), "attention_mask": np.array([[1, 2], [1, 1]])}, "only hold 0"),
        ({"x": np.array([[1, -2], [3, 4]])}, "negative"),
        ({"x": np.array([[1, 2], [3, 4]]), "y": np.array([0, 1])}, "drop 'y'"),
        ({"x": np.array([[1], [3]])}, "at least one row of 2"),
    ],
)
def test_token_npz_bad_input(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BitsearchError, match=message):
        load_npz(tmp_path / "bad.npz")


class Bigram(nn.Module):
    """Next-token logits from a fixed table: logits(next | prev) = table[prev]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids.clamp(min=0)[:, :-1]].transpose(1, 2)


def test_perplexity_and_kl_hand_checked():
    # Two sequences over a vocabulary of 3; the second is padded after 2 tokens (one target).
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2], [0.5, 0.25, 0.25]])
    ds = token_dataset(np.array([[0, 1, 1, 2], [2, 0, 0, 0]]), np.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    model, ref = Bigram(q.log()), Bigram(p.log())
    ref_res = evaluate(ref, ds)
    res = evaluate(model, ds, reference_logits=ref_res.logits)
    # targets: seq 1: 0->1, 1->1, 1->2; seq 2: 2->0
    nll = -(math.log(0.5) + math.log(0.6) + math.log(0.2) + math.log(0.5)) / 4
    assert res.tokens == 4 and res.top1 is None
    assert res.loss == pytest.approx(nll, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-6)

    def kl(a, b):
        return float((a * (a / b).log()).sum())

    expected_kl = (kl(p[0], q[0]) + kl(p[1], q[1]) + kl(p[1], q[1]) + kl(p[2], q[2])) / 4
    assert res.kl == pytest.approx(expected_kl, rel=1e-6)
    # argmax agreement: rows 0 (0 vs 1: differ), 1, 1 (1 vs 1: agree), 2 (ref ties -> 0; q -> 0: agree)
    assert res.agreement == pytest.approx(75.0)
    assert res.token_accuracy == pytest.approx(75.0)  # q predicts 1,1,1,0; targets 1,1,2,0
    assert res.to_dict()["perplexity"] == res.perplexity
    assert evaluate(ref, ds, reference_logits=ref_res.logits).kl == pytest.approx(0.0, abs=1e-9)


# --- hf: loading -------------------------------------------------------------------------------------------


def test_hf_dir_loads_and_matches_transformers(hf_dir):
    loaded = load_any_model(f"hf:{hf_dir}")
    assert isinstance(loaded.model, CausalLM)
    assert loaded.spec.ref == f"hf:{hf_dir}" and loaded.num_classes == 64
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(input_ids=ids).logits[:, :-1].transpose(1, 2)
        got = loaded.model(ids)
    torch.testing.assert_close(got, want)
    layers = discover_layers(loaded.model, loaded.example_input)
    names = [l.name for l in layers]
    assert names[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert "model.layers.0.mlp.down_proj" in names and names[-1] == "lm_head"
    head = layers[-1]
    assert head.tied_with == ("model.embed_tokens.weight",)  # one tensor, one layer
    assert sum(l.params for l in layers) == sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight")) + 64 * 16


def test_hf_padding_mask_is_used(hf_dir):
    lm = load_hf_model(hf_dir).model
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, PAD, PAD]])
    with torch.no_grad():
        out = lm(ids)
        alone = lm(ids[1:, :2])
    torch.testing.assert_close(out[1:, :, :1], alone)  # real positions unaffected by the padding


def test_hf_pickled_weights_refused_unread(tmp_path):
    d = tmp_path / "m"
    tiny_llama().config.save_pretrained(d)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(BitsearchError, match="pickle"):
        load_any_model(f"hf:{d}")
    assert not marker.exists()


def test_hf_remote_code_refused(tmp_path, hf_dir):
    with pytest.raises(BitsearchError, match="trust_remote_code"):
        load_hf_model(hf_dir, trust_remote_code=True)
    import json
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BitsearchError, match="trust_remote_code"):
        load_any_model(f"hf:{d}")
    del cfg["auto_map"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("raise SystemExit")
    with pytest.raises(BitsearchError, match="Python code"):
        load_any_model(f"hf:{d}")


def test_hf_bad_dirs(tmp_path):
    with pytest.raises(BitsearchError, match="does not exist"):
        load_any_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(BitsearchError, match="config.json"):
        load_any_model(f"hf:{tmp_path}")
    with pytest.raises(BitsearchError, match="carries its own weights"):
        load_any_model(f"hf:{tmp_path}", weights="w.safetensors")


# --- tied weights and tie groups ---------------------------------------------------------------------------


def test_tied_head_quantizes_the_embedding_once():
    lm = CausalLM(tiny_llama(tie=True))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    names = [l.name for l in discover_layers(lm, ids)]
    alloc = Allocation.uniform(names, LayerBits(32, 32))
    alloc.layers["lm_head"] = LayerBits(2, 32)
    q = apply_allocation(lm, alloc)
    seen = {}
    q.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        q(ids)
    wq = q.lm_head.quantized_weight()
    assert not torch.equal(wq, lm.lm_head.weight)
    torch.testing.assert_close(seen["inputs_embeds"], F.embedding(ids, wq))
    # untied: the embedding lookup stays the model's own
    lm2 = CausalLM(tiny_llama(tie=False))
    q2 = apply_allocation(lm2, alloc)
    seen.clear()
    q2.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        q2(ids)
    assert "inputs_embeds" not in seen and "input_ids" in seen


def test_default_tie_groups():
    lm = CausalLM(tiny_llama(layers=2))
    layers = discover_layers(lm, torch.zeros(1, 4, dtype=torch.long))
    groups = default_tie_groups(layers)
    assert groups == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"),
        ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"),
    ]
    from zoo import load_model

    cnn = load_model("zoo:digits-mlp")
    assert default_tie_groups(discover_layers(cnn.model, cnn.example_input)) == []


# --- sensitivity on token data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_and_data():
    lm = CausalLM(tiny_llama(vocab=32, hidden=16, layers=1))
    ids = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(3))
    return lm, token_dataset(ids)


@pytest.mark.parametrize("method", ["fisher", "hessian", "measured", "orthogonality"])
def test_every_sensitivity_method_on_token_data(lm_and_data, method):
    from sensitivity import SensitivityOptions, compute_sensitivity

    lm, ds = lm_and_data
    params = {"max_probes": 4, "min_probes": 2} if method == "hessian" else {}
    opts = SensitivityOptions((2, 8), (32,), samples=8, batch_size=4, params=params)
    table = compute_sensitivity(lm, ds, method, opts)
    assert table.values.shape == (8, 2)
    assert np.isfinite(table.values).all()
    if method != "measured":  # measured increases can be negative at 8 bits
        # 2 bits cost more than 8 (in size: a random model's Hessian trace can be negative)
        assert (np.abs(table.values[:, 0]) > np.abs(table.values[:, 1])).all()
    if method == "hessian":
        check = table.extra["gn_check"]
        assert check["decision"].startswith("hutchinson") and "attention or normalisation" in check["decision"]
        assert table.settings["estimator"] == "hutchinson"
    if method == "measured":
        assert table.settings["metric"] == "loss"  # token data carry their next-token targets
        assert (table.values[:, 0] != 0).all()  # every 2-bit layer changes the loss (random model: either way)


def test_measured_matches_evaluate_on_token_data(lm_and_data):
    """The measured loss increase of one layer equals the difference of per-sequence mean NLLs."""
    from sensitivity import SensitivityOptions, compute_sensitivity
    from zoo.lm_eval import evaluate_tokens

    lm, ds = lm_and_data
    table = compute_sensitivity(lm, ds, "measured", SensitivityOptions((2,), (32,), samples=8, batch_size=4))
    names = [l.name for l in table.layers]
    alloc = Allocation.uniform(names, LayerBits(32, 32))
    alloc.layers[names[3]] = LayerBits(2, 32)
    base = evaluate_tokens(lm, ds).per_sample_loss
    quant = evaluate_tokens(apply_allocation(lm, alloc), ds).per_sample_loss
    assert table.values[3, 0] == pytest.approx(float((quant - base).mean()), rel=1e-4, abs=1e-7)


# --- the zoo model and a search through the pipeline ----------------------------------------------------------


def test_tiny_llama_mini_trains_and_searches():
    import bitsearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bitsearch.search(
            "zoo:tiny-llama-mini", budgets=["avg_weight_bits=4"], pareto=3,
            sensitivity={"method": "fisher", "samples": 16}, options={"weight_bits": [2, 4, 8]},
            calib_size=16, eval_limit=24,
        )
    ref = res.front.reference
    assert ref["perplexity"] is not None and 1.0 < ref["perplexity"] < 256.0  # better than chance (bytes)
    rec = res.recommendation
    assert rec is not None and rec.requested
    layers = rec.allocation.layers
    for i in range(2):  # q/k/v and gate/up take one option by default
        assert len({layers[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert len({layers[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up")}) == 1
    assert rec.point.metrics["avg_weight_bits"] <= 4.0
    assert rec.point.measured["kl"] >= 0.0 and rec.point.measured["perplexity"] > 1.0
    assert rec.report["perplexity"] > 1.0  # scored again on the held-out report data
    # a language model is ranked by per-sequence NLL (log-perplexity) in the paired test, not by top-1
    assert rec.evidence["ranking"] == "loss"
    # the solver's point was refined on the calibration windows (per-token KL), guarded on selection NLL
    assert "skipped" not in res.costs["refine"] and res.costs["refine"]["passes"] > 0


def test_language_model_object_searched_with_schemes_and_bpw():
    """A causal LM given as a Python object with token roles (ids stay integers), weight schemes, a bpw budget."""
    import bitsearch

    lm = CausalLM(tiny_llama(vocab=32, hidden=32, layers=1))
    gen = torch.Generator().manual_seed(0)
    roles = {r: token_dataset(torch.randint(0, 32, (n, 12), generator=gen))
             for r, n in (("calibration", 8), ("selection", 12), ("report", 12))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bitsearch.search(lm, roles=roles, budgets=["bpw<=3.6"], method="measured", solver="ilp", pareto=2,
                               options={"weight_bits": [], "schemes": ["int2-g32", "int4-g32", "mxfp4"]},
                               sensitivity={"method": "measured", "samples": 4})
    rec = res.recommendation
    assert rec is not None and rec.requested and rec.point.metrics["bpw"] <= 3.6
    assert {b.scheme for b in rec.allocation.layers.values()} <= {"int2-g32", "int4-g32", "mxfp4"}
    assert rec.evidence["ranking"] == "loss" and rec.report["perplexity"] > 1.0
    with pytest.raises(BitsearchError, match="token ids"):
        bitsearch.search(lm, roles={r: d.x.float() for r, d in roles.items()}, budgets=["bpw<=3.6"],
                         method="measured", options={"weight_bits": [], "schemes": ["int4-g32"]})


def test_user_ties_override_the_defaults():
    from search import AllocationProblem, Constraints
    from quant.cost import CostModel
    from sensitivity import SensitivityOptions, compute_sensitivity

    lm = CausalLM(tiny_llama(vocab=32, hidden=16, layers=1))
    ds = token_dataset(torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0)))
    table = compute_sensitivity(lm, ds, "orthogonality", SensitivityOptions((2, 8), (32,), samples=4))
    cost = CostModel(table.layers)
    default = AllocationProblem(table, cost, [], Constraints(ties=default_tie_groups(table.layers)))
    none = AllocationProblem(table, cost, [], Constraints.from_dict({"ties": []}))
    assert len(default.groups) == 8 - 2 - 1 and len(none.groups) == 8
    from bitsearch import SearchOptions

    assert SearchOptions().ties is None  # None: the pipeline applies default_tie_groups
    assert SearchOptions(ties=[]).constraints().ties == []
    assert SearchOptions(ties=[["a", "b"]]).constraints().ties == [("a", "b")]


def test_cli_search_on_hf_dir_with_token_npz(hf_dir, tmp_path, capsys):
    import json

    from service.cli import main

    data = tmp_path / "tokens.npz"
    ids = np.random.default_rng(0).integers(0, 64, size=(24, 12), dtype=np.int32)
    np.savez(data, x=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "search.json"
    code = main([
        "search", "--model", f"hf:{hf_dir}", "--data", str(data), "--method", "fisher", "--weight-bits", "2,8",
        "--samples", "8", "--calib-size", "8", "--pareto", "3", "--budget", "avg_weight_bits=5", "--json", str(out),
    ])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "perplexity" in text.out
    result = json.loads(out.read_text())
    tokens = result["front"]["reference"]["tokens"]
    assert tokens > 0 and tokens % 11 == 0  # whole sequences of 12 tokens (11 targets), no padding
    rec = next(r for r in result["recommendations"] if r["requested"])
    points = result["front"]["points"] + result["front"]["uniform"]
    assert points[rec["index"]]["metrics"]["avg_weight_bits"] <= 5.0
    assert result["reference_report"]["perplexity"] > 1.0 and rec["report"]["kl"] >= 0.0
    assert main(["search", "--model", f"hf:{hf_dir}", "--weights", str(data)]) == 2
    assert "carries its own weights" in capsys.readouterr().err


# --- zipped Hugging Face directories (uploads) --------------------------------------------------------------


def zip_dir(folder, extra=None, top="tiny/") -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, top + f.name)
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return buf.getvalue()


def test_hf_zip_upload_roundtrip(hf_dir, tmp_path):
    from zoo.hf_upload import inspect_hf_zip_upload
    from zoo.uploads import sniff_model_format

    path = tmp_path / "m.zip"
    path.write_bytes(zip_dir(hf_dir))
    assert sniff_model_format(path) == "hf-zip"
    info = inspect_hf_zip_upload(path)
    assert info["format"] == "hf-zip" and info["architecture"] == "hf:llama" and info["layer_count"] == 8
    loaded = load_any_model(str(path))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), load_hf_model(hf_dir).model(ids))
    assert load_any_model(str(path)).source == loaded.source  # unpacked once, reused


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tiny/pytorch_model.bin": b"\x80\x04K\x01."}, "pickle"),
        ({"tiny/modeling_x.py": b"import os"}, "Python code"),
        ({"tiny/../evil.json": b"{}"}, "directly in the model folder"),
        ({"tiny/sub/a.safetensors": b"x"}, "directly in the model folder"),
        ({"tiny/notes.exe": b"MZ"}, "not part of a safetensors model directory"),
    ],
)
def test_hf_zip_refusals(hf_dir, tmp_path, extra, message):
    from zoo.hf_upload import unpack_hf_zip

    path = tmp_path / "m.zip"
    path.write_bytes(zip_dir(hf_dir, extra))
    with pytest.raises(BitsearchError, match=message):
        unpack_hf_zip(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_zip_and_token_data_through_the_api(hf_dir, tmp_path):
    import io

    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.auth import create_key
    from service.settings import Settings
    from tests.helpers import make_sf

    settings = Settings(data_dir=tmp_path / "data", max_model_bytes=4 * 1024**2, max_dataset_bytes=1024**2)
    sf = make_sf("sqlite", tmp_path)
    key, _ = create_key(sf, "lm")
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, sf)) as client:
        r = client.post("/models", files={"file": ("tiny.zip", zip_dir(hf_dir))}, headers=h)
        assert r.status_code == 201, r.text
        m = r.json()
        assert m["format"] == "hf-zip" and m["info"]["layer_count"] == 8
        buf = io.BytesIO()
        np.savez(buf, x=np.random.default_rng(0).integers(0, 64, (20, 10)).astype(np.int32))
        r = client.post("/datasets", files={"file": ("tokens.npz", buf.getvalue())}, headers=h)
        assert r.status_code == 201, r.text
        d = r.json()
        assert d["info"]["item_shape"] == [10] and d["info"]["labels"] is True
        r = client.post("/search", json={"model": m["id"], "data": d["id"]}, headers=h)
        assert r.status_code == 202, r.text
        bad = zip_dir(hf_dir, {"tiny/pytorch_model.bin": b"\x80\x04K\x01."})
        r = client.post("/models", files={"file": ("bad.zip", bad)}, headers=h)
        assert r.status_code == 422 and "pickle" in r.json()["detail"], r.text
