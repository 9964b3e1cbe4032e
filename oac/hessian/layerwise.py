"""Output-agnostic Hessian H = (2/N) Σᵢ XᵢᵀXᵢ of the layer-wise ℓ2 objective (METHODS.md A2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from oac.hessian.base import BlockContext
from oac.models import run_block


class LayerwiseHessian:
    """Running average over calibration *sequences*, accumulated in fp32 from forward hooks."""

    name = "layerwise"
    supports_groups = True  # can serve true-sequential sub-groups of a block

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


def fit_kwargs(kwargs: dict, n: int) -> dict:
    """Captured kwargs carry the capture batch size; fit batch-leading tensors to a batch of n windows.

    n < capture batch (a smaller last batch): slice. n > capture batch (e.g. OAC's grad_batch_size
    larger than the pipeline's batch_size): repeat row 0 — valid because calibration windows have no
    padding, so every row of a captured mask / position tensor is the same.
    """
    bs = kwargs.get("_capture_batch", n)
    if n == bs:
        return {k: v for k, v in kwargs.items() if k != "_capture_batch"}

    def fit(t: Tensor) -> Tensor:
        return t[:n] if n < bs else t[:1].expand(n, *t.shape[1:])

    out = {}
    for k, v in kwargs.items():
        if k == "_capture_batch":
            continue
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == bs:
            v = fit(v)
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == bs for t in v):
            v = tuple(fit(t) for t in v)
        out[k] = v
    return out
