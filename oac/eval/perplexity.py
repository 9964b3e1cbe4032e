"""Perplexity under the GPTQ protocol (PROTOCOLS.md §2.1).

Non-overlapping windows of ``seqlen`` tokens (the tail is dropped, no context is carried over), the
mean next-token NLL of each window over its seqlen-1 positions, PPL = exp(mean over windows).
Logits are upcast to fp32 before the cross-entropy. ``max_windows`` / ``max_tokens`` evaluate only the first
windows (the smaller budget wins); the count used is returned next to the number.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def eval_windows(ids: torch.Tensor, seqlen: int, *, max_windows: int | None = None,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """The [n, seqlen] windows evaluated from the [1, L] stream and the number of windows the stream holds."""
    n_total = ids.shape[1] // seqlen
    n = n_total
    if max_windows:
        n = min(n, int(max_windows))
    if max_tokens:
        n = min(n, int(max_tokens) // seqlen)
    if n == 0:
        raise ValueError(f"stream of {ids.shape[1]} tokens holds no window of {seqlen} within the budget "
                         f"(max_windows={max_windows}, max_tokens={max_tokens})")
    return ids[0, : n * seqlen].view(n, seqlen), n_total


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
               max_tokens: int | None = None, device=None, desc: str = "ppl",
               on_logits: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Evaluate ``model`` on the [1, L] stream ``ids``. Returns ppl, windows, tokens and the settings.

    ``on_logits(first_window, input_ids, logits)`` sees every batch's logits (the KL metric uses the same pass).
    """
    device = device or next(model.parameters()).device
    windows, n_total = eval_windows(ids, seqlen, max_windows=max_windows, max_tokens=max_tokens)
    n = windows.shape[0]
    nlls = []
    for b0 in tqdm(range(0, n, batch_size), desc=desc, leave=False, mininterval=5):
        x = windows[b0 : b0 + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="none").view(x.shape[0], -1).mean(dim=1)
        nlls.append(loss.cpu())
        if on_logits is not None:
            on_logits(b0, x, logits)
        del logits
    nll = torch.cat(nlls).double()
    if not torch.isfinite(nll).all():
        log.warning("non-finite window NLL in %s", desc)
    ppl = math.exp(float(nll.mean()))
    return {"ppl": ppl, "n_windows": n, "n_windows_total": n_total, "n_tokens": n * seqlen,
            "n_predicted": n * (seqlen - 1), "seqlen": seqlen, "max_windows": max_windows,
            "max_tokens": max_tokens, "complete": n == n_total}
