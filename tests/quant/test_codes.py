"""Solver grids as stored codes (oac/quant/codes.py) and their compressed-tensors packing (oac/jobdir/export.py):
bit for bit, for every grid shape RTN and GPTQ produce."""

import math

import pytest
import torch

from oac.quant.codes import GridError, dequantize_grid, layer_grid
from oac.solvers import gptq, rtn
from tests.helpers import correlated_H


def _w(rows=24, cols=100, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _grid(res, cfg, W=None):
    W = res.weight if W is None else W
    return layer_grid(W, res.masks["scale"], res.masks["zero"], wbits=cfg.wbits, groupsize=cfg.groupsize,
                      sym=cfg.sym, perm=res.masks.get("perm"), static_groups=getattr(cfg, "static_groups", False))


def _ct_roundtrip(W, grid):
    """compressed-tensors' own compress + decompress of the layer (raises unless exact)."""
    from compressed_tensors.quantization import QuantizationScheme

    from oac.jobdir.export import _weight_args, compress_layer

    scheme = QuantizationScheme(targets=["x"], weights=_weight_args(grid), format="pack-quantized")
    return compress_layer(W, grid, scheme)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("g", [-1, 25, 32, 128])  # 100 = 3·32 + a short group of 4; 128 > d_in: one group
def test_rtn_grid_is_exact(bits, sym, g):
    cfg = rtn.RTNConfig(wbits=bits, groupsize=g, sym=sym)
    res = rtn.solve(_w(), None, cfg)
    grid = _grid(res, cfg)
    assert grid.codes.min() >= 0 and grid.codes.max() <= 2**bits - 1
    assert torch.equal(dequantize_grid(grid), res.weight)
    if g in (-1, 128):
        assert grid.group_size is None and grid.scale.shape == (24, 1)
    else:
        assert grid.group_size == math.gcd(g, 100) and grid.scale.shape == (24, 100 // grid.group_size)
    packed = _ct_roundtrip(res.weight, grid)
    assert packed["weight_packed"].dtype == torch.int32 and ("weight_zero_point" in packed) == (not sym)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("g", [-1, 16, 24])  # 24 ∤ 100: short last group (stored group size 4)
def test_gptq_grid_is_exact(act_order, static, g):
    if static and g == -1:
        pytest.skip("static groups need a groupsize")
    W, H = _w(), correlated_H(100, seed=1)
    cfg = gptq.GPTQConfig(wbits=3, groupsize=g, act_order=act_order, static_groups=static, blocksize=32)
    res = gptq.solve(W, H, cfg)
    grid = _grid(res, cfg)
    assert torch.equal(dequantize_grid(grid), res.weight)
    assert (grid.g_idx is not None) == (act_order and not static and g != -1)
    if grid.g_idx is not None:  # every stored group has exactly group_size columns
        assert torch.bincount(grid.g_idx.long()).tolist() == [grid.group_size] * (100 // grid.group_size)
    _ct_roundtrip(res.weight, grid)


def test_fp16_weights_keep_fp32_scales():
    """An fp16 Ŵ (GPU jobs) is the fp16 rounding of the fp32 s·(q − z): fp32 scales give it back exactly."""
    cfg = rtn.RTNConfig(wbits=4, groupsize=32)
    res = rtn.solve(_w(cols=96), None, cfg)
    W16 = res.weight.half()
    grid = _grid(res, cfg, W16)
    assert grid.scale.dtype == torch.float32
    assert torch.equal(dequantize_grid(grid).half(), W16)
    _ct_roundtrip(W16, grid)


def test_off_grid_weights_are_refused():
    cfg = rtn.RTNConfig(wbits=4, groupsize=32)
    res = rtn.solve(_w(), None, cfg)
    W = res.weight.clone()
    W[3, 7] += 1e-3
    with pytest.raises(GridError, match="not on the saved grid"):
        _grid(res, cfg, W)
    with pytest.raises(GridError, match="scale/zero of shape"):
        layer_grid(res.weight, res.masks["scale"][:, :2], res.masks["zero"][:, :2], wbits=4, groupsize=32, sym=False)
