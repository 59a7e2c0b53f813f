"""Interaction-aware refinement on token data: per-token KL objective, per-sequence NLL guard, scheme steps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from quant import LayerBits, apply_allocation, default_tie_groups  # noqa: E402
from quant.cost import CostModel  # noqa: E402
from quant.errors import BitsearchError  # noqa: E402
from search import AllocationProblem, Constraints  # noqa: E402
from search.refine import RefineConfig, _scheme_neighbours, refine  # noqa: E402
from sensitivity import SensitivityOptions, compute_sensitivity  # noqa: E402
from zoo.hf import CausalLM  # noqa: E402
from zoo.lm_eval import evaluate_tokens  # noqa: E402
from zoo.tokens import token_dataset  # noqa: E402

SCHEMES = ("int2-g32", "int3-g32", "mxfp4", "int4-g64", "int4-g32")


@pytest.fixture(scope="module")
def lm_problem():
    """A random 2-block Llama (hidden 64, so 64-input layers give int4-g64 = MXFP4 = 4.25 bpw), token roles
    (the tuning windows padded on the right), and a problem over schemes × {A8, float} at bpw ≤ 3.6."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager",
    )
    lm = CausalLM(transformers.LlamaForCausalLM(cfg).eval())
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(8, 16, dtype=torch.int64)
    mask[0, 10:] = 0
    mask[3, 5:] = 0
    tune = token_dataset(torch.randint(0, 32, (8, 16), generator=gen), mask)
    guard = token_dataset(torch.randint(0, 32, (8, 16), generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = compute_sensitivity(lm, tune, "measured",
                                    SensitivityOptions((), (32, 8), samples=8, batch_size=8, schemes=SCHEMES))
    names = [l.name for l in table.layers]
    pins = {"lm_head": LayerBits.of("int4-g32")}
    problem = AllocationProblem(table, CostModel(table.layers), ["bpw<=3.6"],
                                Constraints(ties=default_tie_groups(table.layers), pinned=pins))
    return lm, tune, guard, problem, names


def test_scheme_steps_follow_weight_storage(lm_problem):
    _, _, _, p, names = lm_problem
    q = names.index("model.layers.0.self_attn.q_proj")  # 64 inputs
    g = int(p.var_of_layer[q])
    storage = p.costs["weight_memory"][g]
    idx = {o.label(): k for k, o in enumerate(p.options)}
    assert storage[idx["int4-g64"]] == storage[idx["mxfp4"]]  # 4.25 bpw both: one cost level

    def steps(label):
        return sorted(p.options[k].label() for k in _scheme_neighbours(p, g, idx[label]))

    # one level down, one level up (every option there), the others at the same level, and the activation step
    assert steps("int3-g32") == ["int2-g32", "int3-g32/8", "int4-g64", "mxfp4"]
    assert steps("mxfp4") == ["int3-g32", "int4-g32", "int4-g64", "mxfp4/8"]
    assert steps("int2-g32/8") == ["int2-g32", "int3-g32/8"]
    assert steps("int4-g32") == ["int4-g32/8", "int4-g64", "mxfp4"]


def test_refine_on_token_data_lowers_per_token_kl_within_budgets(lm_problem):
    lm, tune, guard, p, names = lm_problem
    start = p.expand(np.array([p.options.index(LayerBits.of("int3-g32")) if not p.allowed[g].sum() == 1
                               else int(np.flatnonzero(p.allowed[g])[0]) for g in range(p.n_vars)]))
    assert p.feasible(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = refine(p, start, lm, tune, tune, guard, settings=RefineConfig(max_passes=40))
    # the objective is the per-token KL over the tuning windows' target tokens (padding left out)
    ref = evaluate_tokens(lm, tune)
    at_start = evaluate_tokens(apply_allocation(lm, p.to_allocation(start), tune), tune, reference_logits=ref.logits)
    assert r.kl_start == pytest.approx(at_start.kl, rel=1e-6)
    refined = apply_allocation(lm, r.allocation, tune)
    assert r.kl_end == pytest.approx(evaluate_tokens(refined, tune, reference_logits=ref.logits).kl, rel=1e-6)
    assert r.steps and r.kl_end < r.kl_start
    # the guard is the per-sequence NLL on the guard windows, and it did not get worse
    assert r.guard_metric == "loss"
    assert r.guard_start == pytest.approx(float(evaluate_tokens(apply_allocation(lm, p.to_allocation(start), tune),
                                                                guard).per_sample_loss.mean()), rel=1e-6)
    assert r.guard_end <= r.guard_start
    # every budget, tie and pin held
    assert p.feasible(r.choice) and r.allocation.metadata.get("refined") is True
    layers = r.allocation.layers
    assert layers["lm_head"] == LayerBits.of("int4-g32")
    for i in range(2):
        assert len({layers[f"model.layers.{i}.self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert len({layers[f"model.layers.{i}.mlp.{x}_proj"] for x in ("gate", "up")}) == 1
    assert all(m["to"] != m["from"] for s in r.steps for m in s["moves"])


def test_refine_refuses_mixed_token_and_float_roles(lm_problem):
    lm, tune, guard, p, _ = lm_problem
    start = p.choice_of(p.to_allocation(p.expand(np.array([int(np.flatnonzero(p.allowed[g])[0])
                                                           for g in range(p.n_vars)]))))
    with pytest.raises(BitsearchError, match="token ids"):
        refine(p, start, lm, tune, tune, (guard.x.float(), None))
