"""The search's default PTQ recipe: what the spec says, the user's settings over it, none without data."""

from __future__ import annotations

import pytest

from quant.apply import SEARCH_PTQ_DEFAULTS, QuantConfig, search_quant_config
from quant.errors import BitsearchError


def test_the_recipe_is_the_default_and_user_settings_win():
    cfg = search_quant_config({})
    assert cfg.weight_rounding == "gptq" and cfg.weight_clip == "auto"
    assert cfg.activation_clip == "mse" and cfg.bias_correction is True
    assert {k: getattr(cfg, k) for k in SEARCH_PTQ_DEFAULTS} == SEARCH_PTQ_DEFAULTS
    mine = search_quant_config({"weight_rounding": "nearest", "weight_granularity": "per_tensor"})
    assert mine.weight_rounding == "nearest" and mine.weight_granularity == "per_tensor"
    assert mine.weight_clip == "auto"  # the rest of the recipe stays
    assert search_quant_config(None, calibration_available=False) == QuantConfig()  # the recipe needs data
    with pytest.raises(BitsearchError, match="weight_rounding"):
        search_quant_config({"weight_rounding": "stochastic"})


def test_a_search_realises_and_prices_with_the_recipe():
    import bitsearch

    r = bitsearch.search("zoo:digits-mlp", "zoo:digits", budgets=["avg_wbits=3"], method="fisher", pareto=2,
                         calib_size=64, options={"weight_bits": [2, 4]}, refine=False)
    q = r.table.settings["quant"]
    assert {k: q[k] for k in SEARCH_PTQ_DEFAULTS} == SEARCH_PTQ_DEFAULTS  # the table priced GPTQ's error
    plain = bitsearch.search("zoo:digits-mlp", "zoo:digits", budgets=["avg_wbits=3"], method="fisher", pareto=2,
                             calib_size=64, options={"weight_bits": [2, 4]}, refine=False,
                             quant={"weight_rounding": "nearest", "bias_correction": False})
    assert plain.table.settings["quant"]["weight_rounding"] == "nearest"
    assert not (plain.table.values == r.table.values).all()  # another rounding, another price


@pytest.mark.parametrize("method", ["fisher", "hessian"])
def test_weight_error_tables_price_gptq_rounding_even_with_minmax_clipping(method):
    import zoo
    from sensitivity import SensitivityOptions, compute_sensitivity

    loaded = zoo.load_model("zoo:digits-mlp")
    calib = zoo.load_digits_splits().calibration
    tables = {
        r: compute_sensitivity(loaded.model, calib, method, SensitivityOptions(
            weight_bits=(2, 4), samples=64, quant=QuantConfig(weight_rounding=r, calibration_samples=64)))
        for r in ("nearest", "gptq")
    }
    # GPTQ needs the input statistics even when the clipping does not: the table must not fail or fall back
    assert tables["gptq"].settings["quant"]["weight_rounding"] == "gptq"
    assert not (tables["gptq"].values == tables["nearest"].values).all()
