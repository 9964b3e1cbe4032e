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
    if not all_finite(W):
        raise HessianError(f"{name}: weight contains NaN/Inf; refusing to quantize")
    if H is not None:
        if H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
            raise HessianError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
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

