"""Hessian sources: what a solver is fed. Layer-wise 2XᵀX (GPTQ family), OAC's output-adaptive Ĥ, or none (RTN).

Adding a Hessian source = one module here that ends with ``SOURCE = HessianSpec(...)`` (found by the registry:
no list to edit) + one YAML in ``configs/hessian/`` (its options, written once, under ``method.<options_key>``)
+ its tests. Every solver can then be fed by it: ``method=gptq hessian=<name>``; the report pairs it with the
layer-wise backbone (same config up to the Hessian source) without being told.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from oac.hessian.base import HessianSource
from oac.registry import Registry, build_options


@dataclass(frozen=True)
class HessianSpec:
    """A registered Hessian source.

    ``source``: the class (``HessianSource`` protocol; ``calibrated`` False: needs no calibration data).
    ``options``: its typed options dataclass (``__post_init__`` checks ranges), or None for a source without
    options. ``options_key``: where its options live in the method config (``method.oac`` for OAC).
    ``baseline``: the reference every other source is compared with in paired tables (the layer-wise H).
    ``row_groups(options)``: how many row-group Hessians per linear the source feeds (a stack [G, d_in, d_in],
    rows split into G contiguous groups of d_out/G; ``oac.solvers.common.solve_row_groups``); None: one [d_in, d_in].
    """

    name: str
    source: type
    options: type | None = None
    options_key: str | None = None
    baseline: bool = False
    order: int = 100
    row_groups: Callable[[Any], int] | None = None

    def groups(self, options) -> int:
        return 1 if self.row_groups is None else int(self.row_groups(options))

    @property
    def calibrated(self) -> bool:
        return bool(getattr(self.source, "calibrated", True))

    def make_options(self, method: dict):
        params = (method.get(self.options_key) or {}) if self.options_key else {}
        where = f"method.{self.options_key}" if self.options_key else f"hessian {self.name}"
        return build_options(self.options, params, where)

    def build(self, options=None) -> HessianSource:
        return self.source(options) if self.options is not None else self.source()


HESSIANS: Registry[HessianSpec] = Registry("oac.hessian", "SOURCE", "Hessian source")
NONE = "none"  # the registry name of ``method.hessian: null``


def get(name: str | None) -> HessianSpec:
    return HESSIANS.get(NONE if name is None else name)


def option_keys() -> set[str]:
    """Method-config keys that hold some source's options (they are not solver settings)."""
    return {s.options_key for s in HESSIANS.specs() if s.options_key}


def is_variant(name: str | None) -> bool:
    """A calibrated source that is not the baseline: the report pairs its jobs with the baseline's."""
    try:
        spec = get(name)
    except Exception:
        return False
    return spec.calibrated and not spec.baseline


def is_calibrated(name: str | None) -> bool:
    try:
        return get(name).calibrated
    except Exception:
        return False
