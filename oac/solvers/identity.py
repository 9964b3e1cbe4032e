"""No-op solver (Ŵ = W): checks that the block loop itself changes nothing (METHODS.md D.9)."""

from __future__ import annotations

from dataclasses import dataclass

from oac.solvers import SolverSpec
from oac.solvers.common import SolveResult


@dataclass
class IdentityConfig:
    """No settings."""


def solve(W, H, cfg: IdentityConfig) -> SolveResult:
    return SolveResult(weight=W.float().clone(), stats={"bits_nominal": 32.0, "bits_reported": 32.0,
                                                        "bits_full": 32.0, "n_weights": W.numel()})


SOLVER = SolverSpec("identity", IdentityConfig, solve, stacked_hessian=True)  # H is ignored
