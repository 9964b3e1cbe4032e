"""Solvers: plain functions ``solve(W, H, cfg) -> SolveResult`` plus a typed config each.

A *method* is a solver fed by a Hessian source (``configs/method/*.yaml``): ``gptq`` = GPTQ solver +
layer-wise Hessian, ``oac_gptq`` = the same solver + the output-adaptive Hessian.
"""

from __future__ import annotations

import dataclasses
import importlib

from oac.errors import ConfigError
from oac.solvers.common import SolveResult

_REGISTRY = {
    "rtn": ("oac.solvers.rtn", "RTNConfig"),
    "gptq": ("oac.solvers.gptq", "GPTQConfig"),
    "spqr": ("oac.solvers.spqr", "SpQRConfig"),
    "billm": ("oac.solvers.billm", "BiLLMConfig"),
    "identity": ("oac.solvers", "IdentityConfig"),
}
# keys of a method config that are not solver hyper-parameters
METHOD_KEYS = {"name", "solver", "hessian", "oac", "backbone", "description", "true_sequential"}


@dataclasses.dataclass
class IdentityConfig:
    """No-op solver (Ŵ = W): checks that the pipeline itself changes nothing."""


def _identity(W, H, cfg):
    return SolveResult(weight=W.float().clone(), stats={"bits_nominal": 32.0, "bits_reported": 32.0,
                                                        "bits_full": 32.0, "n_weights": W.numel()})


def get_solver(name: str):
    """Return (solve function, config dataclass) for a solver name."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown solver {name!r}; known: {sorted(_REGISTRY)}")
    if name == "identity":
        return _identity, IdentityConfig
    mod_name, cls_name = _REGISTRY[name]
    mod = importlib.import_module(mod_name)
    return mod.solve, getattr(mod, cls_name)


def make_config(name: str, params: dict):
    """Build the typed solver config from a method config's hyper-parameters; unknown keys are errors."""
    _, cls = get_solver(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in params.items():
        if k in METHOD_KEYS:
            continue
        if k not in fields:
            raise ConfigError(f"method hyper-parameter {k!r} is not a setting of solver {name!r}; "
                              f"valid: {sorted(fields)}")
        kwargs[k] = float(v) if v in ("inf", "Infinity") else v
    return cls(**kwargs)
