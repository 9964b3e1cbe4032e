"""A quantized layer's uniform grid in the terms of standard checkpoint formats (integer codes + groups).

RTN and GPTQ return the dequantized weight Ŵ = s·(q − z) (``oac.quant.grid``) with the (s, z) they fitted, one
pair per row and group, in *fitting order* (``SolveResult.masks``: ``scale``, ``zero`` and, with act-order,
``perm``). :func:`layer_grid` turns that into what a packed checkpoint stores, with no refit:

* ``codes`` q = round(Ŵ/s) + z ∈ {0..maxq}, checked to give back Ŵ *bit for bit* as s·(q − z) (else
  :class:`GridError`: the weights are not on the solver's grid);
* groups of ``group_size`` consecutive columns of equal size. A short last group (groupsize ∤ d_in, e.g.
  576 = 4·128 + 64) is not expressible as such, so the stored group size is e = gcd(groupsize, d_in) and each
  solver group is written as groupsize/e groups with the same (s, z) (576, g128 → e = 64: two stored groups per
  solver group, one for the short last group; 1536, g128 → e = 128, no repetition);
* with act-order (non-static groups) a solver group is ``groupsize`` consecutive columns *in visiting order*
  ``perm``; ``g_idx[c]`` = the stored group of column c = (position of c in ``perm``) // e. Static groups (and
  per-channel grids) are natural column groups: ``g_idx`` is None.

Per-channel grids (groupsize −1, or a group as wide as the row) have one (s, z) per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from oac.quant.grid import maxq_for


class GridError(ValueError):
    """The saved weights and grid do not match (weights off the grid, or a grid of an unexpected shape)."""


@dataclass
class LayerGrid:
    codes: Tensor  # int16 [d_out, d_in] in 0..maxq
    scale: Tensor  # float32 [d_out, n_groups] (n_groups = 1 per channel)
    zero: Tensor  # int16 [d_out, n_groups] in 0..maxq
    group_size: int | None  # None: per-channel
    g_idx: Tensor | None  # int32 [d_in]: stored group of each column; None: natural order (column c → c // e)
    wbits: int
    sym: bool

    @property
    def maxq(self) -> int:
        return maxq_for(self.wbits)


def visiting_position(perm: Tensor) -> Tensor:
    """pos[c] = index of column c in the visiting order ``perm`` (perm maps position → column)."""
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return pos


def layer_grid(weight: Tensor, scale: Tensor, zero: Tensor, *, wbits: int, groupsize: int, sym: bool,
               perm: Tensor | None = None, static_groups: bool = False, name: str = "layer") -> LayerGrid:
    """The stored form of one RTN/GPTQ layer (see the module docstring). ``weight`` is Ŵ in any float dtype
    (the model's: an fp16 Ŵ is the fp16 rounding of the fp32 s·(q − z)), ``scale``/``zero`` the solver's."""
    W = weight.detach()
    d_out, d_in = W.shape
    maxq = maxq_for(wbits)
    scale, zero = scale.detach().float(), zero.detach().float()
    per_channel = groupsize == -1 or groupsize >= d_in
    n_fit = 1 if per_channel else math.ceil(d_in / groupsize)
    if tuple(scale.shape) != (d_out, n_fit) or tuple(zero.shape) != (d_out, n_fit):
        raise GridError(f"{name}: scale/zero of shape {tuple(scale.shape)}/{tuple(zero.shape)}, expected "
                        f"{(d_out, n_fit)} for groupsize={groupsize} and a {d_out}x{d_in} weight")
    if not bool((zero == torch.round(zero)).all()) or not bool(((zero >= 0) & (zero <= maxq)).all()):
        raise GridError(f"{name}: zero points are not integers in 0..{maxq}")
    if sym and not bool((zero == (maxq + 1) / 2).all()):
        raise GridError(f"{name}: sym=true but the zero points are not all {(maxq + 1) // 2}")
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise GridError(f"{name}: scales must be positive and finite")
    act_order = perm is not None and not static_groups and not per_channel
    pos = visiting_position(perm.to(torch.long)) if act_order else torch.arange(d_in)
    if per_channel:
        fit_of_col = torch.zeros(d_in, dtype=torch.long)
    else:
        fit_of_col = pos // groupsize
    s_col, z_col = scale[:, fit_of_col], zero[:, fit_of_col]
    codes = torch.clamp(torch.round(W.float() / s_col) + z_col, 0, maxq)
    back = (s_col * (codes - z_col)).to(W.dtype)
    if not torch.equal(back, W):
        bad = int((back != W).sum())
        raise GridError(f"{name}: {bad} of {W.numel()} weights are not on the saved grid (not an RTN/GPTQ result?)")
    if per_channel:
        return LayerGrid(codes.to(torch.int16), scale.contiguous(), zero.to(torch.int16), None, None, wbits, sym)
    e = math.gcd(groupsize, d_in)
    stored_fit = (torch.arange(d_in // e) * e) // groupsize  # solver group of each stored group
    g_idx = (pos // e).to(torch.int32) if act_order else None
    return LayerGrid(codes.to(torch.int16), scale[:, stored_fit].contiguous(), zero[:, stored_fit].to(torch.int16),
                     e, g_idx, wbits, sym)


def dequantize_grid(grid: LayerGrid) -> Tensor:
    """s·(q − z) column by column (float32): the inverse of :func:`layer_grid`, for tests and checks."""
    d_in = grid.codes.shape[1]
    if grid.group_size is None:
        group = torch.zeros(d_in, dtype=torch.long)
    elif grid.g_idx is not None:
        group = grid.g_idx.long()
    else:
        group = torch.arange(d_in) // grid.group_size
    s, z = grid.scale[:, group], grid.zero[:, group].float()
    return s * (grid.codes.float() - z)
