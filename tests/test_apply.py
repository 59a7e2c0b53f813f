"""Layer discovery and fake-quant wrapping of arbitrary models."""

import pytest
import torch
from torch import nn

from quant import Allocation, BitsearchError, LayerBits, QuantConfig, apply_allocation, discover_layers
from quant.apply import quantized_layers, set_allocation


class Branchy(nn.Module):
    """Shared layer called twice, two branches, a transposed conv, 1-D and 3-D convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.left = nn.Conv2d(8, 8, 1, groups=2)
        self.right = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c1 = nn.Conv1d(8, 4, 3)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(4 * 62 + 2 * 64, 5)
        self.alias = self.shared  # the same module under a second name

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))  # second call of the shared module
        x = self.left(x) + self.up(self.right(x))
        seq = self.c1(x.flatten(2)[:, :, :64])
        vol = self.c3(x[:, :1].reshape(-1, 1, 4, 4, 4))
        return self.head(torch.cat([seq.flatten(1), vol.flatten(1)], 1))


def test_discovery_on_branching_and_shared_layers():
    m = Branchy()
    x = torch.randn(2, 3, 8, 8)
    layers = discover_layers(m, x)
    by = {l.name: l for l in layers}
    assert list(by) == ["stem", "shared", "left", "right", "up", "c1", "c3", "head"]
    assert by["shared"].calls == 2
    assert by["shared"].macs == 2 * 8 * 8 * 8 * 8 * 9  # two calls of 64 positions × 8 out × 72
    assert by["left"].macs == 8 * 8 * 8 * 4  # groups=2: 4 inputs per output
    assert by["right"].input_shape == (8, 8, 8) and by["right"].output_shape == (8, 4, 4)
    assert by["up"].macs == 8 * 4 * 4 * 8 * 4  # each input element scattered over 8×2×2
    assert by["head"].params == 5 * (4 * 62 + 2 * 64)
    assert by["c3"].macs == 2 * 64 * 27 and by["c1"].macs == 4 * 62 * 24
    assert by["stem"].params == 8 * 3 * 9 and by["stem"].bias
    assert "padding=1" in by["stem"].shape_key


def test_discovery_errors_are_clear():
    with pytest.raises(BitsearchError, match="no quantizable layer"):
        discover_layers(nn.Sequential(nn.ReLU()), torch.randn(1, 3))
    with pytest.raises(BitsearchError, match="does not fit the model"):
        discover_layers(nn.Linear(4, 2), torch.randn(1, 5))


def _alloc(model, x, bits):
    return Allocation.uniform([l.name for l in discover_layers(model, x)], bits)


def test_apply_allocation_leaves_original_untouched_and_quantizes_all():
    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(16, 3, 8, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = m(x)
    q = apply_allocation(m, _alloc(m, x, "4/8"), calibration=x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(m.stem) is nn.Conv2d  # the original keeps its layers
    layers = quantized_layers(q)
    assert set(layers) == {"stem", "shared", "left", "right", "up", "c1", "c3", "head"}
    assert q.alias is q.shared  # the shared module is wrapped once, under both names
    out = q(x)
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.5
    hi = apply_allocation(m, _alloc(m, x, "8/8"), calibration=x)
    assert (hi(x) - ref).norm() < (out - ref).norm()


def test_weight_grid_is_exact_per_channel():
    m = nn.Sequential(nn.Linear(6, 4)).eval()
    q = apply_allocation(m, Allocation.uniform(["0"], "3"))
    w = m[0].weight.detach()
    qw = quantized_layers(q)["0"].quantized_weight()
    step = w.abs().amax(1, keepdim=True) / 3
    assert torch.allclose(qw / step, torch.round(qw / step), atol=1e-5)
    assert (qw / step).abs().max() <= 3 + 1e-5


def test_activation_quantization_needs_calibration():
    m = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(BitsearchError, match="calibration data"):
        apply_allocation(m, Allocation.uniform(["0"], "4/8"))
    with pytest.raises(BitsearchError, match="does not fit the model"):
        apply_allocation(m, Allocation.uniform(["1"], "4"))


def test_auto_activation_quantizer_picks_unsigned_after_relu():
    m = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(64, 6)
    q = apply_allocation(m, Allocation.uniform(["0", "2"], "8/4"), calibration=x)
    layers = quantized_layers(q)
    assert layers["0"].input_quant.name == "int_asym"
    assert layers["2"].input_quant.name == "uint"


def test_set_allocation_matches_a_fresh_apply():
    torch.manual_seed(1)
    m = Branchy().eval()
    x = torch.randn(32, 3, 8, 8)
    cfg = QuantConfig(weight_clip="auto")
    q = apply_allocation(m, _alloc(m, x, "8/8"), calibration=x, config=cfg)
    target = _alloc(m, x, "3/6")
    target.layers["head"] = LayerBits(2, 8)
    set_allocation(q, target)
    fresh = apply_allocation(m, target, calibration=x, config=cfg)
    assert torch.allclose(q(x), fresh(x), atol=1e-5)


def test_output_mse_clipping_beats_minmax_on_layer_output():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1)).eval()
    with torch.no_grad():
        m[0].weight[:, :, 0, 0] *= 8  # outliers in one tap
    x = torch.randn(32, 4, 8, 8)
    x[:, :, :, :] *= torch.tensor([0.1, 1.0, 1.0, 3.0]).view(1, 4, 1, 1)
    ref = m(x)
    errs = {}
    for clip in ("minmax", "mse", "output_mse", "auto"):
        q = apply_allocation(m, Allocation.uniform(["0"], "3"), calibration=x, config=QuantConfig(weight_clip=clip))
        errs[clip] = (q(x) - ref).pow(2).mean().item()
    assert errs["output_mse"] <= errs["minmax"] + 1e-9
    assert errs["output_mse"] <= errs["mse"] + 1e-9
    assert errs["auto"] <= errs["output_mse"] * 1.0001


def test_bias_correction_removes_expected_output_shift():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False)).eval()
    x = torch.randn(64, 8, 6, 6) + 2.0  # a large input mean turns weight error into an output shift
    ref = m(x)
    alloc = Allocation.uniform(["0"], "2")
    plain = apply_allocation(m, alloc, calibration=x)
    fixed = apply_allocation(m, alloc, calibration=x, config=QuantConfig(bias_correction=True))
    shift_plain = (plain(x) - ref).mean(dim=(0, 2, 3)).abs().mean()
    shift_fixed = (fixed(x) - ref).mean(dim=(0, 2, 3)).abs().mean()
    assert shift_fixed < 0.05 * shift_plain


def test_ternary_and_binary_layers():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    alloc = Allocation({"0": LayerBits(2, 32, "ternary"), "1": LayerBits(1)})
    q = apply_allocation(m, alloc)
    layers = quantized_layers(q)
    assert layers["0"].weight_quant.name == "ternary"
    assert layers["1"].weight_quant.name == "binary"
    assert len(layers["1"].quantized_weight()[0].abs().unique()) == 1


def test_bad_config_is_refused():
    with pytest.raises(BitsearchError):
        QuantConfig(weight_clip="nope")
    with pytest.raises(BitsearchError):
        QuantConfig(activation_clip="output_mse")
    with pytest.raises(BitsearchError):
        QuantConfig.from_dict({"weight_bits": 4})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clip", ["minmax", "percentile", "mse", "aciq", "output_mse", "auto"])
def test_a_model_on_cuda_quantizes_as_on_the_cpu(clip):
    """On a GPU machine: calibration of a CUDA model from CPU data, with every clipping method and bias
    correction, gives the CPU's quantized model (up to float rounding of the statistics)."""
    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(64, 3, 8, 8)
    names = [l.name for l in discover_layers(m, x[:2])]
    alloc = Allocation.uniform(names, "4/8")
    act_clip = "mse" if clip in ("output_mse", "auto") else clip  # those two are for weights only
    cfg = QuantConfig(weight_clip=clip, activation_clip=act_clip, bias_correction=True)
    cpu = apply_allocation(m, alloc, x, cfg)
    gpu = apply_allocation(m.cuda(), alloc, x, cfg)
    with torch.no_grad():
        ref, out = cpu(x), gpu(x.cuda()).cpu()
    # a value at a rounding boundary may land on the neighbouring grid point on one device: compare means
    assert (out - ref).abs().mean() <= 0.02 * ref.abs().mean()
