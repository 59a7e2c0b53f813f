"""BOMP-NAS: architecture families, weight inheritance, the config's checks and a tiny study on digits."""

from __future__ import annotations

import pytest
import torch

from quant.errors import BitsearchError
from search.solvers import SOLVERS
from search.solvers.bompnas import BompNasConfig, BompNasSettings, bompnas_search, cost_of, front, train_candidate
from zoo.families import FAMILIES, get_family, inherit_weights
from zoo.models import _build, get_model_spec

TINY = dict(train_steps=10, qaft_steps=10, batch_size=32)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp", "cifar-resnet20"])
def test_base_architecture_is_the_zoo_model(name):
    fam = get_family("zoo:" + name)
    base = _build(get_model_spec(name)).eval()
    model = fam.build(fam.base).eval()
    assert set(model.state_dict()) == set(base.state_dict())
    got = inherit_weights(model, base.state_dict())
    assert got.fraction == 1.0 and got.fresh_tensors == 0
    x = torch.randn(3, *get_model_spec(name).input_shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))


def test_smaller_shapes_inherit_leading_slices_and_larger_ones_stay_fresh():
    fam = FAMILIES["digits-cnn"]
    base = _build(get_model_spec("digits-cnn")).state_dict()
    small = fam.build({"width1": 0.5, "width2": 0.25, "width3": 0.5, "depth3": 2})
    got = inherit_weights(small, base)
    torch.testing.assert_close(small.conv2.weight, base["conv2.weight"][:8, :8])
    assert 0.0 < got.fraction < 1.0 and got.fresh_tensors >= 1  # conv4/bn4 do not exist in the base
    resnet = FAMILIES["cifar-resnet20"].build({"width2": 0.5, "depth3": 1})
    assert len(resnet.layer3) == 1 and resnet.layer2[0].conv1.out_channels == 16
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_families_refuse_what_they_cannot_build():
    with pytest.raises(BitsearchError, match="cannot reshape"):
        get_family("zoo:nope")
    fam = FAMILIES["digits-mlp"]
    with pytest.raises(BitsearchError, match="unknown shape parameter"):
        fam.build({"height": 2})
    with pytest.raises(BitsearchError, match="not one of"):
        fam.build({"depth": 7})
    with pytest.raises(BitsearchError, match="not in"):
        fam.restrict({"width": [3.0]})


@pytest.mark.parametrize("bad, match", [
    ({"family": "zoo:cifar-resnet"}, "cannot reshape"),
    ({"weight_bits": [1, 4]}, "weight_bits"),
    ({"budgets": ["latency=1ms"]}, "budgets can be on"),
    ({"init": "magic"}, "init must be"),
    ({"qaft_steps": 0}, "qaft_steps"),
    ({"family": "zoo:cifar-resnet20"}, "no pretrained weights"),
    ({"space": {"width1": [0.3]}}, "not in"),
    ({"colour": "red"}, "unknown bomp-nas setting"),
])
def test_config_refuses_bad_settings(bad, match):
    with pytest.raises(BitsearchError, match=match):
        BompNasConfig.from_dict(bad)


def test_registered_as_a_solver_that_points_to_the_search():
    cls = SOLVERS["bomp-nas"]
    assert cls.capabilities.needs_train and cls.searches_architecture and cls.Config is BompNasSettings
    from search.solvers.base import Solver

    assert issubclass(cls, Solver)


def test_candidate_trains_and_is_costed_on_its_own_shape():
    cfg = BompNasConfig(**TINY)
    arch = {"width1": 0.5, "width2": 0.5, "width3": 0.5, "depth3": 1}
    out = train_candidate(cfg, arch, {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    assert out.measured and 0.0 <= out.score <= 100.0 and out.inherited["fraction"] == 1.0
    # weight memory = sum of params x bits (+ scales): the 8-channel conv1 holds 8*1*9 weights at 8 bits, ...
    w = {"conv1": 8 * 9, "conv2": 16 * 8 * 9, "conv3": 16 * 16 * 9, "fc": 16 * 10}
    bits = {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8}
    assert out.metrics["weight_memory"] >= sum(w[k] * bits[k] for k in w)
    model = get_family("digits-cnn").build(arch)
    assert cost_of(model, torch.randn(2, 1, 8, 8), out.allocation) == out.metrics
    over = train_candidate(BompNasConfig(**TINY, budgets=["weight_memory=100B"]), arch,
                           {"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    assert not over.measured and over.score is None  # costed, never trained


def test_tiny_study_front_carries_architecture_and_respects_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    cfg = BompNasConfig(**TINY, family="zoo:digits-mlp", budgets=["weight_memory=4KB"], weight_bits=[2, 4, 8],
                        space={"width": [0.125, 0.25]})  # every shape fits 4 KB: a front is certain to exist
    pts = bompnas_search(cfg, url, "nas", total_trials=5)
    assert pts, "no measured feasible trial in 5"
    costs = [p.metrics["weight_memory"] for p in pts]
    assert costs == sorted(costs) and all(c <= 4 * 1024 * 8 for c in costs)
    scores = [p.score for p in pts]
    assert scores == sorted(scores)  # a front: dearer points score higher
    fam = get_family("digits-mlp")
    for p in pts:
        model = fam.build(p.arch)
        from quant.layers import discover_layers

        assert [layer.name for layer in discover_layers(model, torch.randn(2, 1, 8, 8))] == list(p.allocation["layers"])
    assert front(url, "nas") == pts  # read back from the database alone
