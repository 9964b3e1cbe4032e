"""RTN: round-to-nearest with the GPTQ-variant min-max grid (METHODS.md B1).

No calibration: each row (or each group of ``groupsize`` consecutive columns of a row) is fitted on
the original weights and rounded. ``H`` is ignored except for the diagnostic ``objective``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from oac.quant.bits import uniform_bits
from oac.registry import check_int
from oac.solvers import SolverSpec
from oac.quant.grid import fake_quantize, fit_minmax, maxq_for
from oac.solvers.common import SolveResult, check_finite, layer_objective, validate_uniform_config


@dataclass
class RTNConfig:
    wbits: int = 4
    groupsize: int = -1  # -1: per-channel
    sym: bool = False
    mse: bool = False


def solve(W: Tensor, H: Tensor | None, cfg: RTNConfig, name: str = "layer") -> SolveResult:
    validate_uniform_config(cfg.wbits, cfg.groupsize, tuple(W.shape), method=f"RTN {name}")
    check_finite(W, H, name)
    Wf = W.detach().float()
    d_out, d_in = Wf.shape
    g = d_in if cfg.groupsize == -1 else cfg.groupsize
    maxq = maxq_for(cfg.wbits)
    # Groups of g consecutive columns per row become rows of a [d_out * n_groups, g] matrix.
    Wg = Wf.reshape(d_out * (d_in // g), g)
    scale, zero = fit_minmax(Wg, cfg.wbits, sym=cfg.sym, variant="gptq", mse=cfg.mse)
    Q = fake_quantize(Wg, scale, zero, maxq, "gptq").reshape(d_out, d_in)

    reported, full = uniform_bits(cfg.wbits, cfg.groupsize, d_in)
    stats = {
        "wbits": cfg.wbits,
        "groupsize": cfg.groupsize,
        "bits_nominal": float(cfg.wbits),
        "bits_reported": reported,
        "bits_full": full,
        "n_weights": W.numel(),
    }
    if H is not None:
        stats["objective"] = layer_objective(Wf, Q, H.to(Wf.device))
    masks = {"scale": scale.reshape(d_out, -1), "zero": zero.reshape(d_out, -1)}
    return SolveResult(weight=Q, stats=stats, masks=masks)


def validate_options(cfg: RTNConfig) -> None:
    """Option ranges that need no layer shape (checked before the model is loaded)."""
    check_int("method", "wbits", cfg.wbits, 1, 8)
    check_int("method", "groupsize", cfg.groupsize, 1, allow=(-1,))


SOLVER = SolverSpec("rtn", RTNConfig, solve, uses_hessian=False, validate_options=validate_options, order=10)
