"""Properties of the uniform min-max grid (METHODS.md A1)."""

import pytest
import torch

from oac.quant.grid import dequantize, fake_quantize, fit_minmax, maxq_for, quantize


def _rows(seed=0, rows=16, cols=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[1] = x[1].abs() + 0.1  # all positive: lo forced to 0 in the GPTQ variant
    x[2] = -x[2].abs() - 0.1  # all negative: hi forced to 0
    x[3] = 0.0  # degenerate
    x[4] = 0.7  # constant non-zero
    return x


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_zero_representable_and_codes_in_range(bits, sym):
    x = _rows()
    maxq = maxq_for(bits)
    s, z = fit_minmax(x, bits, sym=sym, variant="gptq")
    assert s.shape == z.shape == (x.shape[0], 1)
    assert (s > 0).all()
    assert torch.equal(z, torch.round(z)) and (z >= 0).all() and (z <= maxq).all()
    q = quantize(x, s, z, maxq, "gptq")
    assert torch.equal(q, torch.round(q)) and q.min() >= 0 and q.max() <= maxq
    zeros = torch.zeros(x.shape[0], 1)
    assert torch.equal(fake_quantize(zeros, s, z, maxq, "gptq"), zeros)


def test_gptq_range_contains_zero_and_degenerate_rows():
    x = _rows()
    bits, maxq = 4, 15
    s, z = fit_minmax(x, bits, variant="gptq")
    lo = x.min(1).values.clamp(max=0)
    hi = x.max(1).values.clamp(min=0)
    # degenerate row (all zero) -> [-1, 1]
    assert torch.isclose(s[3, 0], torch.tensor(2 / maxq))
    assert z[3, 0] == torch.round(1 / s[3, 0])
    # constant non-zero row is not degenerate in the GPTQ variant (range [0, 0.7])
    assert torch.isclose(s[4, 0], torch.tensor(0.7 / maxq)) and z[4, 0] == 0
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    ok[3] = False
    assert torch.allclose(s[ok, 0], (hi - lo)[ok] / maxq)
    assert torch.equal(z[ok, 0], torch.round(-lo[ok] / s[ok, 0]))
    # all-positive row: zero code 0; all-negative row: zero code maxq
    assert z[1, 0] == 0 and z[2, 0] == maxq
    # in-range values are within half a step
    xq = fake_quantize(x, s, z, maxq, "gptq")
    assert ((xq - x).abs() <= s / 2 + 1e-6).all()


def test_gptq_symmetric_quirk():
    """A row without negative values keeps lo = 0: scale hi/maxq, zero the mid-point (not 'fixed')."""
    x = _rows()
    bits, maxq = 3, 7
    s, z = fit_minmax(x, bits, sym=True, variant="gptq")
    assert (z == (maxq + 1) / 2).all()
    assert torch.isclose(s[1, 0], x[1].max() / maxq)  # lo stays 0 -> half the grid unused
    amax = x[0].abs().max()
    assert torch.isclose(s[0, 0], 2 * amax / maxq)  # row with both signs: symmetric range
    assert torch.isclose(s[2, 0], 2 * x[2].abs().max() / maxq)  # all-negative: lo=-hi with hi=|lo|


def test_spqr_variant_unrounded_zero():
    x = _rows()
    bits, maxq = 3, 7
    s, z = fit_minmax(x, bits, variant="spqr")
    lo, hi = x.min(1).values, x.max(1).values
    ok = lo != hi
    assert torch.allclose(s[ok, 0], (hi - lo)[ok] / maxq)
    assert torch.allclose(z[ok, 0], -lo[ok] / s[ok, 0])
    assert not torch.equal(z, torch.round(z))  # zero point is not rounded by default
    # degenerate rows are lo == hi (also the constant 0.7 row) -> [-1, 1]
    assert torch.isclose(s[3, 0], torch.tensor(2 / maxq)) and torch.isclose(s[4, 0], torch.tensor(2 / maxq))
    # range is [min, max]: the all-positive row's step is (max-min)/maxq, smaller than GPTQ's
    sg, _ = fit_minmax(x, bits, variant="gptq")
    assert s[1, 0] < sg[1, 0]
    _, zr = fit_minmax(x, bits, variant="spqr", round_zero=True)
    assert torch.equal(zr, torch.round(zr))
    q = quantize(x, s, z, maxq, "spqr")
    assert q.min() >= 0 and q.max() <= maxq
    assert ((dequantize(q, s, z) - x).abs()[ok] <= s[ok] / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_search_never_worse(bits, sym):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, generator=g)
    x[:, :3] *= 8  # heavy-tailed rows: clipping helps
    maxq, norm = maxq_for(bits), 2.4
    s0, z0 = fit_minmax(x, bits, sym=sym, variant="gptq")
    s1, z1 = fit_minmax(x, bits, sym=sym, variant="gptq", mse=True, norm=norm)
    e0 = (fake_quantize(x, s0, z0, maxq) - x).abs().pow(norm).sum(1)
    e1 = (fake_quantize(x, s1, z1, maxq) - x).abs().pow(norm).sum(1)
    assert (e1 <= e0 * (1 + 1e-6)).all()
    assert (e1 < e0).any()
    assert (s1 <= s0 * (1 + 1e-6)).all()  # candidates only shrink the range


def test_uniform_bits_short_last_group():
    """ceil(d_in/g) (s, z) pairs per row; identical to b + 32/g (PROTOCOLS.md §4) whenever g divides d_in."""
    from oac.quant.bits import n_groups, uniform_bits

    for b in (2, 3, 4):
        for g, d_in in ((128, 4096), (64, 576), (16, 1536), (128, 11008)):
            assert uniform_bits(b, g, d_in) == (b, b + 32 / g)
            assert uniform_bits(b, g, d_in, packed_zero=True) == (b, b + (16 + b) / g)
        assert uniform_bits(b, -1, 576) == (b, b + 32 / 576)
    assert n_groups(576, 128) == 5 and n_groups(576, -1) == 1 and n_groups(576, 1000) == 1
    assert uniform_bits(3, 128, 576) == (3.0, 3 + 32 * 5 / 576)  # 4 full groups + one of 64 columns
    assert uniform_bits(3, 128, 576)[1] > 3 + 32 / 128
    assert uniform_bits(3, 1000, 576) == uniform_bits(3, -1, 576)  # g > d_in: one (short) group
