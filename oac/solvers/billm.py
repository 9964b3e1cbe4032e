"""BiLLM (METHODS.md B4): residual binarization with salient columns and a magnitude split, per block.

Replicates the reference (Aaronhuang-778/BiLLM): dead-column fix, then the reference's float32 damping
``percdamp * torch.mean(torch.diag(H))``; per block of B columns (the last one shorter) the saliency
S = Wb²/u² (u = diag of the upper Cholesky factor of H⁻¹) drives SEARCH, the WEIGHTS are binarized
with per-row statistics inside the block, and the block error is fed only to later blocks
(``intra_block_feedback=True``: column by column with the in-block OBS update instead). BIN's per-row
statistics are the reference's nanmean form Σ/n.

The one intended difference from the reference: dead columns (diag H = 0) come back as exact zeros in Ŵ
(METHODS.md D.5), where the reference leaves the μ ± α that BIN gives the zeroed column. They never reach
the layer output and U decouples them, so nothing else changes.

Any shape is accepted (:func:`check_shape` rejects only invalid settings). Diagnostics: the block-wise
feedback breaks the OBS identity that gives GPTQ/SpQR a cheap objective, so ``objective`` (tr(ΔW H ΔWᵀ))
is computed, with the plain d_out·d_in² product, only with ``diagnostics=True``.

Per-row-group Hessians ([G, d_in, d_in] stacks, ``guided`` with groups > 1) are refused before the model loads
(``SolverSpec.stacked_hessian`` False); a [1, d_in, d_in] stack is the plain H. Why: BiLLM's salient columns are
structured — SEARCH scores every column over *all rows* of a block and picks k* whole columns, stored as one
column bitmap per block shared by the rows (the 1/d_out term of the bits), and the split thresholds are quantiles
over the whole block. With a Hessian per row group the saliency S = W²/u_g² would come from G different factors
U_g: solving the groups separately would choose G different column sets (another bit accounting, no longer
BiLLM's structure), and one search over the stacked S would mix scales of different Hessians (S is only defined up
to each H_g's normalisation, C3), so neither reproduces BiLLM; no reference defines the combination.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from oac.errors import ConfigError
from oac.registry import check_choice, check_float, check_int
from oac.solvers import SolverSpec
from oac.quant.bits import billm_bits
from oac.solvers.common import HessianError, SolveResult, check_finite, inverse_cholesky, layer_objective

_BATCH_ELEMS = 1 << 24  # elements of a batched [k, rows, cols] tensor in the GPU salient-column search


@dataclass
class BiLLMConfig:
    blocksize: int = 128
    percdamp: float = 0.01
    salient_metric: str = "hessian"  # "hessian": S = Wb²/u²; "magnitude": S = Wb
    search_on: str = "saliency"  # "saliency": errors/quantiles on S (reference); "weights": on Wb
    intra_block_feedback: bool = False
    max_salient_cols: int = 49
    n_quantiles: int = 81
    damp_retry_mode: str = "add"
    damp_retry_step: float = 0.01
    damp_retry_factor: float = 10.0
    max_percdamp: float = 10.0
    # True: add stats["objective"] = tr(ΔW H ΔWᵀ) by the plain formula (2·d_out·d_in² flops, ~10 % of a
    # 4096×11008 solve on one CPU thread). False: no objective. Never changes Ŵ.
    diagnostics: bool = False


def validate_options(cfg: BiLLMConfig) -> None:
    """Option ranges that need no layer shape (checked before the model is loaded)."""
    check_choice("method", "salient_metric", cfg.salient_metric, ("hessian", "magnitude"))
    check_choice("method", "search_on", cfg.search_on, ("saliency", "weights"))
    check_int("method", "blocksize", cfg.blocksize, 1)
    check_int("method", "n_quantiles", cfg.n_quantiles, 1)
    check_int("method", "max_salient_cols", cfg.max_salient_cols, 0)
    check_float("method", "percdamp", cfg.percdamp, 0)
    check_choice("method", "damp_retry_mode", cfg.damp_retry_mode, ("add", "multiply"))



def validate_config(cfg: BiLLMConfig, name: str = "layer") -> None:
    validate_options(cfg)


def check_shape(cfg: BiLLMConfig, d_out: int, d_in: int) -> None:
    """Raise a one-line ConfigError if ``cfg`` cannot quantize a d_out×d_in layer.

    BiLLM accepts every shape: blocks are B consecutive columns with a shorter last block, and the salient
    search caps k at n_cols − 1 (the reference needs >= 50 columns per block; this project does not), so only
    invalid settings are rejected. Called by the job before calibration.
    """
    validate_config(cfg, f"{int(d_out)}x{int(d_in)} layer")


def binarize(X: Tensor, M: Tensor, order: int) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """BIN(X, M, order): residual binarization on mask M with per-row (μ, α) over the last dim.

    X and M broadcast (e.g. X [1, rows, cols] with M [K, 1, cols] batches K column masks). Returns the
    approximation A (zero outside M) and the statistics [(μ_1, α_1), ...], each [..., rows, 1].
    """
    Mf = M.to(X.dtype)
    n = Mf.sum(-1, keepdim=True)
    empty = n == 0
    n = n.clamp(min=1)
    A = torch.zeros(torch.broadcast_shapes(X.shape, M.shape), dtype=X.dtype, device=X.device)
    stats = []
    for _ in range(order):
        R = X * Mf - A
        # nanmean over the mask, as the reference: Σ / n (0 for an empty mask), not Σ·(1/n)
        mu = ((R * Mf).sum(-1, keepdim=True) / n).masked_fill_(empty, 0.0)
        D = R - mu
        alpha = ((D.abs() * Mf).sum(-1, keepdim=True) / n).masked_fill_(empty, 0.0)
        A = A + (alpha * torch.sign(D) + mu) * Mf
        stats.append((mu, alpha))
    return A, stats


def apply_binarization(x: Tensor, stats: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Binarize values x [rows, k] with fixed per-row statistics from ``binarize`` (same residual recursion)."""
    A = torch.zeros_like(x)
    for mu, alpha in stats:
        A = A + alpha * torch.sign(x - A - mu) + mu
    return A


def _salient_errors(Xs: Tensor, k_max: int, batched: bool) -> Tensor:
    """err_k = mean (X - BIN(X, M_k, 2) - BIN(X, ¬M_k, 2))² for k = 1..k_max, with the columns of Xs sorted
    by salience so that M_k = the first k columns.

    ``batched`` evaluates chunks of k at once with masks (few large kernels, for GPUs); otherwise a loop
    over k binarizes the two dense column slices (no masked-out work: ~4x faster on CPU). Same values
    up to floating-point summation order.
    """
    rows, ncols = Xs.shape
    if not batched:
        def part(Y: Tensor) -> Tensor:
            for _ in range(2):
                D = Y - Y.mean(1, keepdim=True)
                Y = D - D.abs().mean(1, keepdim=True) * torch.sign(D)
            return Y.square().sum()

        return torch.stack([part(Xs[:, :k]) + part(Xs[:, k:]) for k in range(1, k_max + 1)]) / Xs.numel()
    errs = []
    step = max(1, _BATCH_ELEMS // (rows * ncols))
    cols = torch.arange(ncols, device=Xs.device)
    for k0 in range(1, k_max + 1, step):
        ks = torch.arange(k0, min(k0 + step, k_max + 1), device=Xs.device)
        M = (cols[None, :] < ks[:, None])[:, None, :]  # [k, 1, cols]
        Mf = M.to(Xs.dtype)
        n1 = ks.to(Xs.dtype)[:, None, None]
        n2 = ncols - n1
        R = Xs[None]
        for _ in range(2):  # both parts at once: R <- (R - μ) - α·sign(R - μ), μ/α of the element's part
            s1 = (R * Mf).sum(-1, keepdim=True)
            D = R - torch.where(M, s1 / n1, (R.sum(-1, keepdim=True) - s1) / n2)
            aD = D.abs()
            t1 = (aD * Mf).sum(-1, keepdim=True)
            R = D - torch.where(M, t1 / n1, (aD.sum(-1, keepdim=True) - t1) / n2) * torch.sign(D)
        errs.append(R.square().mean((1, 2)))
    return torch.cat(errs)


def search(S: Tensor, X: Tensor | None = None, max_salient_cols: int = 49, n_quantiles: int = 81):
    """SEARCH: (M_sal, M_sp, M_co) masks of a block, partitioning it.

    Salient columns are ranked by Σ_rows |S|; errors, quantiles and the split are computed on X (X = S
    reproduces the reference; X = Wb is the ``search_on='weights'`` option). All candidates k = 1..k_max
    and all ``n_quantiles`` thresholds are scored (see the helpers); ties resolve to the first minimum.
    """
    X = S if X is None else X
    rows, ncols = X.shape
    order = torch.argsort(S.abs().sum(0), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(ncols, device=S.device)
    k_max = min(max_salient_cols, ncols - 1)
    k_star = 0
    if k_max >= 1:  # structured search: order 2 on both the salient columns and the rest
        errs = _salient_errors(X[:, order], k_max, batched=X.is_cuda)
        k_star = int(torch.argmin(errs)) + 1
    sal = (rank < k_star)[None, :].expand(rows, ncols).clone()
    rest = ~sal
    absX = X.abs()
    ps = torch.linspace(0.10, 0.90, n_quantiles, device=X.device, dtype=X.dtype)
    thresholds = torch.quantile((absX * rest).flatten(), ps)  # salient positions contribute zeros
    # the salient error is the same for every threshold: it does not change the argmin
    errs = _split_errors(X[:, order[k_star:]], thresholds)
    t_star = thresholds[int(torch.argmin(errs))]
    sp = (absX >= t_star) & rest
    co = (absX < t_star) & rest
    return sal, sp, co


def _split_errors(Xr: Tensor, thresholds: Tensor) -> Tensor:
    """Σ (x - BIN(x, co, 1) - BIN(x, sp, 1))² over Xr [rows, n] for every threshold t, in closed form.

    co = {|x| < t} is a value interval (-t, t) and sp = {|x| >= t} its two tails, so with each row sorted
    by value and prefix sums of x and x², every part's n, Σx, Σx², Σ|x - μ| and the count n0 of
    x == μ (sign 0) follow from searchsorted. Per part: err = Σx² - nμ² - α²(n + n0), α = Σ|x - μ|/n.
    Equal to the direct evaluation of the spec up to floating-point rounding (sums in float64).
    """
    rows, n = Xr.shape
    T = thresholds.numel()
    V = torch.sort(Xr, dim=1).values
    V64 = V.double()
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=Xr.device)
    P1 = torch.cat([zero, V64.cumsum(1)], 1)
    P2 = torch.cat([zero, V64.square().cumsum(1)], 1)
    t = thresholds.to(V.dtype)[None, :].expand(rows, T).contiguous()
    lo = torch.searchsorted(V, -t, right=True)  # co = positions [lo, hi): -t < x < t
    hi = torch.searchsorted(V, t, right=False)
    end = torch.full_like(lo, n)
    beg = torch.zeros_like(lo)

    def psum(P: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return P.gather(1, b) - P.gather(1, a)

    def abs_dev(m: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ |x - m|, #(x == m)) over sorted positions [a, b) per row."""
        j0 = torch.minimum(torch.maximum(torch.searchsorted(V64, m, right=False), a), b)
        j1 = torch.minimum(torch.maximum(torch.searchsorted(V64, m, right=True), a), b)
        below = m * (j0 - a) - psum(P1, a, j0)
        above = psum(P1, j1, b) - m * (b - j1)
        return below + above, (j1 - j0).double()

    def part_error(ranges: list[tuple[Tensor, Tensor]]) -> Tensor:
        cnt = sum((b - a).double() for a, b in ranges)
        s1 = sum(psum(P1, a, b) for a, b in ranges)
        s2 = sum(psum(P2, a, b) for a, b in ranges)
        inv = torch.where(cnt > 0, 1.0 / cnt.clamp(min=1), torch.zeros_like(cnt))
        mu = s1 * inv
        dev, n0 = zip(*(abs_dev(mu, a, b) for a, b in ranges))
        alpha = sum(dev) * inv
        return s2 - cnt * mu.square() - alpha.square() * (cnt + sum(n0))

    err = part_error([(lo, hi)]) + part_error([(beg, lo), (hi, end)])
    return err.sum(0)


def solve(W: Tensor, H: Tensor, cfg: BiLLMConfig, name: str = "layer") -> SolveResult:
    validate_config(cfg, name)
    check_finite(W, H, name)
    if H.dim() == 3:
        if H.shape[0] > 1:
            raise HessianError(f"{name}: BiLLM takes one Hessian per layer, got {H.shape[0]} row-group Hessians "
                               f"(its salient columns are chosen over all rows of a block)")
        H = H[0]
    W_orig = W.detach().float()
    H_orig = H.detach().to(W.device).float()
    W = W_orig.clone()
    d_out, d_in = W.shape
    B = cfg.blocksize
    U, dead, info = inverse_cholesky(
        H_orig, cfg.percdamp, order="dead_then_damp", retry_mode=cfg.damp_retry_mode,
        retry_step=cfg.damp_retry_step, retry_factor=cfg.damp_retry_factor, max_percdamp=cfg.max_percdamp,
    )  # fmt: skip  (a copy: H_orig may be the caller's tensor)
    W[:, dead] = 0.0
    u = U.diagonal()
    salient = torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, d_in, B):
        b1 = min(b0 + B, d_in)
        Wb = W[:, b0:b1].clone()  # current: includes the updates from earlier blocks
        S = Wb.square() / u[b0:b1].square() if cfg.salient_metric == "hessian" else Wb
        X = S if cfg.search_on == "saliency" else Wb
        sal, sp, co = search(S, X, cfg.max_salient_cols, cfg.n_quantiles)
        salient[:, b0:b1] = sal
        parts = [(co, *binarize(Wb, co, 1)), (sp, *binarize(Wb, sp, 1)), (sal, *binarize(Wb, sal, 2))]
        if not cfg.intra_block_feedback:
            Qb = parts[0][1] + parts[1][1] + parts[2][1]
            E = (Wb - Qb) / u[b0:b1]
        else:  # column by column with fixed masks and statistics, in-block OBS update (A4)
            Qb, E = torch.zeros_like(Wb), torch.zeros_like(Wb)
            for j in range(b1 - b0):
                w = Wb[:, j : j + 1]
                q = sum(torch.where(m[:, j : j + 1], apply_binarization(w, st), 0.0) for m, _, st in parts)
                e = (w - q) / u[b0 + j]
                Wb[:, j + 1 :].addmm_(e, U[b0 + j : b0 + j + 1, b0 + j + 1 : b1], alpha=-1)
                Qb[:, j : j + 1], E[:, j : j + 1] = q, e
        W[:, b0:b1] = Qb
        W[:, b1:].addmm_(E, U[b0:b1, b1:], alpha=-1)

    # Dead columns never reach the output and U decouples them; BIN gives them μ ± α, return zeros (D.5).
    W[:, dead] = 0.0
    n_weights = d_out * d_in
    n_salient = int(salient.sum())
    r = n_salient / n_weights
    reported, full = billm_bits(r, B, d_out, d_in)
    stats = {
        "n_weights": n_weights,
        "n_salient": n_salient,
        "salient_fraction": r,
        "blocksize": B,
        "bits_nominal": 1.0,
        "bits_reported": reported,
        "bits_full": full,
        "percdamp_used": info["percdamp_used"],
        "damp_retries": info["damp_retries"],
        "n_dead": int(dead.sum()),
    }
    t0 = time.perf_counter()
    if cfg.diagnostics:
        stats["objective"] = layer_objective(W_orig, W, H_orig)
    stats["diagnostics_s"] = time.perf_counter() - t0
    return SolveResult(weight=W, stats=stats, masks={"salient": salient})


SOLVER = SolverSpec("billm", BiLLMConfig, solve, validate_options=validate_options,
                    check_shape=check_shape, order=40)
