"""Solvers: plain functions ``solve(W, H, cfg) -> SolveResult``, each with a typed config dataclass.

A *method* is a solver fed by a Hessian source (``oac.method``): ``gptq`` = the GPTQ solver + the layer-wise
Hessian, ``oac_gptq`` = the same solver + the output-adaptive Hessian.

Adding a solver = one module here that ends with ``SOLVER = SolverSpec(...)`` (found by the registry, no list
to edit) + one YAML in ``configs/solver/`` (its defaults, under ``method:``) + its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from oac.registry import Registry, build_options
from oac.solvers.common import SolveResult


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    ``config``: its typed settings (a dataclass; ``__post_init__`` or ``validate_options`` checks ranges).
    ``solve(W, H, cfg)``: the algorithm. ``uses_hessian``: False for RTN (fed by the "no Hessian" source only).
    ``validate_options(cfg)``: option checks that need no layer shape (run before the model is loaded).
    ``check_shape(cfg, d_out, d_in)``: what this solver cannot do on a layer shape (run once the model is loaded).
    ``order``: where its rows go in tables (the paper's order: RTN, GPTQ, SpQR, BiLLM).
    ``save_formats``: how ``save=true`` can keep its models (``save_format``): ``native`` always; ``compressed-tensors``
    for solvers whose weights lie on a uniform grid returned as ``masks`` scale/zero(/perm) (oac/jobdir/export.py).
    ``stacked_hessian``: accepts a stack H [G, d_in, d_in], one Hessian per contiguous group of d_out/G rows
    (``oac.solvers.common.solve_row_groups``); sources that feed stacks (``guided`` with groups > 1) are refused
    for the other solvers before the model loads.
    """

    name: str
    config: type
    solve: Callable[..., SolveResult]
    uses_hessian: bool = True
    validate_options: Callable | None = None
    check_shape: Callable | None = None
    order: int = 100
    save_formats: tuple[str, ...] = ("native",)
    stacked_hessian: bool = False

    def make_config(self, params: dict | None):
        cfg = build_options(self.config, params, f"method ({self.name} solver)")
        if self.validate_options is not None:
            self.validate_options(cfg)
        return cfg


SOLVERS: Registry[SolverSpec] = Registry("oac.solvers", "SOLVER", "solver")


def get(name: str) -> SolverSpec:
    return SOLVERS.get(name)


def get_solver(name: str):
    """(solve function, config dataclass) of a solver name."""
    spec = SOLVERS.get(name)
    return spec.solve, spec.config
