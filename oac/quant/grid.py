"""Uniform min-max quantizer grid (METHODS.md A1).

Two variants exist in the reference code and each method uses its own:

* ``"gptq"`` (RTN, GPTQ): zero is forced into the range, the zero point is rounded, degenerate
  rows are those with lo = hi = 0.
* ``"spqr"`` (SpQR, OAC-SpQR): plain [min, max] range, the zero point is not rounded unless
  ``round_zero``; degenerate rows are those with lo = hi.

All functions work row-wise on a 2-D tensor ``x`` of shape [rows, cols] and return statistics of
shape [rows, 1], so that ``dequantize(quantize(x, s, z, maxq), s, z)`` broadcasts over columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

VARIANTS = ("gptq", "spqr")


def maxq_for(bits: int) -> int:
    return 2**bits - 1


def fit_minmax(
    x: Tensor,
    bits: int,
    *,
    sym: bool = False,
    variant: str = "gptq",
    round_zero: bool = False,
    mse: bool = False,
    maxshrink: float = 0.8,
    grid: int = 100,
    norm: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Fit per-row (scale, zero) to ``x`` [rows, cols]. Returns two [rows, 1] tensors."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown quantizer variant {variant!r}; expected one of {VARIANTS}")
    maxq = maxq_for(bits)
    x = x.float()
    if variant == "gptq":
        lo = x.min(dim=1).values.clamp(max=0)
        hi = x.max(dim=1).values.clamp(min=0)
    else:
        lo = x.min(dim=1).values
        hi = x.max(dim=1).values
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        neg = lo < 0
        lo = torch.where(neg, -hi, lo)
    degenerate = (lo == 0) & (hi == 0) if variant == "gptq" else lo == hi
    lo = torch.where(degenerate, torch.full_like(lo, -1.0), lo)
    hi = torch.where(degenerate, torch.full_like(hi, 1.0), hi)

    scale, zero = _scale_zero(lo, hi, maxq, sym=sym, round_zero=(variant == "gptq") or round_zero)
    if mse:
        if variant != "gptq":
            raise ValueError("the MSE clipping search is defined for the GPTQ variant only")
        best = torch.full_like(lo, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = _scale_zero(p * lo, p * hi, maxq, sym=sym, round_zero=True)
            q = fake_quantize(x, s1.unsqueeze(1), z1.unsqueeze(1), maxq, variant)
            err = (q - x).abs_().pow_(norm).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _scale_zero(lo: Tensor, hi: Tensor, maxq: int, *, sym: bool, round_zero: bool) -> tuple[Tensor, Tensor]:
    scale = (hi - lo) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -lo / scale
        if round_zero:
            zero = torch.round(zero)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int, variant: str = "gptq") -> Tensor:
    """Integer codes in {0..maxq} (as float tensor)."""
    if variant == "gptq":
        return torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return torch.clamp(torch.round(x / scale.clamp(min=1e-9) + zero), 0, maxq)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return scale * (q - zero)


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int, variant: str = "gptq") -> Tensor:
    return dequantize(quantize(x, scale, zero, maxq, variant), scale, zero)
