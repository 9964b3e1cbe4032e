"""No Hessian (``method.hessian: null``): the source of RTN and of the fp16 row. The block loop runs without
calibration data, hooks or forward passes, and the solver is called with ``H = None``."""

from __future__ import annotations

from torch import nn

from oac.hessian import HessianSpec
from oac.hessian.base import BlockContext


class NoHessian:
    name = "none"
    calibrated = False
    supports_groups = True
    RESUME_STATE = ()

    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, None]:
        return {n: None for n in group}

    def record(self) -> dict:
        return {"hessian": None}


SOURCE = HessianSpec("none", NoHessian, order=0)
