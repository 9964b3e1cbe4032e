"""RTN (METHODS.md B1)."""

import pytest
import torch

from oac.errors import ConfigError
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers import rtn
from oac.solvers.common import layer_objective


def _w(rows=48, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_error_bounded(bits):
    W = _w()
    res = rtn.solve(W, None, rtn.RTNConfig(wbits=bits))
    s, _ = fit_minmax(W, bits)
    assert res.weight.shape == W.shape and res.weight.dtype == torch.float32
    assert ((res.weight - W).abs() <= s / 2 + 1e-6).all()
    assert torch.equal(res.masks["scale"], s)
    assert (res.weight.unique(dim=None).numel()) <= 48 * 2**bits
    for row in res.weight:
        assert row.unique().numel() <= 2**bits
    st = res.stats
    assert st["bits_nominal"] == bits and st["bits_reported"] == bits
    assert st["bits_full"] == pytest.approx(bits + 32 / 128)
    assert "objective" not in st


@pytest.mark.parametrize("g", [16, 32, 128])
def test_grouped_error_bounded(g):
    W = _w()
    W[:, :16] *= 10  # an outlier group: grouping must confine its larger step
    res = rtn.solve(W, None, rtn.RTNConfig(wbits=3, groupsize=g))
    for i in range(0, 128, g):
        s, _ = fit_minmax(W[:, i : i + g], 3)
        assert ((res.weight[:, i : i + g] - W[:, i : i + g]).abs() <= s / 2 + 1e-6).all()
    assert res.masks["scale"].shape == (48, 128 // g)
    assert res.stats["bits_full"] == pytest.approx(3 + 32 / g)
    if g < 128:
        err_g = (res.weight - W)[:, 16:].abs().max()
        err_c = (rtn.solve(W, None, rtn.RTNConfig(wbits=3)).weight - W)[:, 16:].abs().max()
        assert err_g < err_c


def test_objective_and_h_ignored():
    W = _w(16, 32)
    X = torch.randn(64, 32)
    H = 2 * X.T @ X / 64
    a = rtn.solve(W, None, rtn.RTNConfig())
    b = rtn.solve(W, H, rtn.RTNConfig())
    assert torch.equal(a.weight, b.weight)
    assert b.stats["objective"] == pytest.approx(layer_objective(W, b.weight, H))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_rejects_bad_bits(bits):
    with pytest.raises(ConfigError, match="wbits"):
        rtn.solve(_w(), None, rtn.RTNConfig(wbits=bits))


@pytest.mark.parametrize("g", [0, -2])
def test_rejects_bad_groupsize(g):
    with pytest.raises(ConfigError, match=rf"groupsize must be an integer >= 1 \(or -1\), got {g}"):
        rtn.solve(_w(), None, rtn.RTNConfig(groupsize=g))
    with pytest.raises(ConfigError, match=rf"groupsize must be an integer >= 1 \(or -1\), got {g}") as exc:
        rtn.check_shape(rtn.RTNConfig(groupsize=g), 48, 128)
    assert "\n" not in str(exc.value)


def columnwise_rtn(W, bits, g):
    """Plain reference: per row and natural group [i, i+g) (the last one shorter), fit and round column by column."""
    maxq = maxq_for(bits)
    Q = torch.empty_like(W)
    scales = []
    for i in range(0, W.shape[1], g):
        s, z = fit_minmax(W[:, i : i + g], bits)
        scales.append(s)
        for c in range(i, min(i + g, W.shape[1])):
            Q[:, c : c + 1] = fake_quantize(W[:, c : c + 1], s, z, maxq)
    return Q, torch.cat(scales, dim=1)


@pytest.mark.parametrize("g,d_in", [(128, 576), (48, 128), (100, 576), (256, 128), (128, 1536)])
def test_short_last_group_equals_columnwise_reference(g, d_in):
    """Any d_in: groups of g columns and a shorter last group (576 = 4·128 + 64), bit for bit."""
    W = _w(32, d_in, seed=2)
    W[:, -5:] *= 20  # the short group has its own, wider range
    res = rtn.solve(W, None, rtn.RTNConfig(wbits=3, groupsize=g))
    Q, scales = columnwise_rtn(W, 3, g)
    assert torch.equal(res.weight, Q)
    assert torch.equal(res.masks["scale"], scales) and res.masks["zero"].shape == scales.shape
    n_g = -(-d_in // g)
    assert scales.shape == (32, n_g)
    assert res.stats["bits_full"] == 3 + 32 * n_g / d_in
    rtn.check_shape(rtn.RTNConfig(wbits=3, groupsize=g), 32, d_in)  # accepted
