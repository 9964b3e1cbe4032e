"""GPTQ (METHODS.md B2, with the Hessian preparation of A3 and the lazy OBS sweep of A4).

Replicates the reference (IST-DASLab/gptq) on identical inputs, including its quirks:
* per-channel (s, z) are fitted on the original W, before dead columns are zeroed;
* damping is the reference's float32 ``percdamp * torch.mean(torch.diag(H))`` after the dead fix;
* act-order is the reference's default (unstable) ``argsort(diag H, descending)``;
* groups are ``groupsize`` consecutive columns in visiting order, the last one shorter when groupsize
  does not divide d_in (any d_in is accepted); with act-order they are consecutive *permuted* columns;
* static groups are fitted after the dead fix on the natural column groups (last one shorter), before
  any permutation, and each column uses the group of its ORIGINAL index;
* non-static group fits read the *global* W, which lacks the in-block updates of the current block
  (stale unless the group starts on a block boundary), so for g < blocksize the block size matters.

Diagnostics: ``loss`` (½ Σ e², the reference's "error") and ``objective`` (tr(ΔW H ΔWᵀ) for the undamped H)
come from the errors the sweep computes anyway (:func:`oac.solvers.common.obs_objective`, O(d_out·d_in));
``diagnostics=True`` evaluates ``objective`` with the plain d_out·d_in² product instead.

Per-row-group Hessians: H may be a stack [G, d_in, d_in] (``oac.solvers.common.solve_row_groups``): the rows
are split into G contiguous groups of d_out/G and each group is a GPTQ problem of its own with its H[g] (dead
columns, damping, Cholesky factor and, with ``act_order``, the permutation by its own diag(H[g])). GPTQ's grid is
per row, so the split changes nothing but the Hessian each row sees. Ŵ, ``scale`` and ``zero`` are the groups'
stacked in row order, ``perm`` becomes [G, d_in]; stats: ``loss``, ``objective``, ``n_weights``, times and
retries are summed, ``percdamp_used`` and ``n_dead`` are the largest of any group, plus ``row_groups``. G = 1
([1, d_in, d_in]) is the plain path, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from oac.errors import ConfigError
from oac.registry import check_choice, check_float, check_int
from oac.solvers import SolverSpec
from oac.quant.bits import uniform_bits
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers.common import (
    SolveResult,
    act_order_permutation,
    check_finite,
    MERGE_MAX,
    MERGE_SUM,
    inverse_cholesky,
    layer_objective,
    obs_objective,
    solve_row_groups,
    sq_dist,
)

# how the stats of row groups combine into the layer's (the other keys are settings, equal in every group)
ROW_GROUP_STATS = {"n_weights": MERGE_SUM, "loss": MERGE_SUM, "objective": MERGE_SUM, "diagnostics_s": MERGE_SUM,
                   "percdamp_used": MERGE_MAX, "damp_retries": MERGE_SUM, "n_dead": MERGE_MAX}


@dataclass
class GPTQConfig:
    wbits: int = 4
    groupsize: int = -1  # -1: per-channel; any g > 0 (the last group of a row is shorter if g ∤ d_in)
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    sym: bool = False
    mse: bool = False
    damp_retry_mode: str = "add"  # "add": +damp_retry_step per retry; "multiply": ×damp_retry_factor
    damp_retry_step: float = 0.01
    damp_retry_factor: float = 10.0
    max_percdamp: float = 10.0
    # False: stats["objective"] from the sweep's OBS errors (cost O(d_out·d_in), equal to the plain formula up
    # to float32 rounding, ~1e-5 relative). True: the plain tr(ΔW H ΔWᵀ) (2·d_out·d_in² flops, about as much
    # as the solve itself). Never changes the weights.
    diagnostics: bool = False


def validate_options(cfg: GPTQConfig) -> None:
    """Option ranges that need no layer shape (checked before the model is loaded)."""
    check_int("method", "wbits", cfg.wbits, 1, 8)
    check_int("method", "groupsize", cfg.groupsize, 1, allow=(-1,))
    check_int("method", "blocksize", cfg.blocksize, 1)
    check_float("method", "percdamp", cfg.percdamp, 0)
    check_choice("method", "damp_retry_mode", cfg.damp_retry_mode, ("add", "multiply"))
    if cfg.static_groups and cfg.groupsize == -1:
        raise ConfigError("method.static_groups=true needs a groupsize (got groupsize=-1)")



def validate_config(cfg: GPTQConfig, shape: tuple[int, int], name: str = "layer") -> None:
    """GPTQ accepts every layer shape (a shorter last group when groupsize does not divide d_in)."""
    validate_options(cfg)


def check_shape(cfg: GPTQConfig, d_out: int, d_in: int) -> None:
    """Raise a one-line ConfigError if ``cfg`` cannot quantize a d_out×d_in layer.

    GPTQ accepts every shape (a groupsize that does not divide d_in leaves a shorter last group, as in the
    reference), so only invalid settings are rejected; called by the job before calibration.
    """
    validate_config(cfg, (int(d_out), int(d_in)))


def solve(W: Tensor, H: Tensor, cfg: GPTQConfig, name: str = "layer") -> SolveResult:
    validate_config(cfg, tuple(W.shape), name)
    check_finite(W, H, name)
    if H.dim() == 3:  # one Hessian per contiguous row group
        if H.shape[0] > 1:
            return solve_row_groups(solve, W, H, cfg, name, ROW_GROUP_STATS)
        H = H[0]
    W_orig = W.detach().float()
    W = W_orig.clone()
    H_in = H.detach().to(device=W.device, dtype=torch.float32)  # the caller's tensor when already fp32: read only
    d_out, d_in = W.shape
    g, B, maxq = cfg.groupsize, cfg.blocksize, maxq_for(cfg.wbits)

    def fit(x: Tensor) -> tuple[Tensor, Tensor]:
        return fit_minmax(x, cfg.wbits, sym=cfg.sym, variant="gptq", mse=cfg.mse)

    if g == -1:
        scale, zero = fit(W)  # original weights: before dead-zeroing and any update
    diag = torch.diag(H_in)
    dead = diag == 0
    W[:, dead] = 0.0
    if cfg.static_groups:  # natural column groups [i, i+g), the last one shorter if g ∤ d_in
        static = [fit(W[:, i : i + g]) for i in range(0, d_in, g)]
    perm = None
    if cfg.act_order:
        # the reference's argsort of diag(H) after the dead fix H[dead, dead] = 1; permuting the caller's H
        # directly (the gather is the solver's copy) and fixing the permuted dead entries gives the same
        # matrix as fixing then permuting, without a third d_in² copy
        perm = act_order_permutation(torch.where(dead, torch.ones_like(diag), diag))
        # = W[:, perm], H[perm][:, perm]; index_select gathers columns about twice as fast on CPU
        W, H = W.index_select(1, perm), H_in.index_select(0, perm).index_select(1, perm)
        dead_p = dead[perm]
        H[dead_p, dead_p] = 1.0
        order = perm.tolist()
    else:
        H = H_in.clone()  # the solver's own copy
        H[dead, dead] = 1.0
    U, _, info = inverse_cholesky(
        H, cfg.percdamp, order="dead_then_damp", retry_mode=cfg.damp_retry_mode, retry_step=cfg.damp_retry_step,
        retry_factor=cfg.damp_retry_factor, max_percdamp=cfg.max_percdamp, overwrite=True,
    )  # fmt: skip
    del H

    Q = torch.empty_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    t_diag = 0.0  # wall time of the diagnostics (loss, objective), reported as stats["diagnostics_s"]
    scales, zeros = [], []
    # Preallocated products: the in-block outer product e·U[j, j:] and the lazy E1·U[b0:b1, b1:] are computed
    # into these (the same float32 products as the reference's temporaries, then subtracted), which saves a
    # fresh multi-MB allocation (page faults) per column and per block.
    outer = torch.empty(d_out * min(B, d_in), dtype=W.dtype, device=W.device)
    lazy = torch.empty(d_out * max(d_in - B, 0), dtype=W.dtype, device=W.device)
    for b0 in range(0, d_in, B):
        b1 = min(b0 + B, d_in)
        W1 = W[:, b0:b1].clone()
        Q1 = torch.empty_like(W1)  # block-local, as the reference: no strided writes into the full Q
        E1 = torch.empty_like(W1)
        U1 = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            c = b0 + j
            if g != -1 and cfg.static_groups:
                scale, zero = static[(order[c] if perm is not None else c) // g]
            elif g != -1 and c % g == 0:
                scale, zero = fit(W[:, c : c + g])  # global W: stale for groups starting inside a block
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, j : j + 1]
            q = fake_quantize(w, scale, zero, maxq, "gptq")
            Q1[:, j : j + 1] = q
            e = (w - q) / U1[j, j]
            # the reference's k=1 matmul err·Hinv[i, i:] (a broadcast multiply gives the same bits but ran ~10×
            # slower here: it picked a strided loop order)
            W1[:, j:] -= torch.mm(e, U1[j : j + 1, j:], out=outer[: d_out * (b1 - c)].view(d_out, b1 - c))
            E1[:, j : j + 1] = e
        Q[:, b0:b1] = Q1
        if b1 < d_in:
            W[:, b1:] -= torch.mm(E1, U[b0:b1, b1:], out=lazy[: d_out * (d_in - b1)].view(d_out, d_in - b1))
        t0 = time.perf_counter()
        e1 = E1.view(-1)
        loss += 0.5 * torch.dot(e1, e1).double()  # float32 BLAS dot per block, accumulated in float64
        t_diag += time.perf_counter() - t0

    if perm is not None:
        Q = Q.index_select(1, torch.argsort(perm))
    if g == -1:
        scales, zeros = [scale], [zero]
    elif cfg.static_groups:
        scales, zeros = [s for s, _ in static], [z for _, z in static]

    t0 = time.perf_counter()
    if cfg.diagnostics:
        objective = layer_objective(W_orig, Q, H_in)
    else:  # dead columns: zero in Q and in H, excluded from ‖ΔW‖²; there e = 0 already
        objective = obs_objective(2 * float(loss), info["damp"], sq_dist(W_orig, Q, ~dead))
    t_diag += time.perf_counter() - t0
    reported, full = uniform_bits(cfg.wbits, g, d_in)
    stats = {
        "wbits": cfg.wbits,
        "groupsize": g,
        "bits_nominal": float(cfg.wbits),
        "bits_reported": reported,
        "bits_full": full,
        "n_weights": W.numel(),
        "loss": float(loss),
        "objective": objective,
        "diagnostics_s": t_diag,
        "percdamp_used": info["percdamp_used"],
        "damp_retries": info["damp_retries"],
        "n_dead": int(dead.sum()),
    }
    # (s, z) per row and group, in the order the groups were fitted (natural order for static groups,
    # visiting order otherwise), ceil(d_in/g) of them; with act_order, ``perm`` maps visiting position ->
    # original column.
    masks = {"scale": torch.cat(scales, dim=1), "zero": torch.cat(zeros, dim=1)}
    if perm is not None:
        masks["perm"] = perm
    return SolveResult(weight=Q, stats=stats, masks=masks)


SOLVER = SolverSpec("gptq", GPTQConfig, solve, validate_options=validate_options,
                    check_shape=check_shape, order=20, stacked_hessian=True,
                    save_formats=("native", "compressed-tensors"))
