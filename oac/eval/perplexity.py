"""Perplexity under the GPTQ protocol (PROTOCOLS.md §2.1).

Non-overlapping windows of ``seqlen`` tokens (the tail is dropped, no context is carried over), the
mean next-token NLL of each window over its seqlen-1 positions, PPL = exp(mean over windows).
Logits are upcast to fp32 before the cross-entropy.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
               device=None, desc: str = "ppl") -> dict:
    """Evaluate ``model`` on the [1, L] stream ``ids``. Returns ppl, windows, tokens and the settings."""
    device = device or next(model.parameters()).device
    n_total = ids.shape[1] // seqlen
    n = n_total if not max_windows else min(n_total, int(max_windows))
    if n == 0:
        raise ValueError(f"stream of {ids.shape[1]} tokens is shorter than one window of {seqlen}")
    windows = ids[0, : n * seqlen].view(n, seqlen)
    nlls = []
    for b0 in tqdm(range(0, n, batch_size), desc=desc, leave=False, mininterval=5):
        x = windows[b0 : b0 + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="none").view(x.shape[0], -1).mean(dim=1)
        nlls.append(loss.cpu())
    nll = torch.cat(nlls).double()
    if not torch.isfinite(nll).all():
        log.warning("non-finite window NLL in %s", desc)
    ppl = math.exp(float(nll.mean()))
    return {"ppl": ppl, "n_windows": n, "n_windows_total": n_total, "n_tokens": n * seqlen, "seqlen": seqlen,
            "max_windows": max_windows, "complete": n == n_total}
