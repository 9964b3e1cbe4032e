"""Output-agnostic Hessian H = (2/N) Σᵢ XᵢᵀXᵢ of the layer-wise ℓ2 objective (METHODS.md A2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from oac.hessian import HessianSpec
from oac.hessian.base import BlockContext
from oac.models import fit_kwargs, run_block


class LayerwiseHessian:
    """Running average over calibration *sequences*, accumulated in fp32 from forward hooks."""

    name = "layerwise"
    calibrated = True
    supports_groups = True  # can serve true-sequential sub-groups of a block
    RESUME_STATE = ()

    @torch.no_grad()
    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, Tensor]:
        H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=ctx.device)
             for n, m in group.items()}
        seen = {n: 0 for n in group}

        def hook_for(name):
            def hook(module, inputs, output):
                x = inputs[0]
                m = x.shape[0] if x.dim() == 3 else 1
                x = x.reshape(-1, x.shape[-1]).float()
                n = seen[name]
                H[name].mul_(n / (n + m))
                seen[name] = n + m
                x = math.sqrt(2 / seen[name]) * x
                H[name].addmm_(x.t(), x)
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in group.items()]
        try:
            for b0 in range(0, ctx.inps.shape[0], ctx.batch_size):
                x = ctx.inps[b0 : b0 + ctx.batch_size].to(ctx.device)
                run_block(ctx.block, x, fit_kwargs(ctx.block_kwargs, x.shape[0]))
        finally:
            for h in handles:
                h.remove()
        return H

    def record(self) -> dict:
        return {"hessian": self.name, "normalisation": "2/N_sequences * sum X^T X (tokens summed)"}


SOURCE = HessianSpec("layerwise", LayerwiseHessian, baseline=True, order=10)
