"""Shared solver machinery: result type, input checks, Hessian preparation (METHODS.md A3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from oac.errors import ConfigError

log = logging.getLogger(__name__)


class HessianError(ValueError):
    """A Hessian (or weight) that no solver can use: non-finite, or not factorisable after retries."""


@dataclass
class SolveResult:
    """What every solver returns.

    ``weight`` is the dequantized ("fake-quantized") matrix in fp32, same shape as the input.
    ``stats`` holds scalar diagnostics and bit-accounting ingredients (all plain Python numbers).
    ``masks`` holds optional boolean/int tensors worth saving (outlier mask, salient mask, codes).
    """

    weight: Tensor
    stats: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)


def all_finite(x: Tensor) -> bool:
    """True iff every entry of ``x`` is finite. A finite sum proves it at the cost of one reduction (a NaN or
    Inf entry makes the sum non-finite); only a non-finite sum (possibly a mere overflow) needs the
    element-wise ``isfinite`` pass, which costs several times more on large Hessians."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def check_finite(W: Tensor, H: Tensor | None, name: str = "layer") -> None:
    """W finite; H None, or finite and [d_in, d_in], or a stack [G, d_in, d_in] whose G divides d_out."""
    if not all_finite(W):
        raise HessianError(f"{name}: weight contains NaN/Inf; refusing to quantize")
    if H is not None:
        square = H.dim() in (2, 3) and H.shape[-1] == H.shape[-2] == W.shape[1]
        if not square or (H.dim() == 3 and (H.shape[0] < 1 or W.shape[0] % H.shape[0])):
            raise HessianError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}"
                               + (" (a stack [G, d_in, d_in] needs G to divide d_out)" if H.dim() == 3 else ""))
        if not all_finite(H):
            raise HessianError(f"{name}: Hessian contains NaN/Inf (overflowed calibration statistics?)")


def layer_objective(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the quadratic layer objective that all GPTQ-family solvers minimise.

    The plain formula costs 2·d_out·d_in² flops, as much as a GPTQ solve; solvers compute it only with
    ``diagnostics=True`` and otherwise use :func:`obs_objective` where it applies.
    """
    D = (W.float() - Wq.float())
    return float(torch.einsum("ij,jk,ik->", D, H.float(), D))


def sq_dist(A: Tensor, B: Tensor, cols: Tensor | None = None, chunk: int = 128) -> float:
    """Σ (A - B)² over the columns where ``cols`` (bool [d_in]) is True.

    float32 differences and BLAS dot products per chunk of columns, accumulated in float64 across chunks:
    ~1e-6 relative, at about the cost of reading A and B once (a float64 copy costs ~15× more).
    """
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for c0 in range(0, A.shape[1], chunk):
        D = A[:, c0 : c0 + chunk] - B[:, c0 : c0 + chunk]  # contiguous
        if cols is not None and not bool(cols[c0 : c0 + chunk].all()):
            D[:, ~cols[c0 : c0 + chunk]] = 0.0
        D = D.view(-1)
        total += torch.dot(D, D).double()
    return float(total)


def obs_objective(e2: float, damp: float, delta2: float) -> float:
    """tr(ΔW H ΔWᵀ) of the undamped H from quantities an OBS sweep already has (O(d_out·d_in)).

    With H_d = H + λI = U⁻¹U⁻ᵀ (on the live columns) and the sweep's scaled errors E, the sweep gives
    ΔW = E·U exactly in exact arithmetic (each column's error is fed forward through its row of U; kept
    outliers have e = 0 and ŵ = w), so tr(ΔW H_d ΔWᵀ) = ‖E‖² and tr(ΔW H ΔWᵀ) = ‖E‖² − λ‖ΔW‖². Dead columns
    (zero rows/columns of H) are left out of both sums by the caller. In float32 arithmetic the identity
    holds to the rounding of the weight updates (~1e-5 relative), not bit for bit.
    """
    return e2 - damp * delta2


def act_order_permutation(H: Tensor) -> Tensor:
    """Columns by decreasing diag(H), exactly the references' call (GPTQ and SpQR): the default, *unstable*
    ``torch.argsort(torch.diag(H), descending=True)`` of the contiguous diagonal copy. Ties come out in
    whatever order that sort gives (METHODS.md A6). ``H`` may also be that diagonal itself (1-D)."""
    return torch.argsort(torch.diag(H) if H.dim() == 2 else H.contiguous(), descending=True)


def inverse_cholesky(
    H: Tensor,
    percdamp: float,
    *,
    order: str = "dead_then_damp",
    retry_mode: str = "add",
    retry_step: float = 0.01,
    retry_factor: float = 10.0,
    max_percdamp: float = 10.0,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor, dict]:
    """Dead-column fix, relative damping and upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU).

    ``order`` replicates the references with their own expressions, evaluated in float32 on the contiguous
    diagonal copy ``torch.diag(H)``:
    * ``dead_then_damp`` (GPTQ, BiLLM): ``H[dead, dead] = 1``, then ``damp = percdamp * torch.mean(torch.diag(H))``
      (the mean includes the 1's of dead columns) and ``H[diag, diag] += damp``;
    * ``damp_then_dead`` (SpQR): ``H[diag, diag] += percdamp * abs(torch.diag(H)).mean()`` on the raw diagonal,
      then ``H[dead, dead] = 1`` overwrites the damped dead entries.

    When a factorisation fails the damping is raised (``retry_mode`` ``add``: +retry_step, the
    project default of METHODS.md A3; ``multiply``: ×retry_factor) until it succeeds or passes
    ``max_percdamp``; each try re-damps the undamped diagonal with the same expression. ``overwrite=True``
    lets the function work in ``H`` itself (a float32 tensor the caller owns and no longer needs; it is
    left damped) instead of a copy. Returns (U, dead mask, info) with info = {percdamp_used, damp_retries,
    damp}, ``damp`` being the float32 λ actually added to the diagonal (as a Python float, exact).
    """
    if order not in ("dead_then_damp", "damp_then_dead"):
        raise ValueError(f"unknown damping order {order!r}")
    if not all_finite(H):
        raise HessianError("Hessian contains NaN/Inf")
    if overwrite and H.dtype == torch.float32:
        H = H.detach()
    else:
        H = H.detach().float().clone()
    n = H.shape[0]
    diag = torch.arange(n, device=H.device)
    dead = torch.diag(H) == 0
    if order == "dead_then_damp":
        H[dead, dead] = 1.0
        base = torch.diag(H)  # undamped diagonal, restored before every retry
        mean = torch.mean(base)
    else:
        base = torch.diag(H)
        mean = abs(base).mean()
    if float(mean) == 0:
        mean = torch.ones_like(mean)  # all-zero diagonal: damp with 1·percdamp (the references would fail)
    p, retries = float(percdamp), 0
    while True:
        damp = p * mean
        if retries:
            H[diag, diag] = base
        H[diag, diag] += damp
        if order == "damp_then_dead":
            H[dead, dead] = 1.0
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L  # free d_in² intermediates as soon as possible (large layers, GPU)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info2) == 0 and all_finite(U):
                if retries:
                    log.warning("Cholesky needed %d damping retries; percdamp %.4g -> %.4g", retries, percdamp, p)
                return U, dead, {"percdamp_used": p, "damp_retries": retries, "damp": float(damp)}
            del U
        else:
            del L
        retries += 1
        p = p + retry_step if retry_mode == "add" else (p * retry_factor if p > 0 else retry_step)
        if p > max_percdamp:
            raise HessianError(
                f"Hessian is not positive definite even with percdamp={p:.4g} > max_percdamp={max_percdamp}"
            )


def validate_uniform_config(
    wbits: int, groupsize: int, shape: tuple[int, int], method: str = "solver", *, divisor_spec: str | None = None
) -> None:
    """Shared RTN/GPTQ/SpQR checks: 1 <= wbits <= 8 and groupsize -1 (per-channel) or a positive integer.

    Any d_in is accepted (the last group of a row may be shorter, as in the GPTQ reference) unless
    ``divisor_spec`` names the specification that requires groupsize to divide d_in (SpQR).
    """
    if isinstance(wbits, bool) or not isinstance(wbits, int) or not 1 <= wbits <= 8:
        raise ConfigError(f"{method}: wbits must be an integer in 1..8, got {wbits!r}")
    d_out, d_in = int(shape[0]), int(shape[1])
    if isinstance(groupsize, bool) or not isinstance(groupsize, int):
        raise ConfigError(f"{method}: groupsize must be an integer (-1 for per-channel), got {groupsize!r}")
    if groupsize != -1 and groupsize <= 0:
        raise ConfigError(f"{method}: groupsize={groupsize} must be -1 (per-channel) or a positive integer "
                          f"(layer shape {(d_out, d_in)})")
    if divisor_spec and groupsize != -1 and d_in % groupsize:
        raise ConfigError(f"{method}: groupsize={groupsize} does not divide d_in={d_in} (layer shape "
                          f"{(d_out, d_in)}); {divisor_spec}")



# ----------------------------------------------------------------------------- per-row-group Hessians

# A Hessian may be a stack [G, d_in, d_in]: the d_out rows of W are split into G contiguous groups of d_out/G
# rows (G must divide d_out), and row group g — rows [g·d_out/G, (g+1)·d_out/G) — is solved with H[g] as a layer
# of its own (GuidedQuant's rule; ``oac/hessian/guided.py``). A [1, d_in, d_in] stack is the plain [d_in, d_in]
# H. Solvers that accept stacks (``SolverSpec.stacked_hessian``) call :func:`solve_row_groups`.

MERGE_SUM = "sum"  # counts, times, objectives
MERGE_MAX = "max"  # damping actually used, dead columns (the most of any group)
MERGE_MEAN = "mean"  # per-group values of equal weight (thresholds); groups have equal sizes
MERGE_WMEAN = "wmean"  # fractions and bits: weighted by n_weights
MERGE_ALL = "all"  # booleans: every group
MERGE_SAME = "same"  # settings: equal in every group


def row_groups(H: Tensor | None) -> int:
    """Number of row groups of a Hessian: 1 for None or [d_in, d_in], G for a stack [G, d_in, d_in]."""
    return 1 if H is None or H.dim() == 2 else int(H.shape[0])


def row_slices(d_out: int, G: int) -> list[slice]:
    """The rows of each group: G contiguous blocks of d_out/G rows."""
    if G < 1 or d_out % G:
        raise ConfigError(f"{G} row groups do not divide d_out={d_out}")
    r = d_out // G
    return [slice(g * r, (g + 1) * r) for g in range(G)]


def merge_stats(parts: list[dict], rules: dict[str, str]) -> dict:
    """One layer's stats from its row groups' stats (``rules``: key -> MERGE_*; keys without a rule must agree)."""
    out = {}
    weights = [p.get("n_weights", 1) for p in parts]
    for key in parts[0]:
        vals = [p[key] for p in parts]
        rule = rules.get(key, MERGE_SAME)
        if rule == MERGE_SUM:
            out[key] = sum(vals)
        elif rule == MERGE_MAX:
            out[key] = max(vals)
        elif rule == MERGE_MEAN:
            out[key] = sum(vals) / len(vals)
        elif rule == MERGE_WMEAN:
            out[key] = sum(v * w for v, w in zip(vals, weights)) / sum(weights)
        elif rule == MERGE_ALL:
            out[key] = all(vals)
        else:
            if any(v != vals[0] for v in vals[1:]):
                raise ValueError(f"row groups disagree on stats[{key!r}]: {vals}")
            out[key] = vals[0]
    return out


def solve_row_groups(solve, W: Tensor, H: Tensor, cfg, name: str, rules: dict[str, str],
                     stacked_masks: tuple[str, ...] = ("perm",)) -> SolveResult:
    """Solve each row group of W with its own H[g] (``solve`` on [d_out/G, d_in] and [d_in, d_in]) and merge.

    Ŵ and the row-indexed masks (scales, zeros, outliers, ...) are the groups' stacked in row order; the masks
    named in ``stacked_masks`` (a column permutation per group) become [G, ...]; stats by ``rules``
    (:func:`merge_stats`) plus ``row_groups`` = G.
    """
    G = row_groups(H)
    parts = [solve(W[rows], H[g], cfg, f"{name} rows {rows.start}:{rows.stop}")
             for g, rows in enumerate(row_slices(W.shape[0], G))]
    weight = torch.cat([p.weight for p in parts], dim=0)
    masks = {k: (torch.stack if k in stacked_masks else torch.cat)([p.masks[k] for p in parts], dim=0)
             for k in parts[0].masks}
    stats = merge_stats([p.stats for p in parts], rules)
    stats["row_groups"] = G
    return SolveResult(weight=weight, stats=stats, masks=masks)
