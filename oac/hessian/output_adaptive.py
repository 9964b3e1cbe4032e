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
  its Δ flows through FP blocks only. Ĥ of the later blocks of the window is kept on CPU until the
  pipeline reaches them. About r times fewer block passes than per_block. A run that starts (or
  resumes) at a block that is not a multiple of r covers blocks k..(next multiple of r)−1 first.
  During the pass the fp32 Ĥ of all its target blocks are accumulated on ``ctx.device``.
* ``once`` (C7 "OAC-once"): one pass from the inputs of block 0 through the whole full-precision
  model at block 0 gives Ĥ of every block (accumulated on ``ctx.device`` during the pass — about 28 GB
  fp32 for a 7B model, 0.5 GB for SmolLM2-135M — then stored on CPU). Ĥ no longer depends on the quantization
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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oac.errors import ConfigError
from oac.hessian import HessianSpec
from oac.hessian.base import BlockContext
from oac.hessian.cache import HessianCache
from oac.hessian.layerwise import LayerwiseHessian
from oac.models import DTYPES, fit_kwargs, run_block
from oac.modules import all_finite, cast_kwargs, cast_modules, move_modules, restore_cast, restore_devices, sync
from oac.registry import check_choice, check_float, check_int
from oac.solvers.common import HessianError

log = logging.getLogger(__name__)

PRODUCTS = ("sequence", "token")
REFRESH = ("per_block", "every", "once")
LABELS = ("data", "sampled")
REDUCTIONS = ("sum", "mean")
FORMS = ("auto", "weight_grad", "token_gram")
GRAD_DTYPES = (None, "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
DYNAMIC_INIT_SCALE = 2.0**16
DYNAMIC_MIN_SCALE = 2.0**-24


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
        check_choice(w, "refresh", self.refresh, REFRESH)
        check_choice(w, "labels", self.labels, LABELS)
        check_choice(w, "loss_reduction", self.loss_reduction, REDUCTIONS)
        check_choice(w, "product_form", self.product_form, FORMS)
        check_choice(w, "grad_dtype", self.grad_dtype, GRAD_DTYPES)
        check_int(w, "refresh_every", self.refresh_every, 1)
        check_int(w, "grad_batch_size", self.grad_batch_size, 1)
        check_int(w, "seed", self.seed, 0)
        if self.loss_scale != "dynamic":
            try:
                check_float(w, "loss_scale", self.loss_scale, 0, lo_open=True)
            except ConfigError:
                raise ConfigError(f"{w}.loss_scale must be a positive finite number or 'dynamic', "
                                  f"got {self.loss_scale!r}") from None
            self.loss_scale = float(self.loss_scale)
        check_float(w, "alpha", self.alpha, 0)
        self.alpha = float(self.alpha)
        self.cache_dir = str(self.cache_dir) if self.cache_dir else None


class OutputAdaptiveHessian:
    """Output-adaptive Hessian source for the sequential pipeline (``hessian: output_adaptive``).

    ``OutputAdaptiveHessian(OACOptions(...))``, or the same options as keywords for scripts and tests.
    """

    name = "output_adaptive"
    calibrated = True
    supports_groups = False  # all linears of a block come from one gradient pass (C5)

    product_costs = staticmethod(product_costs)  # multiply-adds of the two product forms (benchmarks read it here)

    # what a checkpoint saves and a resume restores (oac/jobdir/resume.py); options always come from the job config
    RESUME_STATE = ("_scale", "_pending", "_last_k", "forms", "stats")

    def __init__(self, options: OACOptions | None = None, **kwargs):
        if options is not None and kwargs:
            raise TypeError("pass either an OACOptions or keyword options, not both")
        opts = options if options is not None else OACOptions(**kwargs)
        self.options = opts
        for f in dataclasses.fields(opts):  # read-only views used throughout (self.refresh, ...)
            setattr(self, f.name, getattr(opts, f.name))
        self._scale = DYNAMIC_INIT_SCALE if self.loss_scale == "dynamic" else float(self.loss_scale)
        self._pending: dict[int, dict[str, Tensor]] = {}  # Ĥ computed ahead for later blocks (every/once)
        self._last_k: int | None = None
        self.forms: dict[str, str] = {}  # layer shape -> chosen product form
        self.reset_stats()

    # ----------------------------------------------------------------------------------------- api

    def reset_stats(self) -> None:
        """Counters for benchmarks. block_passes counts one block forward+backward of one window."""
        self.stats = {
            "passes": 0,  # refresh passes (one per per_block block, one per `every` window)
            "batches": 0,  # mini-batch forward+backward runs, including dynamic-scale retries
            "block_passes": 0,  # Σ windows × blocks run forward+backward
            "head_passes": 0,  # windows through final norm + lm_head + CE
            "overflow_retries": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "time_fwd_bwd_s": 0.0,  # forward (hooks only keep references) + loss + autograd.grad
            "time_products_s": 0.0,  # fp32 casts and Ĥ products
            "time_total_s": 0.0,  # everything inside hessians()
        }

    def record(self) -> dict:
        s = dict(self.stats)
        s["time_overhead_s"] = s["time_total_s"] - s["time_fwd_bwd_s"] - s["time_products_s"]
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
            "stats": s,
        }

    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        try:
            k = ctx.k
            if self._last_k is None or k <= self._last_k:  # a new run: forget Ĥ computed ahead
                self._pending.clear()
            self._last_k = k
            if k not in self._pending:
                self._compute(ctx)
            H = self._pending.pop(k)
            missing = set(group) - set(H)
            if missing:
                raise HessianError(f"block {k}: no output-adaptive Hessian for {sorted(missing)}")
            out = {n: H[n].to(ctx.device) for n in group}
            if self.alpha > 0:
                out = self._mix(ctx, group, out)
            return out
        finally:
            sync(ctx.device)
            self.stats["time_total_s"] += time.perf_counter() - t0

    # ----------------------------------------------------------------------------------- internals

    def _targets(self, k: int, K: int) -> list[int]:
        if self.refresh == "per_block":
            return [k]
        if self.refresh == "once":
            if k != 0:
                log.warning("oac refresh=once started at block %d: the full-precision model is no longer "
                            "available, Ĥ of blocks %d..%d come from the current inputs of block %d", k, k, K - 1, k)
            return list(range(k, K))
        r = self.refresh_every
        return list(range(k, min((k // r + 1) * r, K)))

    def _resolved_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.grad_dtype is None else DTYPES[self.grad_dtype]

    def _compute(self, ctx: BlockContext) -> None:
        adapter = ctx.adapter
        blocks = adapter.blocks
        K = len(blocks)
        k = ctx.k
        targets = self._targets(k, K)
        self.stats["passes"] += 1
        gdtype = self._resolved_dtype(ctx.inps.dtype)
        cache = HessianCache(self.cache_dir) if self.cache_dir else None
        key = self._cache_key(ctx, gdtype) if cache else None
        result = cache.load(key, targets) if cache else None
        if cache:
            self.stats["cache_hits" if result is not None else "cache_misses"] += 1
        if result is None:
            result = self._pass(ctx, targets, gdtype)
            if key:
                cache.save(key, result)
        store = torch.device("cpu")
        for j in targets:
            self._pending[j] = result[j] if j == k else {n: h.to(store) for n, h in result[j].items()}

    def _pass(self, ctx: BlockContext, targets: list[int], gdtype: torch.dtype) -> dict[int, dict[str, Tensor]]:
        adapter = ctx.adapter
        blocks = adapter.blocks
        K = len(blocks)
        s = ctx.k
        dev = ctx.device
        pass_modules = [blocks[m] for m in range(s, K)] + list(adapter.head_modules())
        lin = {j: adapter.linears(blocks[j]) for j in targets}
        H = {j: {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=dev)
                 for n, m in lin[j].items()} for j in targets}
        keys = [(j, n) for j in targets for n in lin[j]]
        captured: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        if getattr(adapter.model, "training", False):
            log.warning("oac: the model is in training mode (dropout active?); call model.eval()")

        def hook_for(key):
            def hook(module, inputs, output):
                captured[key] = (inputs[0].detach(), output)
            return hook

        if torch.is_inference_mode_enabled():
            raise HessianError("oac: the output-adaptive Hessian needs autograd; do not call it under "
                               "torch.inference_mode() (no_grad is fine)")
        N, T = ctx.inps.shape[0], ctx.inps.shape[1]
        if T < 2:
            raise ConfigError("oac: calibration windows need at least 2 tokens (labels are the next tokens)")
        handles = []
        moved = move_modules(pass_modules, dev)
        cast = cast_modules(pass_modules, gdtype)
        frozen = [(p, p.requires_grad) for p in adapter.model.parameters()]
        for p in adapter.model.parameters():
            p.requires_grad_(False)
        try:
            for j, n in keys:
                handles.append(lin[j][n].register_forward_hook(hook_for((j, n))))
            with torch.enable_grad():
                for b0 in range(0, N, self.grad_batch_size):
                    n_b = min(self.grad_batch_size, N - b0)
                    x0 = ctx.inps[b0 : b0 + n_b].to(dev, gdtype)
                    if x0.is_inference():  # a cache built under inference_mode cannot enter autograd
                        x0 = x0.clone()
                    ids = ctx.calib_ids[b0 : b0 + n_b].to(dev)
                    kw = cast_kwargs(fit_kwargs(ctx.block_kwargs, n_b), gdtype)
                    deltas, S = self._forward_backward(ctx, s, K, x0, ids, kw, keys, captured, b0)
                    sync(dev)
                    t = time.perf_counter()
                    xs_f32: dict[int, Tensor] = {}
                    for key, d in zip(keys, deltas):
                        X = captured[key][0]
                        Xf = xs_f32.get(id(X))
                        if Xf is None:  # q, k, v share one input tensor: cast it once
                            Xf = xs_f32[id(X)] = X.float()
                        if d is None:
                            log.warning("oac: block %d %s does not influence the loss; its Ĥ gets no term", *key)
                            continue
                        D = d.float()
                        if S != 1.0:
                            D = D / S
                        # OPT's MLP sees [n·T, d] inputs: restore the window axis (batch-major flattening)
                        self._accumulate(H[key[0]][key[1]], Xf.reshape(n_b, T, -1), D.reshape(n_b, T, -1))
                    del xs_f32, deltas
                    captured.clear()
                    sync(dev)
                    self.stats["time_products_s"] += time.perf_counter() - t
        finally:
            captured.clear()
            for h in handles:
                h.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
            restore_cast(cast)
            restore_devices(moved)
        for j in targets:
            for n, h in H[j].items():
                h.div_(N)  # symmetric up to rounding, like the layer-wise H; the solvers read one triangle
                if not all_finite([h]):
                    raise HessianError(f"block {j} {n}: output-adaptive Hessian contains NaN/Inf")
        return H

    def _forward_backward(self, ctx, s, K, x0, ids, kw, keys, captured, b0) -> tuple[list, float]:
        """One mini-batch: forward blocks s..K−1 + head, CE, Δ = ∂(S·loss)/∂Y. Retries on overflow."""
        blocks = ctx.adapter.blocks
        n_b, T = ids.shape
        while True:
            S = self._scale
            sync(ctx.device)
            t = time.perf_counter()
            captured.clear()
            z = x0.detach().requires_grad_(True)
            h = z
            for m in range(s, K):
                h = run_block(blocks[m], h, kw)
            logits = ctx.adapter.logits(h[:, :-1]).float()  # the last position predicts nothing
            V = logits.shape[-1]
            labels = ids[:, 1:] if self.labels == "data" else self._sample(logits, b0)
            # Σ_i ℓ_i: windows are always summed (Ĥ does not depend on grad_batch_size); ``mean`` divides each
            # window's sum by its T−1 terms (all windows have the same length)
            loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
            if self.loss_reduction == "mean":
                loss = loss / (T - 1)
            if not torch.isfinite(loss):
                raise HessianError(f"block {ctx.k}: non-finite calibration loss in the forward pass "
                                   f"(windows {b0}..{b0 + n_b - 1}); the {x0.dtype} forward overflowed")
            missing = [key for key in keys if key not in captured]
            if missing:
                raise HessianError(f"oac: linears {missing} were not called in the forward pass")
            ys = [captured[key][1] for key in keys]
            deltas = list(torch.autograd.grad(loss * S, ys, allow_unused=True))
            del z, h, logits, loss, ys
            sync(ctx.device)
            self.stats["time_fwd_bwd_s"] += time.perf_counter() - t
            self.stats["batches"] += 1
            self.stats["block_passes"] += n_b * (K - s)
            self.stats["head_passes"] += n_b
            if all_finite([d for d in deltas if d is not None]):
                return deltas, S
            del deltas
            if self.loss_scale != "dynamic":
                raise HessianError(f"block {ctx.k}: non-finite output gradients (loss scale {S:g}, "
                                   f"{x0.dtype}); use oac.loss_scale=dynamic, a smaller scale, or grad_dtype bf16/fp32")
            if S / 2 < DYNAMIC_MIN_SCALE:
                raise HessianError(f"block {ctx.k}: output gradients overflow even at loss scale {S:g}")
            self._scale = S / 2
            self.stats["overflow_retries"] += 1
            log.info("oac: non-finite Δ at loss scale %g; retrying the batch with %g", S, self._scale)

    @torch.no_grad()
    def _sample(self, logits: Tensor, b0: int) -> Tensor:
        """True-Fisher labels: y_t ~ softmax(logits_t) of the current model, one generator per window."""
        probs = logits.detach().float().softmax(-1)
        out = []
        for b in range(probs.shape[0]):
            g = torch.Generator(device=probs.device)
            g.manual_seed(self.seed * 1_000_003 + b0 + b)
            out.append(torch.multinomial(probs[b], 1, generator=g).squeeze(-1))
        return torch.stack(out)

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

    def _mix(self, ctx: BlockContext, group: dict[str, nn.Linear], Hoac: dict[str, Tensor]) -> dict[str, Tensor]:
        Hl2 = LayerwiseHessian().hessians(ctx, group)
        out = {}
        for n, Ho in Hoac.items():
            tr_o, tr_l = float(Ho.diagonal().sum()), float(Hl2[n].diagonal().sum())
            c = tr_l / tr_o if tr_o > 0 else 0.0
            out[n] = c * Ho + self.alpha * Hl2[n]
        return out

    # ------------------------------------------------------------------------------------- caching

    def _cache_key(self, ctx: BlockContext, gdtype: torch.dtype) -> str:
        adapter = ctx.adapter
        s = ctx.k
        mods = [adapter.blocks[m] for m in range(s, len(adapter.blocks))] + list(adapter.head_modules())
        options = {
            "product": self.product,
            "product_form": self.product_form if self.product == "sequence" else None,
            "labels": self.labels,
            "seed": self.seed if self.labels == "sampled" else None,
            "grad_dtype": str(gdtype),
            "loss_reduction": self.loss_reduction,
            "loss_scale": self.loss_scale,
            "grad_batch_size": self.grad_batch_size,
            "refresh": self.refresh,
            "refresh_every": self.refresh_every if self.refresh == "every" else None,
        }
        return HessianCache.key(options, device=ctx.device, calib_ids=ctx.calib_ids, modules=mods, inps=ctx.inps,
                                start=s, n_blocks=len(adapter.blocks))


SOURCE = HessianSpec("output_adaptive", OutputAdaptiveHessian, OACOptions, options_key="oac", order=20)
