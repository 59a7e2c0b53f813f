"""Quantizers: exact integer grids, clipping, straight-through gradients, stochastic rounding."""

import pytest
import torch

from quant import BitsearchError, make_quantizer
from quant.calibration import ClipContext, clip_range, output_error


def test_symmetric_grid_is_exact_and_narrow():
    q = make_quantizer("int_sym", 4)
    q.set_range(torch.tensor(-1.0), torch.tensor(0.7))
    assert q.levels() == (-7, 7)
    assert torch.isclose(q.scale, torch.tensor(1 / 7))
    x = torch.tensor([-2.0, -1.0, -0.55, 0.0, 0.07, 0.55, 1.0, 3.0])
    ints = q.quantize(x)
    assert ints.tolist() == [-7, -7, -4, 0, 0, 4, 7, 7]
    assert torch.allclose(q(x), ints.float() / 7)


def test_two_bit_symmetric_is_ternary_grid():
    q = make_quantizer("int_sym", 2)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert set(q.quantize(torch.linspace(-1, 1, 21)).tolist()) == {-1, 0, 1}


def test_per_channel_scales_follow_each_row():
    q = make_quantizer("int_sym", 8, per_channel=True)
    w = torch.tensor([[0.5, -0.25], [4.0, 2.0]])
    q.set_range(*q.minmax(w))
    assert torch.allclose(q.scale, torch.tensor([0.5, 4.0]) / 127)
    assert q.quantize(w).tolist() == [[127, -64], [127, 64]]


def test_unsigned_and_asymmetric_grids():
    u = make_quantizer("uint", 3)
    u.set_range(torch.tensor(0.0), torch.tensor(7.0))
    assert u.quantize(torch.tensor([-1.0, 0.4, 3.6, 9.0])).tolist() == [0, 0, 4, 7]
    a = make_quantizer("int_asym", 8)
    a.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    # zero is exact: it maps to the integer zero point
    assert float(a(torch.tensor(0.0))) == 0.0
    assert 0 <= int(a.zero_point) <= 255
    assert torch.allclose(a(torch.tensor([-1.0, 3.0])), torch.tensor([-1.0, 3.0]), atol=float(a.scale))


@pytest.mark.parametrize("name,bits", [("int_sym", 4), ("uint", 4), ("int_asym", 4)])
def test_clipped_straight_through_gradient(name, bits):
    q = make_quantizer(name, bits)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.9, 3.0], requires_grad=True)
    q(x).sum().backward()
    inside = (x.detach() >= (-1.0 if name != "uint" else 0.0)) & (x.detach() <= 1.0)
    assert torch.equal(x.grad, inside.float())


def test_ternary_twn_threshold_and_scale():
    w = torch.tensor([[0.1, -0.9, 0.5, -0.05], [1.0, 0.0, -1.0, 0.2]])
    q = make_quantizer("ternary", 2, per_channel=True)
    out = q(w)
    # row 0: delta = 0.7 * mean|w| = 0.7 * 0.3875 = 0.27125 -> keeps -0.9, 0.5; alpha = 0.7
    assert torch.allclose(out[0], torch.tensor([0.0, -0.7, 0.7, 0.0]))
    # row 1: delta = 0.7 * 0.55 = 0.385 -> keeps 1.0, -1.0; alpha = 1.0
    assert torch.allclose(out[1], torch.tensor([1.0, 0.0, -1.0, 0.0]))
    assert q.quantize(w).tolist() == [[0, -1, 1, 0], [1, 0, -1, 0]]
    wg = w.clone().requires_grad_(True)
    q(wg).sum().backward()
    assert torch.equal(wg.grad, torch.ones_like(w))


def test_binary_xnor_scale_and_hardtanh_gradient():
    w = torch.tensor([[0.5, -1.5, 0.0, 1.0]], requires_grad=True)
    q = make_quantizer("binary", 1)
    out = q(w)
    assert torch.allclose(out, torch.tensor([[0.75, -0.75, 0.75, 0.75]]))
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_float_quantizers():
    x = torch.tensor([1.0 + 2**-12, 3.0])
    assert torch.equal(make_quantizer("float", 32)(x), x)
    assert make_quantizer("float", 16)(x)[0] == 1.0  # below float16 resolution


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    q = make_quantizer("int_sym", 4, stochastic=True)
    q.set_range(torch.tensor(-7.0), torch.tensor(7.0))
    x = torch.full((20000,), 2.3)
    vals = q(x)
    assert set(vals.unique().tolist()) == {2.0, 3.0}
    assert abs(vals.mean().item() - 2.3) < 0.02


def test_bad_bits_are_refused():
    with pytest.raises(BitsearchError):
        make_quantizer("int_sym", 9)
    with pytest.raises(BitsearchError):
        make_quantizer("int_sym", 1)
    with pytest.raises(BitsearchError):
        make_quantizer("nope", 4)


def test_quantizer_needs_calibration():
    with pytest.raises(RuntimeError):
        make_quantizer("int_sym", 4)(torch.ones(3))


# --- clipping -------------------------------------------------------------------------------------


def _heavy_tailed(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[torch.randint(0, n, (5,), generator=g)] = 40.0  # a few outliers
    return x[None, :]


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "aciq", "output_mse", "auto"])
def test_clip_ranges_stay_within_observed_extremes(method):
    x = _heavy_tailed()
    q = make_quantizer("int_sym", 4)
    lo, hi = clip_range(method, x, q, ClipContext(percentile=99.9))
    assert lo.item() >= x.min().item() - 1e-6 and hi.item() <= x.max().item() + 1e-6


def test_clipping_beats_minmax_on_outliers():
    x = _heavy_tailed()
    q = make_quantizer("int_sym", 4)

    def mse(method):
        lo, hi = clip_range(method, x, q, ClipContext(percentile=99.9))
        s, z = q.qparams(lo, hi)
        return (q.fake_quant(x, s[:, None], z[:, None]) - x).pow(2).mean().item()

    base = mse("minmax")
    for m in ("percentile", "mse", "aciq"):
        assert mse(m) < 0.5 * base, m


def test_output_mse_weighs_errors_by_input_energy():
    # Two weight columns; the input only ever excites the second one. Output-MSE clipping must then
    # care about column 1 alone and keep its largest entry exact, whereas weight-MSE clips it.
    w = torch.tensor([[0.05, 1.0] + [0.45] * 30])
    cov = torch.zeros(32, 32)
    cov[1, 1] = 1.0
    q = make_quantizer("int_sym", 2, per_channel=True)
    ctx = ClipContext(input_cov=cov)
    lo, hi = clip_range("output_mse", w, q, ctx)
    assert hi.item() == pytest.approx(1.0)
    lo2, hi2 = clip_range("mse", w, q, ctx)
    assert hi2.item() < 0.8

    def out_err(lo_, hi_):
        s, z = q.qparams(lo_, hi_)
        return output_error(q.fake_quant(w, s[:, None], z[:, None]) - w, ctx).item()

    assert out_err(lo, hi) < out_err(lo2, hi2)


def test_unknown_clip_method():
    with pytest.raises(BitsearchError):
        clip_range("magic", torch.ones(1, 4), make_quantizer("int_sym", 4))
