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


def check_finite(W: Tensor, H: Tensor | None, name: str = "layer") -> None:
    if not torch.isfinite(W).all():
        raise HessianError(f"{name}: weight contains NaN/Inf; refusing to quantize")
    if H is not None:
        if H.shape[0] != H.shape[1] or H.shape[0] != W.shape[1]:
            raise HessianError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
        if not torch.isfinite(H).all():
            raise HessianError(f"{name}: Hessian contains NaN/Inf (overflowed calibration statistics?)")


def layer_objective(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the quadratic layer objective that all GPTQ-family solvers minimise."""
    D = (W.float() - Wq.float())
    return float(torch.einsum("ij,jk,ik->", D, H.float(), D))


def act_order_permutation(H: Tensor) -> Tensor:
    """Columns by decreasing diag(H), exactly the references' call (GPTQ and SpQR): the default, *unstable*
    ``torch.argsort(torch.diag(H), descending=True)`` of the contiguous diagonal copy. Ties come out in
    whatever order that sort gives (METHODS.md A6)."""
    return torch.argsort(torch.diag(H), descending=True)


def inverse_cholesky(
    H: Tensor,
    percdamp: float,
    *,
    order: str = "dead_then_damp",
    retry_mode: str = "add",
    retry_step: float = 0.01,
    retry_factor: float = 10.0,
    max_percdamp: float = 10.0,
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
    ``max_percdamp``; each try re-damps the undamped diagonal with the same expression. Returns (U, dead
    mask, info) with info = {percdamp_used, damp_retries, damp}, ``damp`` being the float32 λ actually added
    to the diagonal (as a Python float, exact).
    """
    if order not in ("dead_then_damp", "damp_then_dead"):
        raise ValueError(f"unknown damping order {order!r}")
    if not torch.isfinite(H).all():
        raise HessianError("Hessian contains NaN/Inf")
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
            if int(info2) == 0 and torch.isfinite(U).all():
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

