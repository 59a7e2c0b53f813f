"""QAT init "ptq": the fake-quant model starts as the search's PTQ realisation (GPTQ weights, their scales,
the calibrated activation ranges, bias correction as a trainable bias), trains, stays on its grid, resumes
bit for bit, and bad settings give clear errors."""

import pytest
import torch

import bitsearch
from quant import Allocation, BitsearchError, LayerBits, QuantConfig, apply_allocation, discover_layers
from quant.apply import quantized_layers, search_quant_config
from quant.qat import CHECKPOINT_NAME, LSQQuantizer, QATRecipe, QATTrainer, finetune
from tests.test_qat import digits, one_thread  # noqa: F401  (one torch thread per test; the digits splits)
from zoo import load_model


@pytest.fixture(scope="module")
def cnn():
    return load_model("zoo:digits-cnn")


def names_of(model, example):
    return [l.name for l in discover_layers(model, example)]


def mixed(names):
    """A mixed W/A allocation: the first and last layers at higher precision, the rest W3A4."""
    bits = {n: LayerBits(3, 4) for n in names}
    bits[names[0]], bits[names[-1]] = LayerBits(4, 8), LayerBits(6, 6)
    return Allocation(bits)


def test_ptq_init_starts_at_the_ptq_model(cnn, digits):
    alloc = mixed(names_of(cnn.model, cnn.example_input))
    cfg = search_quant_config(None, True)
    test = digits.test
    ptq = apply_allocation(cnn.model, alloc, digits.calibration, cfg)
    ptq_round = any(type(l.weight_quant).__name__ == "FixedWeightQuantizer" for l in quantized_layers(ptq).values())
    assert ptq_round, "the search recipe should GPTQ-round the weights"
    trainer = QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, batch_size=32, init="ptq"),
                         calibration=digits.calibration, eval_data=test)
    with torch.no_grad():
        a, b = ptq(test.x), trainer.model.eval()(test.x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(1), b.argmax(1))
    correct = float((a.argmax(1) == test.y).float().mean() * 100)
    assert trainer.evaluate()["top1"] == pytest.approx(correct)
    # The latent weights are the PTQ weights and lie on the LSQ grid the PTQ scales define.
    for name, layer in quantized_layers(trainer.model).items():
        ref = quantized_layers(ptq)[name]
        assert isinstance(layer.weight_quant, LSQQuantizer) and layer.bias_correction is None
        w = layer.layer.weight.detach()
        assert torch.allclose(w, ref.quantized_weight(), atol=1e-6), name
        s = layer.weight_quant.scale.detach().reshape(-1, *([1] * (w.dim() - 1)))
        assert torch.allclose(s.flatten(), ref.weight_quant.scale.flatten()), name
        assert torch.allclose(w / s, (w / s).round(), atol=1e-4), name
    # The default ("calibrated") starts elsewhere: round-to-nearest latents, no bias correction.
    calibrated = QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, batch_size=32),
                            calibration=digits.calibration, eval_data=test)
    with torch.no_grad():
        assert not torch.allclose(calibrated.model.eval()(test.x), a, atol=1e-3)


def test_ptq_init_trains_stays_on_the_grid_and_carries_bias_correction(cnn, digits):
    # digits-cnn's convolutions have no bias: the PTQ bias correction must create one (conv1).
    model = cnn.model
    alloc = Allocation.uniform(names_of(model, cnn.example_input), LayerBits(3, 4))
    ptq = apply_allocation(model, alloc, digits.calibration, search_quant_config(None, True))
    bc = quantized_layers(ptq)["conv1"].bias_correction
    assert bc is not None and model.conv1.bias is None
    # frozen BN: under batch statistics a bias before BN would get no gradient to show that it trains
    recipe = QATRecipe(steps=30, batch_size=32, lr=0.02, init="ptq", seed=1, bn="frozen")
    trainer = QATTrainer(model, alloc, digits.train, recipe, calibration=digits.calibration, eval_data=digits.test)
    conv1 = quantized_layers(trainer.model)["conv1"].layer
    assert isinstance(conv1.bias, torch.nn.Parameter) and torch.allclose(conv1.bias.detach(), bc)
    assert model.conv1.bias is None  # the caller's model is untouched
    # the created bias is trained (an optimizer parameter without weight decay)
    no_decay = trainer.optimizer.param_groups[1]
    assert any(p is conv1.bias for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    start_bias = conv1.bias.detach().clone()
    res = trainer.run()
    assert res.initial_metrics["top1"] > 50
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not torch.equal(conv1.bias.detach(), start_bias)
    for name, layer in quantized_layers(res.model).items():
        q = layer.weight_quant
        wq = layer.quantized_weight().detach()
        s = q.scale.detach().reshape(-1, *([1] * (wq.dim() - 1)))
        codes = wq / s
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert codes.abs().max() <= q.levels()[1] + 1e-4, name


def test_ptq_init_resumes_bit_exactly_with_a_created_bias(cnn, digits, tmp_path):
    model = cnn.model
    alloc = mixed(names_of(model, cnn.example_input))
    recipe = QATRecipe(steps=10, batch_size=32, init="ptq", seed=2)
    full = finetune(model, alloc, digits.train, recipe, calibration=digits.calibration, eval_data=digits.test)

    def stop_at_4(state):
        if state.step == 4:
            state.request_stop()

    first = finetune(model, alloc, digits.train, recipe, callbacks=stop_at_4, calibration=digits.calibration,
                     checkpoint_dir=tmp_path)
    assert first.stopped and (tmp_path / CHECKPOINT_NAME).exists()
    rest = finetune(model, alloc, digits.train, recipe, eval_data=digits.test, resume_from=tmp_path)
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("conv1.layer.bias") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.metrics == rest.metrics


def test_ptq_init_through_the_python_api_and_a_given_quant_config(cnn, digits):
    alloc = Allocation.uniform(names_of(cnn.model, cnn.example_input), LayerBits(4, 4))
    res = bitsearch.finetune(cnn.model, alloc, (digits.train.x, digits.train.y),
                             recipe={"steps": 3, "batch_size": 32, "init": "ptq"})
    assert res.steps == 3 and res.recipe.init == "ptq"
    # A round-to-nearest PTQ recipe without bias correction: the start equals that PTQ model instead.
    cfg = QuantConfig(weight_clip="mse", activation_clip="mse")
    ptq = apply_allocation(cnn.model, alloc, digits.calibration, cfg)
    trainer = QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, init="ptq"),
                         calibration=digits.calibration, quant_config=cfg)
    with torch.no_grad():
        assert torch.allclose(ptq(digits.test.x), trainer.model.eval()(digits.test.x), atol=1e-4, rtol=1e-4)


def test_ptq_init_bad_settings_give_clear_errors(cnn, digits):
    alloc = Allocation.uniform(names_of(cnn.model, cnn.example_input), LayerBits(4, 4))
    with pytest.raises(BitsearchError, match=r"init must be one of \['calibrated', 'paper', 'ptq'\]"):
        QATRecipe.from_dict({"init": "gptq"})
    with pytest.raises(BitsearchError, match="init must be one of"):
        bitsearch.finetune(cnn.model, alloc, (digits.train.x, digits.train.y), recipe={"init": 3})
    with pytest.raises(BitsearchError, match='only used with init "ptq"'):
        QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1), quant_config=QuantConfig())
    with pytest.raises(BitsearchError, match="int_sym"):
        QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, init="ptq"),
                   quant_config=QuantConfig(weight_quantizer="int_asym"))
    with pytest.raises(BitsearchError, match="weight_granularity"):
        QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, init="ptq"),
                   quant_config=QuantConfig(weight_granularity="per_tensor"))
    with pytest.raises(BitsearchError, match="calibration data are empty"):
        QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=1, init="ptq"),
                   calibration=digits.train.x[:0])


def test_ptq_init_through_the_qat_job(cnn):
    from service.finetune import run_finetune

    alloc = Allocation.uniform(names_of(cnn.model, cnn.example_input), LayerBits(4, 4), model="zoo:digits-cnn")
    out = run_finetune({"model": "zoo:digits-cnn", "allocation": alloc.to_dict(),
                        "recipe": {"init": "ptq", "steps": 2, "batch_size": 32}})
    assert out.result["recipe"]["init"] == "ptq" and out.result["steps"] == 2
    assert out.result["initial_metrics"]["top1"] > 50
    with pytest.raises(BitsearchError, match="init must be one of"):
        run_finetune({"model": "zoo:digits-cnn", "allocation": alloc.to_dict(), "recipe": {"init": "gptq"}})


@pytest.mark.parametrize("bn", ["train", "frozen", "reestimate"])
def test_ptq_init_with_every_batchnorm_mode(cnn, digits, bn):
    alloc = Allocation.uniform(names_of(cnn.model, cnn.example_input), LayerBits(3, 4))
    ptq = apply_allocation(cnn.model, alloc, digits.calibration, search_quant_config(None, True))
    with torch.no_grad():
        ptq_top1 = float((ptq(digits.test.x).argmax(1) == digits.test.y).float().mean() * 100)
    recipe = QATRecipe(steps=6, batch_size=32, init="ptq", bn=bn, bn_batches=2)
    res = finetune(cnn.model, alloc, digits.train, recipe, calibration=digits.calibration, eval_data=digits.test)
    # the starting point is evaluated before any step or re-estimation: the PTQ model, whatever the BN mode
    assert res.initial_metrics["top1"] == pytest.approx(ptq_top1)
    assert res.steps == 6 and res.metrics["top1"] > 50
    bns = [m for m in res.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bn == "frozen":  # eval-mode BN during training: the running statistics stay the FP32 model's
        ref = [m for m in cnn.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(bns, ref))
