"""LLM-ecosystem exports of an allocation, each read back by its own format's parser."""

from __future__ import annotations

import shlex

import pytest
import torch
from torch import nn

from quant.allocation import Allocation, LayerBits
from quant.errors import BitsearchError
from quant.layers import discover_layers

gguf = pytest.importorskip("gguf")
ct = pytest.importorskip("compressed_tensors.quantization")

from quant.export.llm import (  # noqa: E402
    allocation_from_compressed_tensors,
    compressed_tensors_config,
    hf_quantization_config,
    llama_cpp_tensor_types,
    llmcompressor_recipe,
    parse_llmcompressor_recipe,
)

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NAMES = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ] + ["lm_head"]
SCHEMES = ["int4-g128", "int4-g32", "mxfp4", "nvfp4", "fp8-e4m3", "int8-g32", "int3-g64-asym"]


def llama_alloc() -> Allocation:
    layers = {n: LayerBits.parse(SCHEMES[i % len(SCHEMES)]) for i, n in enumerate(NAMES[:-1])}
    layers["lm_head"] = LayerBits(16)
    return Allocation(layers, model="tiny-llama")


def test_llama_cpp_tensor_types_use_gguf_names_and_types():
    exp = llama_cpp_tensor_types(llama_alloc())
    by_layer = {t.layer: t for t in exp.tensors}
    assert by_layer["model.layers.0.self_attn.q_proj"].tensor == "blk.0.attn_q.weight"
    assert by_layer["model.layers.1.mlp.down_proj"].tensor == "blk.1.ffn_down.weight"
    assert by_layer["lm_head"].tensor == "output.weight" and by_layer["lm_head"].ggml_type == "F16"
    assert by_layer["model.layers.0.self_attn.v_proj"].ggml_type == "MXFP4"
    assert by_layer["model.layers.0.self_attn.v_proj"].exact and by_layer["model.layers.0.self_attn.v_proj"].bpw == 4.25
    assert by_layer["model.layers.0.mlp.up_proj"].ggml_type == "Q8_0" and by_layer["model.layers.0.mlp.up_proj"].exact
    fp8 = by_layer["model.layers.0.mlp.gate_proj"]
    assert fp8.ggml_type == "Q8_0" and not fp8.exact and "no FP8" in fp8.note
    assert by_layer["model.layers.0.self_attn.q_proj"].ggml_type == "Q4_K" and "nearest" in by_layer[
        "model.layers.0.self_attn.q_proj"].note
    # the arguments parse back: every pattern matches exactly its tensor, every type is a GGML type
    args = exp.args()
    assert args.count("--tensor-type") == len(NAMES)
    import re

    gguf_names = [t.tensor for t in exp.tensors]
    for spec, t in zip(args[1::2], exp.tensors):
        pattern, _, tname = spec.rpartition("=")
        assert gguf.GGMLQuantizationType[tname.upper()].name == t.ggml_type
        assert [n for n in gguf_names if re.search(pattern, n)] == [t.tensor]
    argv = shlex.split(exp.command())
    assert argv[0] == "llama-quantize" and argv[-1] == exp.default_type.lower()


def test_llama_cpp_fallback_when_rows_do_not_fit_the_block():
    model = nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 8))
    layers = discover_layers(model, torch.randn(2, 96))
    alloc = Allocation({"0": LayerBits.of("int4-g32"), "1": LayerBits.of("int6-g32")})
    exp = llama_cpp_tensor_types(alloc, layers)
    t0, t1 = exp.tensors
    assert t0.ggml_type == "Q4_0" and "no GGUF tensor name" in t0.note  # 96 % 32 == 0: kept
    assert t1.ggml_type == "Q8_0" and "not a multiple of Q6_K's block 256" in t1.note and not t1.exact
    with pytest.raises(BitsearchError, match="unknown llama.cpp architecture"):
        llama_cpp_tensor_types(alloc, arch="no-such-arch")


def test_compressed_tensors_config_validates_and_reads_back():
    alloc = llama_alloc()
    cfg = compressed_tensors_config(alloc)
    parsed = ct.QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k != "bitsearch_notes"})
    assert parsed.quant_method == "compressed-tensors" and parsed.ignore == ["lm_head"]
    assert len(parsed.config_groups) == len(SCHEMES)
    back = allocation_from_compressed_tensors(cfg, NAMES)
    assert back == {n: (b.scheme or "float") for n, b in alloc.layers.items()}
    nv = next(g for g in parsed.config_groups.values() if "model.layers.0.self_attn.o_proj" in g.targets)
    assert nv.weights.strategy == "tensor_group" and nv.weights.group_size == 16


def test_activation_bits_and_legacy_options_export():
    alloc = Allocation({"a": LayerBits(4, 8), "b": LayerBits.of("ternary"), "c": LayerBits(32)})
    cfg = compressed_tensors_config(alloc)
    g = next(v for v in cfg["config_groups"].values() if v["targets"] == ["a"])
    assert g["weights"]["num_bits"] == 4 and g["weights"]["strategy"] == "channel"
    assert g["input_activations"]["num_bits"] == 8 and g["input_activations"]["dynamic"] is False
    assert any("ternary exported as int2" in n for n in cfg["bitsearch_notes"])
    assert cfg["ignore"] == ["c"]
    with pytest.raises(BitsearchError, match="binary weights have no compressed-tensors form"):
        compressed_tensors_config(Allocation({"a": LayerBits(1)}))
    with pytest.raises(BitsearchError, match="nothing to export"):
        compressed_tensors_config(Allocation({"a": LayerBits(32)}))


def test_llmcompressor_recipe_round_trip():
    alloc = llama_alloc()
    text = llmcompressor_recipe(alloc)
    back = parse_llmcompressor_recipe(text)
    assert back["ignore"] == ["lm_head"]
    targets = sorted(t for g in back["config_groups"].values() for t in g.targets)
    assert targets == sorted(NAMES[:-1])
    with pytest.raises(BitsearchError, match="not an llm-compressor quantization recipe"):
        parse_llmcompressor_recipe("quant_stage: {}\n")


def test_hf_quantization_config_loads_in_transformers():
    tq = pytest.importorskip("transformers.utils.quantization_config")
    d = hf_quantization_config(llama_alloc())
    cfg = tq.CompressedTensorsConfig.from_dict(d)
    assert cfg.quant_method == "compressed-tensors"
    out = cfg.to_dict()
    assert set(out["config_groups"]) == set(d["config_groups"])
