"""QAT: learnable quantizers against hand-derived values, Bin Regularization, the recipe, and the trainer
(checkpoint/resume bit-exactness, stop requests, the bit-width hook, a short W4A4 fine-tune)."""

import json
import math

import pytest
import torch

from quant import Allocation, BitsearchError, LayerBits, QuantConfig, apply_allocation, discover_layers
from quant.apply import quantized_layers
from quant.qat import (
    CHECKPOINT_NAME,
    DoReFaQuantizer,
    LSQQuantizer,
    PACTQuantizer,
    QATRecipe,
    QATTrainer,
    bin_regularization,
    binreg_loss,
    finetune,
    grad_scale,
    strip_quantizers,
)
from quant.quantizers import make_quantizer
from zoo import evaluate, load_digits_splits, load_model


@pytest.fixture(autouse=True)
def one_thread():
    # Determinism and speed on a shared machine: the bit-exact resume test compares two runs in one process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits()


@pytest.fixture(scope="module")
def mlp():
    return load_model("zoo:digits-mlp")


@pytest.fixture(scope="module")
def cnn():
    return load_model("zoo:digits-cnn")


def uniform(loaded, bits):
    names = [l.name for l in discover_layers(loaded.model, loaded.example_input)]
    return Allocation.uniform(names, bits)


# --- LSQ ------------------------------------------------------------------------------------------------------


def test_lsq_unsigned_activation_forward_and_gradients():
    q = LSQQuantizer(2, signed=False, kind="activation")  # levels 0..3, Q_P = 3
    q.set_range(torch.tensor(0.0), torch.tensor(1.5))  # s = 1.5 / 3 = 0.5
    assert float(q.scale.detach()) == pytest.approx(0.5)
    x = torch.tensor([[0.1, 0.74, 2.0, 3.9]], requires_grad=True)  # one sample of 4 features: N = 4
    y = q(x)
    # x/s = 0.2, 1.48, 4.0, 7.8 -> clamp to [0, 3] -> round 0, 1, 3, 3 -> times s
    assert torch.allclose(y, torch.tensor([[0.0, 0.5, 1.5, 1.5]]))
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y.backward(up)
    # dy/dx: 1 inside the range, 0 above it
    assert torch.equal(x.grad, torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    # dy/ds: round(v) - v inside (-0.2, -0.48), Q_P above (3, 3); times g = 1/sqrt(N Q_P) = 1/sqrt(12)
    expected = (1 * -0.2 + 2 * -0.48 + 3 * 3 + 4 * 3) / math.sqrt(12)
    assert float(q.scale.grad) == pytest.approx(expected, rel=1e-5)


def test_lsq_signed_per_channel_weight_forward_and_gradients():
    q = LSQQuantizer(3, per_channel=True, kind="weight", channels=2)  # narrow grid -3..3, Q_P = 3
    assert q.levels() == (-3, 3)
    with torch.no_grad():
        q.scale.copy_(torch.tensor([0.2, 0.1]))
    q.calibrated = True
    w = torch.tensor([[0.31, -0.9], [0.06, 0.4]], requires_grad=True)  # N = 2 weights per channel
    y = q(w)
    # row 0: v = 1.55, -4.5 -> 2, -3 -> 0.4, -0.6; row 1: v = 0.6, 4 -> 1, 3 -> 0.1, 0.3
    assert torch.allclose(y, torch.tensor([[0.4, -0.6], [0.1, 0.3]]))
    y.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    g = 1 / math.sqrt(2 * 3)
    # row 0: (2 - 1.55) + (-Q_N = -3); row 1: (1 - 0.6) + Q_P = 3
    assert torch.allclose(q.scale.grad, torch.tensor([(0.45 - 3) * g, (0.4 + 3) * g]), atol=1e-5)
    # the integer grid the forward dequantizes
    assert torch.equal(q.quantize(w.detach()), torch.tensor([[2, -3], [1, 3]], dtype=torch.int32))


def test_lsq_asymmetric_offset_forward_and_gradients():
    q = LSQQuantizer(2, kind="activation", asymmetric=True)  # LSQ+: levels 0..3 over [beta, beta + 3 s]
    assert q.levels() == (0, 3) and not q.signed
    q.set_range(torch.tensor(-0.5), torch.tensor(1.0))  # s = 1.5 / 3 = 0.5, beta = -0.5
    assert float(q.scale.detach()) == pytest.approx(0.5) and float(q.offset.detach()) == pytest.approx(-0.5)
    x = torch.tensor([[-1.0, -0.3, 0.6, 1.4]], requires_grad=True)
    y = q(x)
    # (x - beta)/s = -1, 0.4, 2.2, 3.8 -> clamp 0, 0.4, 2.2, 3 -> round 0, 0, 2, 3 -> q s + beta
    assert torch.allclose(y, torch.tensor([[-0.5, -0.5, 0.5, 1.0]]))
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert torch.equal(x.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0]]))
    g = 1 / math.sqrt(4 * 3)
    # d/dbeta = 1 outside the range, 0 inside; d/ds: round(v) - v inside, 0 below (Q_N = 0), Q_P above
    assert float(q.offset.grad) == pytest.approx((1 + 4) * g, rel=1e-5)
    assert float(q.scale.grad) == pytest.approx((2 * -0.4 + 3 * -0.2 + 4 * 3) * g, rel=1e-5)
    assert torch.equal(q.quantize(x.detach()), torch.tensor([[0, 0, 2, 3]], dtype=torch.int32))


def test_lsq_paper_init_grad_scale_and_bit_change():
    q = LSQQuantizer(4, signed=True, kind="weight")  # Q_P = 7
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    q.init_from_tensor(x)
    assert float(q.scale.detach()) == pytest.approx(2 * 2.5 / math.sqrt(7))
    q.change_bits(3)  # same clipping range: s * 7 / 3
    assert float(q.scale.detach()) == pytest.approx(2 * 2.5 / math.sqrt(7) * 7 / 3)
    t = torch.tensor(2.0, requires_grad=True)
    out = grad_scale(t, 0.25)
    assert float(out.detach()) == 2.0
    (out * 3).backward()
    assert float(t.grad) == pytest.approx(0.75)
    assert isinstance(make_quantizer("lsq", 4, signed=False, kind="activation"), LSQQuantizer)


# --- PACT -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_pact_forward_and_gradients(residual):
    q = PACTQuantizer(2, alpha=1.5, residual_grad=residual)  # n = 3 levels above 0, step 0.5
    x = torch.tensor([-1.0, 0.2, 0.8, 2.0], requires_grad=True)
    y = q(x)
    # clamp to [0, 1.5]: 0, 0.2, 0.8, 1.5 -> /0.5 = 0, 0.4, 1.6, 3 -> round 0, 0, 2, 3 -> * 0.5
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1.0, 1.5]))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # dy/dx = 1 on [0, alpha), 0 below 0 and at/above alpha
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0]))
    # dy/dalpha = 1 where x >= alpha (the paper); the residual variant adds (round(v) - v)/n inside
    expected = 4.0 + ((2 * (0 - 0.4) + 3 * (2 - 1.6)) / 3 if residual else 0.0)
    assert float(q.alpha.grad) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(q.quantize(x.detach()), torch.tensor([0, 0, 2, 3], dtype=torch.int32))


# --- DoReFa ---------------------------------------------------------------------------------------------------


def test_dorefa_forward_and_gradients():
    q = DoReFaQuantizer(2)  # k = 2: levels {-1, -1/3, 1/3, 1} * max|w|
    vals = [0.5, -0.25, 0.1, -1.0]
    w = torch.tensor(vals, requires_grad=True)
    y = q(w)
    t = [math.tanh(v) for v in vals]
    big = max(abs(a) for a in t)  # tanh(1), at index 3
    r = [a / (2 * big) + 0.5 for a in t]
    qk = [round(3 * a) / 3 for a in r]
    m = 1.0  # max|w|
    want = [(2 * a - 1) * m for a in qk]
    assert want == pytest.approx([1 / 3, -1 / 3, 1 / 3, -1.0])
    assert torch.allclose(y, torch.tensor(want, dtype=torch.float32), atol=1e-6)
    up = [1.0, 2.0, 3.0, 4.0]
    y.backward(torch.tensor(up))
    # STE through round: d out / d r = 2m; r_i = t_i/(2M) + 1/2 with M = |t_3| = -t_3
    grad = [2 * m * up[i] * (1 - t[i] ** 2) / (2 * big) for i in range(4)]
    dM_dw3 = -(1 - t[3] ** 2)  # M = -tanh(w_3)
    grad[3] += 2 * m * sum(up[k] * (-t[k] / (2 * big**2)) for k in range(4)) * dM_dw3
    assert torch.allclose(w.grad, torch.tensor(grad, dtype=torch.float32), atol=1e-5)
    assert torch.equal(q.quantize(w.detach()), torch.tensor([2, 1, 2, 0], dtype=torch.int32))


# --- Bin Regularization ---------------------------------------------------------------------------------------


def test_bin_regularization_on_a_known_tensor():
    v = torch.tensor([-1.2, -0.9, 0.1, 0.3, 2.0], requires_grad=True)
    loss = bin_regularization(v, -1, 1)
    # bin -1: {-1.2, -0.9} mean -1.05 -> 0.0025 + var 0.0225; bin 0: {0.1, 0.3} mean 0.2 -> 0.04 + 0.01;
    # bin 1: {2.0} (beyond the grid, clipped into the end bin) -> (2 - 1)^2 + 0. Mean over 3 non-empty bins.
    assert float(loss.detach()) == pytest.approx((0.025 + 0.05 + 1.0) / 3, rel=1e-5)
    loss.backward()
    # d/dv_i = 2 (v_i - q_bin) / |bin|, over 3 bins
    want = torch.tensor([-0.2, 0.1, 0.1, 0.3, 2.0]) / 3
    assert torch.allclose(v.grad, want, atol=1e-6)


def test_binreg_loss_reads_the_weight_grid_of_a_model(mlp, digits):
    alloc = uniform(mlp, "2/32")
    trainer = QATTrainer(mlp.model, alloc, digits.train, QATRecipe(steps=1), calibration=digits.calibration)
    layers = quantized_layers(trainer.model)
    manual = []
    for layer in layers.values():
        q = layer.weight_quant
        v = layer.layer.weight / q.scale.detach()[:, None]
        manual.append(bin_regularization(v, -1, 1))
    assert float(binreg_loss(trainer.model).detach()) == pytest.approx(float(torch.stack(manual).mean().detach()), rel=1e-6)


# --- recipe ---------------------------------------------------------------------------------------------------


def test_recipe_json_round_trip_and_validation():
    r = QATRecipe(
        weight_quantizer="dorefa", activation_quantizer="pact", optimizer="adamw", lr=3e-4, steps=None,
        epochs=2.5, distill=True, distill_temperature=2.0, bn="reestimate", binreg_lambda=0.1, binreg_start=5,
        warmup_steps=3, checkpoint_every=7, device="cpu",
    )
    text = json.dumps(r.to_dict())
    assert QATRecipe.from_dict(json.loads(text)) == r
    assert QATRecipe.from_dict({"epochs": 1}).steps is None
    assert r.total_steps(1000) == math.ceil(2.5 * (1000 // 128))
    bad = [
        {"nope": 1},
        {"optimizer": "rmsprop"},
        {"weight_quantizer": "pact"},
        {"lr": -1.0},
        {"lr": 0},
        {"steps": 0},
        {"steps": True},
        {"steps": 10, "epochs": 1.0},
        {"momentum": 1.0},
        {"distill": 1},
        {"distill_alpha": 1.5},
        {"bn": "moving"},
        {"activation_clip": "output_mse"},
        {"batch_size": 2.0},
        {"lr": float("nan")},
    ]
    for d in bad:
        with pytest.raises(BitsearchError):
            QATRecipe.from_dict(d)
    with pytest.raises(BitsearchError):
        QATRecipe.from_dict(["steps", 1])


# --- trainer --------------------------------------------------------------------------------------------------


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_exact(cnn, digits, tmp_path):
    recipe = QATRecipe(steps=20, batch_size=32, lr=0.02, checkpoint_every=10, distill=True, seed=3,
                       bn="reestimate", bn_batches=2, eval_every=5, warmup_steps=4)
    alloc = uniform(cnn, "4/4")
    test = digits.test.take(64)
    full = finetune(cnn.model, alloc, digits.train, recipe, calibration=digits.calibration, eval_data=test,
                    checkpoint_dir=tmp_path / "a")

    def stop_at_10(state):
        if state.step == 10:
            state.request_stop()

    first = finetune(cnn.model, alloc, digits.train, recipe, callbacks=stop_at_10, calibration=digits.calibration,
                     eval_data=test, checkpoint_dir=tmp_path / "b")
    assert first.stopped and first.steps == 10
    ck = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert ck["step"] == 10
    rest = finetune(cnn.model, alloc, digits.train, recipe, eval_data=test, checkpoint_dir=tmp_path / "b",
                    resume_from=tmp_path / "b")
    assert rest.steps == 20 and not rest.stopped
    a, b = _weights(full.model), _weights(rest.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history if "loss" in h] == [h["loss"] for h in rest.history if "loss" in h]
    assert full.metrics == rest.metrics and rest.initial_metrics == full.initial_metrics
    # the original model is untouched and a changed recipe cannot resume
    with pytest.raises(BitsearchError, match="lr"):
        QATTrainer(cnn.model, alloc, digits.train, QATRecipe(steps=20, batch_size=32, lr=0.1),
                   resume_from=tmp_path / "b")


def test_stop_request_ends_training_cleanly(mlp, digits):
    seen = []

    class Stopper:
        def on_step(self, state):
            seen.append((state.step, state.progress))
            if state.step == 3:
                state.request_stop()

        def on_end(self, result):
            seen.append(("end", result.steps))

    r = finetune(mlp.model, uniform(mlp, "4/4"), digits.train, QATRecipe(steps=50, batch_size=32),
                 callbacks=[Stopper()], calibration=digits.calibration, eval_data=digits.test)
    assert r.stopped and r.steps == 3
    assert seen == [(1, 0.02), (2, 0.04), (3, 0.06), ("end", 3)]
    assert r.metrics["top1"] > 80 and not r.model.training
    assert r.checkpoint is None


def test_bit_width_hook_rescales_steps_and_keeps_training(mlp, digits):
    alloc = uniform(mlp, "4/4")
    new = Allocation({**alloc.layers, "fc2": LayerBits(3, 4), "fc3": LayerBits(32, 32)})
    before = {}

    def hook(state):
        if state.step == 2:
            before["s"] = float(quantized_layers(state.model)["fc2"].weight_quant.scale.detach()[0])
            return new
        return None

    r = finetune(mlp.model, alloc, digits.train, QATRecipe(steps=4, batch_size=32, lr=1e-9, quantizer_lr=0.0),
                 callbacks=hook, calibration=digits.calibration)
    layers = quantized_layers(r.model)
    assert r.allocation.layers["fc2"] == LayerBits(3, 4) and layers["fc2"].bits == LayerBits(3, 4)
    assert float(layers["fc2"].weight_quant.scale.detach()[0]) == pytest.approx(before["s"] * 7 / 3, rel=1e-6)
    assert layers["fc3"].weight_quant.name == "float" and layers["fc3"].input_quant.name == "float"
    assert r.steps == 4
    # and back to integer from float: activations are re-initialised from a calibration pass
    trainer = QATTrainer(mlp.model, new, digits.train, QATRecipe(steps=2, batch_size=32),
                         calibration=digits.calibration)
    trainer.set_allocation(alloc)
    assert quantized_layers(trainer.model)["fc3"].input_quant.name == "lsq"
    assert trainer.run().steps == 2


def test_other_quantizers_and_binreg_train(mlp, digits):
    recipe = QATRecipe(weight_quantizer="dorefa", activation_quantizer="pact", steps=6, batch_size=32,
                       binreg_lambda=0.05, binreg_start=3, pact_l2=1e-4, optimizer="adamw", lr=1e-3,
                       bn="reestimate")
    r = finetune(mlp.model, uniform(mlp, "3/4"), digits.train, recipe, calibration=digits.calibration,
                 eval_data=digits.test)
    layers = quantized_layers(r.model)
    assert layers["fc2"].input_quant.name == "pact"  # after a ReLU
    assert layers["fc1"].input_quant.name == "lsq" and layers["fc1"].input_quant.asymmetric  # signed input
    assert r.metrics["top1"] > 50


def test_short_qat_w4a4_digits_mlp(mlp, digits):
    alloc = uniform(mlp, "4/4")
    ptq = evaluate(apply_allocation(mlp.model, alloc, digits.calibration, QuantConfig()), digits.test).top1
    r = finetune(mlp.model, alloc, digits.train, QATRecipe(steps=60, batch_size=64, lr=0.01),
                 calibration=digits.calibration, eval_data=digits.test)
    assert r.metrics["top1"] >= 90 or r.metrics["top1"] > ptq
    assert r.metrics["top1"] >= ptq - 1.0


def test_resume_after_a_bit_width_change(mlp, digits, tmp_path):
    alloc = uniform(mlp, "4/4")
    new = Allocation({**alloc.layers, "fc2": LayerBits(3, 4), "fc3": LayerBits(32, 32)})
    recipe = QATRecipe(steps=10, batch_size=32, optimizer="adamw", lr=1e-3, checkpoint_every=5)

    def hook(state):
        if state.step == 3:
            return new
        if state.step == 5 and state.trainer.checkpoint_dir.name == "b":
            state.request_stop()
        return None

    full = finetune(mlp.model, alloc, digits.train, recipe, callbacks=hook, calibration=digits.calibration,
                    checkpoint_dir=tmp_path / "a")
    first = finetune(mlp.model, alloc, digits.train, recipe, callbacks=hook, calibration=digits.calibration,
                     checkpoint_dir=tmp_path / "b")
    assert first.steps == 5 and first.allocation.layers["fc3"] == LayerBits(32, 32)
    rest = finetune(mlp.model, alloc, digits.train, recipe, resume_from=tmp_path / "b" / CHECKPOINT_NAME)
    assert rest.allocation.to_dict() == full.allocation.to_dict() == new.to_dict()
    a, b = _weights(full.model), _weights(rest.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strip_quantizers_gives_the_plain_fine_tuned_model(mlp, digits):
    r = finetune(mlp.model, uniform(mlp, "fp"), digits.train, QATRecipe(steps=3, batch_size=32),
                 calibration=digits.calibration)
    plain = strip_quantizers(r.model)
    assert not quantized_layers(plain) and quantized_layers(r.model)
    x = digits.test.x[:16]
    with torch.no_grad():
        assert torch.equal(plain(x), r.model(x))
        assert not torch.equal(plain(x), mlp.model(x))  # it did train
    assert [l.name for l in discover_layers(plain, mlp.example_input)] == list(uniform(mlp, "fp").layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_of_a_cpu_model_with_cpu_data(mlp, digits):
    """On a GPU machine: a CPU model and CPU tensors train on CUDA (bf16 autocast), the result comes back on
    the CPU, and a model already on CUDA calibrates from CPU data."""
    r = finetune(mlp.model, uniform(mlp, "4/8"), digits.train, QATRecipe(steps=5, batch_size=32, device="cuda"),
                 calibration=digits.calibration, eval_data=digits.test)
    assert r.device.startswith("cuda") and 0 <= r.metrics["top1"] <= 100
    assert all(p.device.type == "cpu" for p in r.model.parameters())
    with torch.no_grad():
        assert r.model(digits.test.x[:8]).shape[0] == 8
    on_gpu = apply_allocation(strip_quantizers(r.model).cuda(), uniform(mlp, "4/8"), digits.calibration)
    with torch.no_grad():
        assert on_gpu(digits.test.x[:8].cuda()).device.type == "cuda"
