"""OAC's output-adaptive Hessian Ĥ (METHODS.md C2–C5, options of C7).

For every linear l of block k and calibration window i, with X_i [T, d_in] the layer's input and
Δ_i = ∂ℓ_i/∂Y_i [T, d_out] the gradient of the window's next-token cross-entropy at the layer's
output (computed through blocks k..K−1, the final norm and lm_head),

    product = "sequence":  Ĥ = (1/N) Σ_i G_iᵀ G_i,  G_i = Δ_iᵀ X_i = ∂ℓ_i/∂W     (= Σ_i X_iᵀ (Δ_iΔ_iᵀ) X_i / N)
    product = "token":     Ĥ = (1/N) Σ_i Σ_t ‖δ_it‖² x_it x_itᵀ                 (drops cross-token terms)

The two coincide when only one token of a window carries gradient (T = 1; METHODS.md D.4).

How one pass works (C4):
* all model parameters are frozen (requires_grad False, restored afterwards), so autograd records
  activations only and no weight gradient is ever formed;
* z = the cached input of the first block of the pass (detached copy, requires_grad) — the pass
  never builds a graph through earlier blocks;
* z runs through blocks s..K−1 (``run_block`` + the captured kwargs), then ``adapter.logits``;
  CE in fp32 against the window's own next tokens (T−1 terms), ``sum``- or token-``mean``-reduced
  per window and summed over the windows of the mini-batch, times the loss scale S;
* a forward hook on each target linear keeps X (detached) and the output tensor Y;
  ``torch.autograd.grad(S·loss, [Y...])`` returns Δ for every target linear at once. This is the
  tensor-hook mechanism of C4 in functional form: autograd stops at the requested outputs (no
  backward below block k's linears, nothing accumulates in ``.grad``);
* Δ is checked for inf/NaN, divided by S (exact for powers of two), and the per-window products
  are formed in fp32 and accumulated into fp32 Ĥ on ``ctx.device``.

A mini-batch of several windows is exact: window b's loss depends only on its own Y_b, so Δ_b is its
own gradient, and the products are formed per window (C4). Memory: one mini-batch of activations of
blocks s..K−1 at a time. Offloaded blocks of the pass and the head are moved to ``ctx.device`` for
the pass and moved back afterwards (modules already on the device stay).

Refresh modes (which model state Ĥ of block k is computed from):
* ``per_block`` (C5, default): at every block k, one pass from the inputs of block k (reflecting the
  quantized blocks < k) through the full-precision blocks k..K−1. N·Σ_k(K−k + c_head) block passes.
* ``every`` (``refresh_every`` = r): at blocks k ≡ 0 (mod r) one pass from the inputs of block k
  (quantized blocks < k) through full-precision blocks k..K−1 yields Ĥ for all linears of blocks
  k..k+r−1 at once. Ĥ of block k+j (0 < j < r) is therefore computed with blocks k..k+j−1 still in
  full precision: its X are the FP activations, not those after the quantized blocks k..k+j−1, and
  its Δ flows through FP blocks only. Ĥ of the later blocks of the window is kept on CPU (with
  ``cache_dir``: only in the cache, read back bit for bit) until the pipeline reaches them. About r times fewer block passes than per_block. A run that starts (or
  resumes) at a block that is not a multiple of r covers blocks k..(next multiple of r)−1 first.
  During the pass the fp32 Ĥ of all its target blocks are accumulated on ``ctx.device``.
* ``once`` (C7 "OAC-once"): one pass from the inputs of block 0 through the whole full-precision
  model at block 0 gives Ĥ of every block (accumulated on ``ctx.device`` during the pass — about 28 GB
  fp32 for a 7B model, 0.5 GB for SmolLM2-135M — then stored on CPU, or with ``cache_dir`` only on disk). Ĥ no longer depends on the quantization
  of earlier blocks. Equals ``every`` with r = K. (If a run resumes at block k > 0 the FP model is
  gone; the pass then starts at block k from the current inputs and a warning is logged.)

Normalisation (C3: irrelevant for GPTQ, SpQR and BiLLM, recorded anyway): Ĥ = (1/N) Σ_i G_iᵀG_i for
the *unscaled* per-window loss ℓ_i (sum over the T−1 tokens, or their mean with
``loss_reduction=mean``), rows summed (row-wise aggregation, C2.5). The loss scale S is divided out
of Δ, so Ĥ does not depend on S (up to rounding; exactly for powers of two).

``alpha`` > 0 (ablation) returns H = c·Ĥ + α·H_ℓ2, where H_ℓ2 = (2/N) Σ_i X_iᵀX_i is the layer-wise
Hessian of the same block inputs (``LayerwiseHessian`` on ``ctx.inps``, one extra block forward) and
c = tr(H_ℓ2)/tr(Ĥ) rescales Ĥ to the same mean diagonal as H_ℓ2. So α is the weight of the ℓ2 term
relative to an equally-sized Ĥ (α = 1: equal traces), independent of the loss normalisation/scale.
α = 0 returns Ĥ itself (not rescaled).

Hessian cache (``cache_dir``): Ĥ of each pass is saved and reused exactly (``oac/hessian/cache.py``: what the
key covers and when entries are shared across methods).

The pass itself (hooks, loss, backward, refresh schedule, cache) is ``oac/hessian/gradients.py``, shared with the
``guided`` source; this module is OAC's accumulator (the two products) and its options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from oac.hessian import HessianSpec
from oac.hessian.base import BlockContext
from oac.hessian.gradients import (  # noqa: F401  (re-exported: the constants used to live here)
    DYNAMIC_INIT_SCALE,
    DYNAMIC_MIN_SCALE,
    GRAD_DTYPES,
    LABELS,
    REDUCTIONS,
    REFRESH,
    GradientHessian,
    check_pass_options,
)
from oac.hessian.layerwise import LayerwiseHessian
from oac.registry import check_choice, check_float

log = logging.getLogger(__name__)

PRODUCTS = ("sequence", "token")
FORMS = ("auto", "weight_grad", "token_gram")


def product_costs(T: int, d_out: int, d_in: int) -> dict[str, int]:
    """Multiply-adds per window of the two equivalent forms of G_iᵀG_i (METHODS.md C4 table)."""
    return {"weight_grad": T * d_out * d_in + d_out * d_in * d_in,
            "token_gram": T * T * d_out + T * T * d_in + T * d_in * d_in}


@dataclass
class OACOptions:
    """The output-adaptive source's options (``method.oac``; defaults in configs/hessian/output_adaptive.yaml)."""

    product: str = "sequence"  # sequence: (1/N) Σ_i G_iᵀG_i | token: per-token Fisher (drops cross-token terms)
    product_form: str = "auto"  # auto | weight_grad | token_gram: the cheaper equivalent form per layer
    refresh: str = "per_block"  # per_block (C5) | every (refresh_every blocks per pass) | once (C7 "OAC-once")
    refresh_every: int = 4
    labels: str = "data"  # data (empirical Fisher) | sampled (true Fisher, labels drawn from the model)
    seed: int = 0  # sampled labels only
    grad_dtype: str | None = None  # None = model dtype | fp32 | fp16 | bf16
    loss_reduction: str = "sum"  # sum | mean (token mean per window); irrelevant to the result (C3)
    loss_scale: float | str = 1.0  # S > 0, or "dynamic"
    grad_batch_size: int = 1  # windows per forward+backward (exact for any value)
    alpha: float = 0.0  # > 0: tr-normalised Ĥ + alpha·H_ℓ2 (ablation)
    cache_dir: str | None = None  # reuse Ĥ across runs (exact; oac/hessian/cache.py)

    def __post_init__(self):
        w = "method.oac"
        check_choice(w, "product", self.product, PRODUCTS)
        check_choice(w, "product_form", self.product_form, FORMS)
        check_pass_options(w, self)
        check_float(w, "alpha", self.alpha, 0)
        self.alpha = float(self.alpha)


class OutputAdaptiveHessian(GradientHessian):
    """Output-adaptive Hessian source for the sequential pipeline (``hessian: output_adaptive``).

    ``OutputAdaptiveHessian(OACOptions(...))``, or the same options as keywords for scripts and tests.
    """

    name = "output_adaptive"
    options_class = OACOptions
    cache_kind = "oac_hessian"
    label = "oac"
    title = "output-adaptive"

    product_costs = staticmethod(product_costs)  # multiply-adds of the two product forms (benchmarks read it here)

    def record(self) -> dict:
        norm = ("(1/N) * sum_i G_i^T G_i, G_i = d l_i / dW, rows summed; " if self.product == "sequence" else
                "(1/N) * sum_i sum_t |delta_it|^2 x_it x_it^T; ")
        norm += (f"l_i = {'sum' if self.loss_reduction == 'sum' else 'mean'} of the T-1 next-token CE terms "
                 f"of window i ({self.labels} labels); loss scale divided out")
        if self.alpha > 0:
            norm += f"; mixed: tr(H_l2)/tr(H_oac) * H_oac + {self.alpha} * H_l2, H_l2 = 2/N sum X^T X"
        return {
            "hessian": self.name,
            "product": self.product,
            "product_form": self.product_form,
            "forms_used": dict(self.forms),
            "refresh": self.refresh,
            "refresh_every": self.refresh_every,
            "labels": self.labels,
            "seed": self.seed,
            "grad_dtype": self.grad_dtype,
            "loss_reduction": self.loss_reduction,
            "loss_scale": self.loss_scale,
            "loss_scale_final": self._scale,
            "grad_batch_size": self.grad_batch_size,
            "alpha": self.alpha,
            "cache_dir": self.cache_dir,
            "normalisation": norm,
            "memory": self.memory,
            "stats": self.record_stats(),
        }

    # ------------------------------------------------------------------------------- the accumulator

    def _zeros(self, lin: nn.Linear, device) -> Tensor:
        return torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=device)

    def _accumulate(self, H: Tensor, X: Tensor, D: Tensor) -> None:
        """H += Σ_b product(X_b [T,d_in], D_b [T,d_out]) in fp32."""
        B, T, d_in = X.shape
        d_out = D.shape[-1]
        if self.product == "token":
            w = D.square().sum(-1).sqrt().unsqueeze(-1)  # ‖δ_t‖
            Xw = (X * w).reshape(B * T, d_in)
            H.addmm_(Xw.T, Xw)
            return
        form = self.product_form
        if form == "auto":
            c = product_costs(T, d_out, d_in)
            form = "token_gram" if c["token_gram"] < c["weight_grad"] else "weight_grad"
        self.forms[f"T{T}:{d_out}x{d_in}"] = form
        if form == "weight_grad":
            G = torch.bmm(D.transpose(1, 2), X).reshape(B * d_out, d_in)  # G_b = Δ_bᵀ X_b, rows stacked
            H.addmm_(G.T, G)
        else:
            A = torch.bmm(D, D.transpose(1, 2))  # [B, T, T] token Gram Δ_bΔ_bᵀ
            AX = torch.bmm(A, X).reshape(B * T, d_in)
            H.addmm_(X.reshape(B * T, d_in).T, AX)

    def _postprocess(self, ctx: BlockContext, group: dict[str, nn.Linear], H: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._mix(ctx, group, H) if self.alpha > 0 else H

    def _mix(self, ctx: BlockContext, group: dict[str, nn.Linear], Hoac: dict[str, Tensor]) -> dict[str, Tensor]:
        Hl2 = LayerwiseHessian().hessians(ctx, group)
        out = {}
        for n, Ho in Hoac.items():
            tr_o, tr_l = float(Ho.diagonal().sum()), float(Hl2[n].diagonal().sum())
            c = tr_l / tr_o if tr_o > 0 else 0.0
            out[n] = c * Ho + self.alpha * Hl2[n]
        return out

    # ------------------------------------------------------------------------------------- caching

    def _cache_options(self) -> dict:
        # the key of the entries written before the pass was shared with the guided source: unchanged
        return {"product": self.product,
                "product_form": self.product_form if self.product == "sequence" else None}


SOURCE = HessianSpec("output_adaptive", OutputAdaptiveHessian, OACOptions, options_key="oac", order=20)
