"""RTN: round-to-nearest with the GPTQ-variant min-max grid (METHODS.md B1).

No calibration: each row (or each group of ``groupsize`` consecutive columns of a row) is fitted on
the original weights and rounded. Any d_in is accepted: when groupsize does not divide it, the last
group of every row is shorter (as GPTQ's reference does). ``H`` is ignored except for the diagnostic
``objective`` (computed only when H is given: passing H is the opt-in).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from oac.quant.bits import uniform_bits
from oac.registry import check_int
from oac.solvers import SolverSpec
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers.common import SolveResult, check_finite, layer_objective


@dataclass
class RTNConfig:
    wbits: int = 4
    groupsize: int = -1  # -1: per-channel; any g > 0 (the last group of a row is shorter if g ∤ d_in)
    sym: bool = False
    mse: bool = False


def validate_options(cfg: RTNConfig) -> None:
    """Option ranges that need no layer shape (checked before the model is loaded)."""
    check_int("method", "wbits", cfg.wbits, 1, 8)
    check_int("method", "groupsize", cfg.groupsize, 1, allow=(-1,))



def check_shape(cfg: RTNConfig, d_out: int, d_in: int) -> None:
    """Raise a one-line ConfigError if ``cfg`` cannot quantize a d_out×d_in layer.

    RTN accepts every shape (short last group), so only invalid settings (wbits, groupsize) are rejected.
    """
    validate_options(cfg)


def solve(W: Tensor, H: Tensor | None, cfg: RTNConfig, name: str = "layer") -> SolveResult:
    validate_options(cfg)
    check_finite(W, H, name)
    Wf = W.detach().float()
    d_out, d_in = Wf.shape
    g = d_in if cfg.groupsize == -1 else min(cfg.groupsize, d_in)
    maxq = maxq_for(cfg.wbits)

    def fq(X: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
        # groups of `width` consecutive columns per row become rows of a [d_out * n, width] matrix
        Xg = X.reshape(-1, width)
        s, z = fit_minmax(Xg, cfg.wbits, sym=cfg.sym, variant="gptq", mse=cfg.mse)
        return fake_quantize(Xg, s, z, maxq, "gptq").reshape(d_out, -1), s.reshape(d_out, -1), z.reshape(d_out, -1)

    n_full = d_in // g
    if n_full * g == d_in:
        Q, scale, zero = fq(Wf, g)
    else:  # full groups, then the short last group of every row
        parts = [fq(Wf[:, : n_full * g], g), fq(Wf[:, n_full * g :], d_in - n_full * g)]
        Q, scale, zero = (torch.cat(t, dim=1) for t in zip(*parts))

    reported, full = uniform_bits(cfg.wbits, cfg.groupsize, d_in)
    stats = {
        "wbits": cfg.wbits,
        "groupsize": cfg.groupsize,
        "bits_nominal": float(cfg.wbits),
        "bits_reported": reported,
        "bits_full": full,
        "n_weights": W.numel(),
    }
    t0 = time.perf_counter()
    if H is not None:
        stats["objective"] = layer_objective(Wf, Q, H.to(Wf.device))
    stats["diagnostics_s"] = time.perf_counter() - t0
    masks = {"scale": scale, "zero": zero}
    return SolveResult(weight=Q, stats=stats, masks=masks)


SOLVER = SolverSpec("rtn", RTNConfig, solve, uses_hessian=False, validate_options=validate_options,
                    check_shape=check_shape, order=10,
                    save_formats=("native", "compressed-tensors"))
