"""SpQR (METHODS.md B3): small groups with bilevel statistics, unstructured outliers, OBS sweep.

Order of operations replicates the reference (Vahe1994/SpQR) on identical inputs:
* act-order permutation with the reference's default (unstable) ``argsort(diag H, descending)``, then
  damping with the reference's float32 ``percdamp * abs(torch.diag(H)).mean()`` BEFORE the dead-column fix;
* τ = outlier_threshold · mean_c(var_rows(W[:, c]) / u_c²), from the permuted, dead-fixed W;
* group statistics are fitted on the CURRENT (error-updated) weights at each group start, after a
  leave-one-out (LOO) outlier-aware replacement of likely outliers;
* per column: quantize, mark entries with ((w - ŵ)/u_c)² > τ as outliers (kept exactly, error 0),
  then in-block OBS update in place (the reference's ``addr_``) and a lazy update (``addmm_``) of the
  columns right of the block.

``target_outlier_fraction`` picks the threshold per layer (search in log space, few solves) for
matched-budget comparisons; only the sweep is repeated, H is factorised once.

The one intended difference from the reference: dead columns (diag H = 0) come back as exact zeros in Ŵ
and never as outliers (METHODS.md D.5), where the reference leaves the grid value that its 0-free grid
gives the zeroed column. They never reach the layer output and U decouples them, so nothing else changes.

Shapes: groupsize β1 must divide d_in and, when a second level is used, qq_groupsize β2 must divide d_out
(:func:`check_shape`). Diagnostics: ``objective`` (tr(ΔW H ΔWᵀ), undamped H) comes from the sweep's OBS
errors (O(d_out·d_in)); ``diagnostics=True`` evaluates the plain d_out·d_in² product instead.

Per-row-group Hessians: H may be a stack [G, d_in, d_in] (``oac.solvers.common.solve_row_groups``): the rows are
split into G contiguous groups of d_out/G and each group is an SpQR problem of its own with its H[g]: its own
permutation (diag H[g]), damping, U, τ scale (variance over the group's rows relative to its u²) and, with
``target_outlier_fraction``, its own threshold search (so every group, and the layer, hits the budget). The second
level quantizes statistics over β2 consecutive rows, so β2 must divide d_out/G (checked with the layer shapes: no
β2-group straddles two row groups). Ŵ and ``outliers`` are the groups' stacked in row order; stats: counts,
objective and times are summed, ``outlier_fraction`` is n_outliers / n_weights, the bits are the n_weights-weighted
mean (the bits formula is affine in the outlier fraction, so that is the formula at the layer's fraction),
``outlier_threshold_used`` and ``tau`` are the mean over groups, ``percdamp_used`` and ``n_dead`` the largest,
``target_hit`` holds if it holds in every group, plus ``row_groups``. G = 1 ([1, d_in, d_in]) is the plain path,
bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from oac.errors import ConfigError
from oac.registry import check_choice, check_float, check_int
from oac.solvers import SolverSpec
from oac.quant.bits import spqr_bits
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers.common import (
    SolveResult,
    act_order_permutation,
    check_finite,
    inverse_cholesky,
    MERGE_ALL,
    MERGE_MAX,
    MERGE_MEAN,
    MERGE_SUM,
    MERGE_WMEAN,
    layer_objective,
    obs_objective,
    solve_row_groups,
    sq_dist,
    validate_uniform_config,
)

_LOO_CHUNK = 1 << 22  # elements of the [rows, g, g-1] leave-one-out batch processed at once

# how the stats of row groups combine into the layer's (the other keys are settings, equal in every group)
ROW_GROUP_STATS = {"n_weights": MERGE_SUM, "n_outliers": MERGE_SUM, "outlier_fraction": MERGE_WMEAN,
                   "outlier_threshold_used": MERGE_MEAN, "tau": MERGE_MEAN, "n_solves": MERGE_SUM,
                   "percdamp_used": MERGE_MAX, "damp_retries": MERGE_SUM, "n_dead": MERGE_MAX, "objective": MERGE_SUM,
                   "diagnostics_s": MERGE_SUM, "bits_reported": MERGE_WMEAN, "bits_full": MERGE_WMEAN,
                   "target_hit": MERGE_ALL}


@dataclass
class SpQRConfig:
    wbits: int = 2
    groupsize: int | None = 16  # β1; None or -1: per-channel (β1 = d_in)
    qq_scale_bits: int | None = 3  # None: scales stay 16-bit
    qq_zero_bits: int | None = 3  # None: zeros stay 16-bit
    qq_groupsize: int = 16  # β2, consecutive output rows
    qq_zero_sym: bool = False
    outlier_threshold: float = 1.0  # relative τ; inf: no outliers
    target_outlier_fraction: float | None = None  # if set, τ is chosen per layer to hit this fraction
    target_rel_tol: float = 0.1  # accepted relative deviation from target_outlier_fraction
    max_target_solves: int = 8
    permutation_order: str = "act_order"  # "act_order" | "identity"
    percdamp: float = 1.0
    round_zero: bool = False
    simplified_outliers: bool = False
    sym: bool = False
    blocksize: int = 128
    damp_retry_mode: str = "add"
    damp_retry_step: float = 0.01
    damp_retry_factor: float = 10.0
    max_percdamp: float = 10.0
    # False: stats["objective"] from the sweep's OBS errors (O(d_out·d_in), equal to the plain formula up to
    # float32 rounding, ~1e-5 relative). True: the plain tr(ΔW H ΔWᵀ) (2·d_out·d_in² flops). Never changes Ŵ.
    diagnostics: bool = False


_GROUP_SPEC = ("SpQR needs groupsize to divide d_in: METHODS.md A1 allows groups only for d_in % g == 0 unless a "
               "short last group is defined, which B3 (and its bits formula b + (…)/β1) does not; choose a "
               "divisor or None (per-channel)")


def _group(cfg: SpQRConfig, d_in: int) -> int:
    return d_in if cfg.groupsize in (None, -1) else cfg.groupsize


def _uses_qq(cfg: SpQRConfig) -> bool:
    return cfg.qq_scale_bits is not None or (
        cfg.qq_zero_bits is not None and (not cfg.round_zero or cfg.qq_zero_bits < cfg.wbits)
    )


def validate_options(cfg: SpQRConfig) -> None:
    """Option ranges that need no layer shape (checked before the model is loaded)."""
    check_int("method", "wbits", cfg.wbits, 1, 8)
    check_int("method", "groupsize", cfg.groupsize, 1, allow=(-1, None))
    for field in ("qq_scale_bits", "qq_zero_bits"):
        check_int("method", field, getattr(cfg, field), 1, 16, allow=(None,))
    check_int("method", "qq_groupsize", cfg.qq_groupsize, 1)
    check_choice("method", "permutation_order", cfg.permutation_order, ("act_order", "identity"))
    check_float("method", "outlier_threshold", cfg.outlier_threshold, 0, lo_open=True, allow_inf=True)
    if cfg.target_outlier_fraction is not None:
        check_float("method", "target_outlier_fraction", cfg.target_outlier_fraction, 0, 1, hi_open=True)
    check_float("method", "percdamp", cfg.percdamp, 0)
    check_int("method", "blocksize", cfg.blocksize, 1)
    check_int("method", "max_target_solves", cfg.max_target_solves, 1)
    check_choice("method", "damp_retry_mode", cfg.damp_retry_mode, ("add", "multiply"))



def validate_config(cfg: SpQRConfig, shape: tuple[int, int], name: str = "layer") -> None:
    """The options (:func:`validate_options`) and what SpQR's specification requires of the layer shape."""
    validate_options(cfg)
    d_out, d_in = int(shape[0]), int(shape[1])
    gs = -1 if cfg.groupsize is None else cfg.groupsize
    validate_uniform_config(cfg.wbits, gs, (d_out, d_in), method=f"SpQR {name}", divisor_spec=_GROUP_SPEC)
    if _uses_qq(cfg) and d_out % cfg.qq_groupsize != 0:
        raise ConfigError(
            f"SpQR {name}: qq_groupsize={cfg.qq_groupsize} does not divide d_out={d_out} (layer shape "
            f"{(d_out, d_in)}); METHODS.md B3 FIT_BILEVEL quantizes scales/zeros over groups of qq_groupsize "
            f"consecutive output rows, which requires d_out % qq_groupsize == 0; or set qq_scale_bits and "
            f"qq_zero_bits to None"
        )


def check_shape(cfg: SpQRConfig, d_out: int, d_in: int) -> None:
    """Raise a one-line ConfigError if ``cfg`` cannot quantize a d_out×d_in layer: invalid settings, a
    groupsize β1 that does not divide d_in, or (when a second level is used) a qq_groupsize β2 that does
    not divide d_out. Called by the job before calibration."""
    validate_config(cfg, (int(d_out), int(d_in)))


def _requantize_stat(v: Tensor, bits: int, qq_groupsize: int, sym: bool) -> Tensor:
    """Second level: min-max quantize a [rows, 1] statistic over groups of qq_groupsize consecutive rows."""
    groups = v.reshape(-1, qq_groupsize)
    s2, z2 = fit_minmax(groups, bits, sym=sym, variant="spqr", round_zero=False)
    return fake_quantize(groups, s2, z2, maxq_for(bits), "spqr").reshape(-1, 1)


def fit_bilevel(G: Tensor, cfg: SpQRConfig) -> tuple[Tensor, Tensor]:
    """FIT_BILEVEL: per-row first-level (s, z) of G [rows, g], then the second-level quantization of s and z.

    Returns the dequantized statistics (s̃, z̃), each [rows, 1]. z is computed from the unquantized s.
    """
    s, z = fit_minmax(G, cfg.wbits, sym=cfg.sym, variant="spqr", round_zero=cfg.round_zero)
    if cfg.qq_scale_bits is not None:
        s = _requantize_stat(s, cfg.qq_scale_bits, cfg.qq_groupsize, sym=False)
    if cfg.qq_zero_bits is not None and (not cfg.round_zero or cfg.qq_zero_bits < cfg.wbits):
        z = _requantize_stat(z, cfg.qq_zero_bits, cfg.qq_groupsize, sym=cfg.qq_zero_sym)
    return s, z


def _sq_err(x: Tensor, u: Tensor, bits: int, sym: bool) -> Tensor:
    """Σ over the last dim of ((ŵ - w)/u)² with a plain first-level SpQR-variant fit per row of x."""
    flat = x.reshape(-1, x.shape[-1])
    s, z = fit_minmax(flat, bits, sym=sym, variant="spqr")
    q = fake_quantize(flat, s, z, maxq_for(bits), "spqr").reshape_as(x)
    return ((q - x) / u).square().sum(-1)


def loo_reduction(G: Tensor, u: Tensor, bits: int, sym: bool = False) -> Tensor:
    """LOO_REDUCTION: D[r, m] = base[r] - loo[r, m], the drop of the Hessian-weighted group error of row r
    when w_rm is left out of the (plain, first-level) fit and of the error sum. G [rows, g], u [g]."""
    rows, g = G.shape
    base = _sq_err(G, u, bits, sym).unsqueeze(1)  # [rows, 1]
    if g == 1:
        return base.expand(rows, 1).clone()
    j = torch.arange(g - 1, device=G.device)
    m = torch.arange(g, device=G.device)
    idx = j[None, :] + (j[None, :] >= m[:, None]).long()  # [g, g-1]: row m lists every column but m
    u_loo = u[idx]
    loo = torch.empty(rows, g, device=G.device, dtype=G.dtype)
    step = max(1, _LOO_CHUNK // (g * (g - 1)))
    for r0 in range(0, rows, step):
        loo[r0 : r0 + step] = _sq_err(G[r0 : r0 + step][:, idx], u_loo, bits, sym)
    return base - loo


def _sweep(W0: Tensor, U: Tensor, tau: float, cfg: SpQRConfig) -> tuple[Tensor, Tensor, Tensor, float]:
    """The column sweep of B3 on permuted, dead-fixed W0 with threshold τ (absolute).

    Returns (Ŵ, outliers, e2, t) with e2 [d_in] the float64 Σ_rows e_c² of the scaled OBS errors per column
    and t the wall time spent on e2 (a diagnostic).
    """
    W = W0.clone()
    d_out, d_in = W.shape
    g, B, maxq = _group(cfg, d_in), cfg.blocksize, maxq_for(cfg.wbits)
    u = U.diagonal()
    use_outliers = math.isfinite(tau)
    outliers = torch.zeros_like(W, dtype=torch.bool)
    E = torch.zeros(d_out, B, dtype=W.dtype, device=W.device)
    e2 = torch.empty(d_in, dtype=torch.float64, device=W.device)
    t_e2 = 0.0
    for b0 in range(0, d_in, B):
        b1 = min(b0 + B, d_in)
        for c in range(b0, b1):
            if c % g == 0:
                G = W[:, c : c + g]  # current weights: earlier in-block updates are applied in place
                if use_outliers and not cfg.simplified_outliers:
                    likely = loo_reduction(G, u[c : c + g], cfg.wbits, cfg.sym) > tau
                    keep = (~likely).to(G.dtype)
                    mean = (G * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
                    G = torch.where(likely, mean, G)
                scale, zero = fit_bilevel(G, cfg)
            w = W[:, c : c + 1]
            q = fake_quantize(w, scale, zero, maxq, "spqr")
            e = (w - q) / u[c]
            if use_outliers:
                o = e.square() > tau
                q = torch.where(o, w, q)  # outliers are kept exactly: their error becomes 0
                e = torch.where(o, torch.zeros_like(e), e)
                outliers[:, c : c + 1] = o
            W[:, c : c + 1] = q
            W[:, c + 1 : b1].addr_(e[:, 0], U[c, c + 1 : b1], alpha=-1)  # the reference's in-block update
            E[:, c - b0 : c - b0 + 1] = e
        W[:, b1:].addmm_(E[:, : b1 - b0], U[b0:b1, b1:], alpha=-1)
        t0 = time.perf_counter()
        e2[b0:b1] = E[:, : b1 - b0].double().square().sum(0)
        t_e2 += time.perf_counter() - t0
    return W, outliers, e2, t_e2


def permutation(H: Tensor, order: str) -> Tensor:
    """The column order of the sweep: ``act_order`` is the reference's default (unstable) argsort of diag H,
    descending (ties in that sort's order, METHODS.md A6); ``identity`` keeps the natural order."""
    if order == "act_order":
        return act_order_permutation(H)
    return torch.arange(H.shape[0], device=H.device)


def _search_threshold(run, start: float, target: float, cfg: SpQRConfig):
    """Choose the relative threshold so that the outlier fraction is within ±target_rel_tol of target.

    Bisection in log(threshold) on a bracket [a, b] (fraction(a) > target > fraction(b)); the trial point
    is the log-log interpolation of the bracket ends, kept inside the middle 80% of the bracket, or a
    geometric step of the same slope (fraction ~ τ^-1.5, B3 table) while one side is still missing.
    Returns (threshold, run(threshold), n_solves, hit) of the solve closest to the target (run(t)[2] is the
    outlier fraction).
    """
    slope = 1.5
    thr, a, b, best, n = start, None, None, None, 0
    for n in range(1, cfg.max_target_solves + 1):
        res = run(thr)
        f = res[2]
        dev = abs(f - target) / target
        if best is None or dev < best[0]:
            best = (dev, thr, res)
        if dev <= cfg.target_rel_tol:
            break
        x = math.log(thr)
        if f > target:
            a = (x, f)
        else:
            b = (x, f)
        if a is not None and b is not None:
            lo, hi = a[0], b[0]
            if b[1] > 0:
                t = (math.log(a[1]) - math.log(target)) / (math.log(a[1]) - math.log(b[1]))
                t = min(max(t, 0.1), 0.9)
            else:
                t = 0.5
            x = lo + t * (hi - lo)
        elif a is not None:
            x = x + min(max(math.log(f / target) / slope, 0.05), math.log(100.0))
        else:
            x = x - (min(max(math.log(target / f) / slope, 0.05), math.log(100.0)) if f > 0 else math.log(8.0))
        thr = math.exp(x)
    return best[1], best[2], n, best[0] <= cfg.target_rel_tol


def solve(W: Tensor, H: Tensor, cfg: SpQRConfig, name: str = "layer") -> SolveResult:
    validate_config(cfg, tuple(W.shape), name)
    check_finite(W, H, name)
    if H.dim() == 3:  # one Hessian per contiguous row group
        if H.shape[0] > 1:
            res = solve_row_groups(solve, W, H, cfg, name, ROW_GROUP_STATS)
            res.stats["outlier_fraction"] = res.stats["n_outliers"] / res.stats["n_weights"]  # exact, not a mean
            return res
        H = H[0]
    W_orig = W.detach().float()
    H_orig = H.detach().to(W.device).float()
    d_out, d_in = W_orig.shape
    n_weights = d_out * d_in

    perm = permutation(H_orig, cfg.permutation_order)
    Wp = W_orig.index_select(1, perm)  # = W[:, perm], a copy (index_select gathers columns faster on CPU)
    U, dead, info = inverse_cholesky(
        H_orig.index_select(0, perm).index_select(1, perm), cfg.percdamp, order="damp_then_dead",
        retry_mode=cfg.damp_retry_mode, retry_step=cfg.damp_retry_step, retry_factor=cfg.damp_retry_factor,
        max_percdamp=cfg.max_percdamp, overwrite=True,
    )  # fmt: skip
    Wp[:, dead] = 0.0
    # unbiased variance over rows of each column, relative to u_c²; W before any update
    tau_scale = float((Wp.var(dim=0) / U.diagonal().square()).mean()) if d_out > 1 else 0.0

    def run(thr: float):
        tau = math.inf if math.isinf(thr) else thr * tau_scale
        Q, mask, e2, t_e2 = _sweep(Wp, U, tau, cfg)
        return Q, mask, int(mask.sum()) / n_weights, e2, t_e2

    target = cfg.target_outlier_fraction
    n_solves, hit = 1, None
    if target is None:
        thr = float(cfg.outlier_threshold)
        Q, mask, frac, e2, t_e2 = run(thr)
    elif target == 0:
        thr = math.inf
        Q, mask, frac, e2, t_e2 = run(thr)
        hit = True
    else:
        start = cfg.outlier_threshold if math.isfinite(cfg.outlier_threshold) else 1.0
        thr, (Q, mask, frac, e2, t_e2), n_solves, hit = _search_threshold(run, float(start), float(target), cfg)
    live = ~dead
    t0 = time.perf_counter()
    if not cfg.diagnostics:  # live columns only: dead ones are decoupled in H_d and absent from H
        objective = obs_objective(float(e2[live].sum()), info["damp"], sq_dist(Wp, Q, live))
    t_diag = t_e2 + time.perf_counter() - t0  # (e2 of the kept solve only, with target_outlier_fraction)

    # Dead columns never reach the output and U decouples them, so their values do not feed back. The
    # reference leaves grid values there (0 is not forced into SpQR's grid); return exact zeros (D.5): the
    # one intended difference from the reference.
    Q[:, dead] = 0.0
    mask[:, dead] = False
    frac = int(mask.sum()) / n_weights
    inv = torch.argsort(perm)
    Q, mask = Q.index_select(1, inv), mask.index_select(1, inv)
    if cfg.diagnostics:
        t0 = time.perf_counter()
        objective = layer_objective(W_orig, Q, H_orig)
        t_diag += time.perf_counter() - t0
    g = _group(cfg, d_in)
    bits = spqr_bits(cfg.wbits, g, cfg.qq_groupsize, frac, qq_scale_bits=cfg.qq_scale_bits,
                     qq_zero_bits=cfg.qq_zero_bits, round_zero=cfg.round_zero)
    stats = {
        "wbits": cfg.wbits,
        "groupsize": g,
        "qq_groupsize": cfg.qq_groupsize,
        "n_weights": n_weights,
        "n_outliers": int(mask.sum()),
        "outlier_fraction": frac,
        "outlier_threshold_used": thr,
        "tau": thr * tau_scale if math.isfinite(thr) else math.inf,
        "n_solves": n_solves,
        "percdamp_used": info["percdamp_used"],
        "damp_retries": info["damp_retries"],
        "n_dead": int(dead.sum()),
        "objective": objective,
        "diagnostics_s": t_diag,
        "bits_nominal": float(cfg.wbits),
        "bits_reported": bits,
        "bits_full": bits,
    }
    if target is not None:
        stats["target_outlier_fraction"] = float(target)
        stats["target_hit"] = bool(hit)
    return SolveResult(weight=Q, stats=stats, masks={"outliers": mask})


SOLVER = SolverSpec("spqr", SpQRConfig, solve, validate_options=validate_options,
                    check_shape=check_shape, order=30, stacked_hessian=True)
