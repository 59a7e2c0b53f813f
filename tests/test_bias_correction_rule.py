"""Where the search's PTQ recipe applies: bias correction on convolutions and layers that have a bias, never
a bias-less Linear (LLM projections, whose exported formats cannot carry an added bias); GPTQ rounding
everywhere but on a weight that is also an embedding table (a tied output head)."""

import pytest
import torch
from torch import nn

from quant import Allocation, LayerBits, apply_allocation, discover_layers, quantized_layers
from quant.apply import bias_correction_applies, search_quant_config


def test_the_rule():
    assert bias_correction_applies(nn.Conv2d(4, 4, 3, bias=False))  # ONNX writes it as the Conv's bias
    assert bias_correction_applies(nn.Conv1d(4, 4, 3, bias=False))
    assert bias_correction_applies(nn.ConvTranspose2d(4, 4, 3, bias=False))
    assert bias_correction_applies(nn.Linear(4, 4))  # folded into the existing bias
    assert not bias_correction_applies(nn.Linear(4, 4, bias=False))


def test_search_recipe_on_a_conv_net_still_corrects_and_keeps_the_linear_bias_correction():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    x = torch.randn(32, 3, 6, 6) + 1.0
    names = [l.name for l in discover_layers(m, x[:2])]
    q = apply_allocation(m, Allocation.uniform(names, LayerBits(2, 32)), calibration=x,
                         config=search_quant_config({}))
    layers = quantized_layers(q)
    assert layers["0"].bias_correction is not None  # bias-less conv: corrected, as before
    assert layers["3"].bias_correction is not None  # Linear with a bias
    assert layers["5"].bias_correction is None  # bias-less Linear: nothing added


def _tiny_llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    from zoo.hf import CausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tie, attn_implementation="eager")
    return CausalLM(transformers.LlamaForCausalLM(cfg).eval())


def test_a_token_model_gets_no_added_bias_under_the_search_recipe():
    lm = _tiny_llama(tie=False)
    ids = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(1))
    names = [l.name for l in discover_layers(lm, ids[:2])]
    alloc = Allocation.uniform(names, LayerBits.of("int2-g64"))
    recipe = search_quant_config({"weight_clip": "mse"})
    assert recipe.bias_correction and recipe.weight_rounding == "gptq"
    q = apply_allocation(lm, alloc, calibration=ids, config=recipe)
    layers = quantized_layers(q)
    assert set(layers) == set(names) and all(layers[n].layer.bias is None for n in names)
    assert all(layers[n].bias_correction is None for n in names)
    # GPTQ ran (the recipe is what the search deploys) and the model is that of the recipe without correction
    assert all(type(layers[n].weight_quant).__name__ == "FixedWeightQuantizer" for n in names)
    plain = apply_allocation(lm, alloc, calibration=ids, config=search_quant_config(
        {"weight_clip": "mse", "bias_correction": False}))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), plain(ids), rtol=0, atol=0)


def test_a_tied_output_head_is_rounded_to_nearest_under_the_search_recipe():
    lm = _tiny_llama(tie=True)
    ids = torch.randint(0, 32, (8, 12), generator=torch.Generator().manual_seed(1))
    names = [l.name for l in discover_layers(lm, ids[:2])]
    alloc = Allocation.uniform(names, LayerBits.of("int3-g64"))
    q = apply_allocation(lm, alloc, calibration=ids, config=search_quant_config({"weight_clip": "mse"}))
    layers = quantized_layers(q)
    assert layers["lm_head"].weight_tied and not any(layers[n].weight_tied for n in names if n != "lm_head")
    assert type(layers["lm_head"].weight_quant).__name__ != "FixedWeightQuantizer"
    assert type(layers["model.layers.0.mlp.down_proj"].weight_quant).__name__ == "FixedWeightQuantizer"
    # the head's weight is that of round to nearest under the same recipe otherwise
    rtn = apply_allocation(lm, alloc, calibration=ids,
                           config=search_quant_config({"weight_clip": "mse", "weight_rounding": "nearest"}))
    with torch.no_grad():
        w = layers["lm_head"].quantized_weight()
        torch.testing.assert_close(w, quantized_layers(rtn)["lm_head"].quantized_weight(), rtol=0, atol=0)
