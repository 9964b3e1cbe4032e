"""The gradient pass shared by the end-loss Hessian sources (OAC's Ĥ, GuidedQuant's grouped Fisher).

One machinery, several accumulators. For block k (and, with ``refresh=every``/``once``, the blocks after it), the
pass runs the calibration windows through blocks s..K−1, the final norm and lm_head, takes the next-token
cross-entropy, and asks autograd for Δ = ∂ℓ/∂Y at the output of every target linear (METHODS.md C4). For each
window and linear it then hands the fp32 input X [B, T, d_in] and the fp32 output gradient D [B, T, d_out] to the
source's :meth:`GradientHessian._accumulate`, which folds them into that linear's Hessian:

* ``output_adaptive`` (``oac/hessian/output_adaptive.py``): Ĥ += Σ_b G_bᵀG_b (or the token-diagonal form);
* ``guided`` (``oac/hessian/guided.py``): H_g += Σ_n s_{n,g} x_n x_nᵀ for G groups of output channels.

Everything else lives here, once: freezing the parameters, the forward hooks that keep X and Y, the loss (data or
sampled labels, sum or token-mean reduction, loss scale with dynamic retries), the overflow checks, the refresh
schedule (``per_block`` | ``every`` r | ``once``: which model state the Hessians of block k come from, see
``output_adaptive.py``), the Hessians computed ahead for later blocks, the on-disk cache (``cache.py``) and the
timing/pass counters. A subclass defines the accumulator, its zero state, its final normalisation, the options
that enter the cache key and its ``record()``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oac.errors import ConfigError
from oac.hessian.base import BlockContext
from oac.hessian.cache import HessianCache
from oac.models import DTYPES, fit_kwargs, run_block
from oac.modules import all_finite, cast_kwargs, cast_modules, move_modules, restore_cast, restore_devices, sync
from oac.registry import check_choice, check_float, check_int
from oac.solvers.common import HessianError

log = logging.getLogger(__name__)

REFRESH = ("per_block", "every", "once")
LABELS = ("data", "sampled")
REDUCTIONS = ("sum", "mean")
GRAD_DTYPES = (None, "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
DYNAMIC_INIT_SCALE = 2.0**16
DYNAMIC_MIN_SCALE = 2.0**-24


def check_pass_options(w: str, opts) -> None:
    """Range checks of the options every gradient source shares (``w``: ``method.oac``, ``method.guided``).
    Normalises ``loss_scale`` (float unless ``"dynamic"``) and ``cache_dir`` (str or None) in place."""
    check_choice(w, "refresh", opts.refresh, REFRESH)
    check_choice(w, "labels", opts.labels, LABELS)
    check_choice(w, "loss_reduction", opts.loss_reduction, REDUCTIONS)
    check_choice(w, "grad_dtype", opts.grad_dtype, GRAD_DTYPES)
    check_int(w, "refresh_every", opts.refresh_every, 1)
    check_int(w, "grad_batch_size", opts.grad_batch_size, 1)
    check_int(w, "seed", opts.seed, 0)
    if opts.loss_scale != "dynamic":
        try:
            check_float(w, "loss_scale", opts.loss_scale, 0, lo_open=True)
        except ConfigError:
            raise ConfigError(f"{w}.loss_scale must be a positive finite number or 'dynamic', "
                              f"got {opts.loss_scale!r}") from None
        opts.loss_scale = float(opts.loss_scale)
    opts.cache_dir = str(opts.cache_dir) if opts.cache_dir else None


class GradientHessian:
    """Base of the sources fed by the end-loss gradient pass; not registered itself (no ``SOURCE``).

    Subclasses set ``name``, ``options_class``, ``cache_kind`` and implement ``_zeros``, ``_accumulate`` and
    ``record``; they may override ``_finish`` (default: divide by the number of windows N), ``_cache_options``
    and ``_postprocess``. Options are read through attributes of the same name (``self.refresh``, ...).
    """

    name = "gradient"
    calibrated = True
    supports_groups = False  # all linears of a block come from one gradient pass (C5)
    options_class: type = None  # the typed options dataclass
    cache_kind = "oac_hessian"  # sub-directory of cache_dir (HessianCache)
    label = "oac"  # prefix of log messages and errors
    title = "output-adaptive"  # the Hessian's name in messages

    # what a checkpoint saves and a resume restores (oac/jobdir/resume.py); options always come from the job config
    RESUME_STATE = ("_scale", "_pending", "_last_k", "forms", "stats", "memory")

    def __init__(self, options=None, **kwargs):
        if options is not None and kwargs:
            raise TypeError(f"pass either an {self.options_class.__name__} or keyword options, not both")
        opts = options if options is not None else self.options_class(**kwargs)
        self.options = opts
        for f in dataclasses.fields(opts):  # read-only views used throughout (self.refresh, ...)
            setattr(self, f.name, getattr(opts, f.name))
        self._scale = DYNAMIC_INIT_SCALE if self.loss_scale == "dynamic" else float(self.loss_scale)
        # Hessians computed ahead for later blocks (every/once): tensors, or the cache key they are stored under
        self._pending: dict[int, dict[str, Tensor] | str] = {}
        self._last_k: int | None = None
        self.forms: dict[str, str] = {}  # layer shape -> chosen product form (OAC's sequence product)
        self.memory: dict = {"per_linear": {}, "pass_peak_bytes": 0, "block_max_bytes": 0}
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
            # what the Ĥ reloaded from the cache cost when they were computed (HessianCache.cost); a reloaded
            # entry without a recorded cost counts in cached_cost_unknown
            "cached_block_passes": 0,
            "cached_head_passes": 0,
            "cached_time_s": 0.0,
            "cached_cost_unknown": 0,
            "time_fwd_bwd_s": 0.0,  # forward (hooks only keep references) + loss + autograd.grad
            "time_products_s": 0.0,  # fp32 casts and Hessian products
            "time_total_s": 0.0,  # everything inside hessians()
        }

    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        try:
            k = ctx.k
            if self._last_k is None or k <= self._last_k:  # a new run: forget Hessians computed ahead
                self._pending.clear()
            self._last_k = k
            if k not in self._pending:
                self._compute(ctx)
            H = self._pending.pop(k)
            if isinstance(H, str):  # computed ahead and left in the cache (see _keep)
                H = HessianCache(self.cache_dir, self.cache_kind).load(H, [k])
                if H is None:
                    raise HessianError(f"block {k}: the {self.title} Hessians computed ahead are no longer in the "
                                       f"cache {self.cache_dir}; rerun the job")
                H = H[k]
            missing = set(group) - set(H)
            if missing:
                raise HessianError(f"block {k}: no {self.title} Hessian for {sorted(missing)}")
            out = {n: H[n].to(ctx.device) for n in group}
            return self._postprocess(ctx, group, out)
        finally:
            sync(ctx.device)
            self.stats["time_total_s"] += time.perf_counter() - t0

    def record_stats(self) -> dict:
        s = dict(self.stats)
        s["time_overhead_s"] = s["time_total_s"] - s["time_fwd_bwd_s"] - s["time_products_s"]
        return s

    # ------------------------------------------------------------------------- what a subclass defines

    def _zeros(self, lin: nn.Linear, device) -> Tensor:
        """The zero accumulator of one linear (fp32, on ``device``)."""
        raise NotImplementedError

    def _accumulate(self, H: Tensor, X: Tensor, D: Tensor) -> None:
        """Fold one mini-batch into H: X [B, T, d_in] and D [B, T, d_out] in fp32 (D with the loss scale divided out)."""
        raise NotImplementedError

    def _finish(self, H: Tensor, N: int) -> None:
        """Final normalisation in place (N calibration windows)."""
        H.div_(N)  # symmetric up to rounding, like the layer-wise H; the solvers read one triangle

    def _cache_options(self) -> dict:
        """The subclass's options that decide the Hessian's bytes (besides the shared ones of :meth:`_cache_key`)."""
        return {}

    def _postprocess(self, ctx: BlockContext, group: dict[str, nn.Linear], H: dict[str, Tensor]) -> dict[str, Tensor]:
        return H

    # ----------------------------------------------------------------------------------- internals

    def _targets(self, k: int, K: int) -> list[int]:
        if self.refresh == "per_block":
            return [k]
        if self.refresh == "once":
            if k != 0:
                log.warning("%s refresh=once started at block %d: the full-precision model is no longer "
                            "available, the Hessians of blocks %d..%d come from the current inputs of block %d",
                            self.label, k, k, K - 1, k)
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
        cache = HessianCache(self.cache_dir, self.cache_kind) if self.cache_dir else None
        key = self._cache_key(ctx, gdtype) if cache else None
        result = cache.load(key, targets) if cache else None
        if cache:
            self.stats["cache_hits" if result is not None else "cache_misses"] += 1
        if result is not None:
            cost = cache.cost(key)
            if cost is None:
                self.stats["cached_cost_unknown"] += 1
            else:
                self.stats["cached_block_passes"] += cost["block_passes"]
                self.stats["cached_head_passes"] += cost["head_passes"]
                self.stats["cached_time_s"] += cost["time_s"]
            self._note_memory(result)
            for j in targets:
                self._keep(k, j, result[j], key)
            return
        t0, bp0, hp0 = time.perf_counter(), self.stats["block_passes"], self.stats["head_passes"]
        chunks = self._chunks(ctx, targets)
        self.stats["passes"] += len(chunks) - 1
        for chunk in chunks:
            part = self._pass(ctx, chunk, gdtype)
            self._note_memory(part)
            if key:
                cache.save(key, part)
            for j in chunk:
                self._keep(k, j, part[j], key)
            del part
        if key:
            cache.save_cost(key, {"block_passes": self.stats["block_passes"] - bp0,
                                  "head_passes": self.stats["head_passes"] - hp0,
                                  "time_s": time.perf_counter() - t0})

    def _keep(self, k: int, j: int, H: dict[str, Tensor], key: str | None) -> None:
        """Block k's Hessians stay where they are; a later block's go to host RAM, or, with a cache, stay on disk
        only (``_pending[j]`` = the cache key; read back, bit for bit, when the pipeline reaches block j)."""
        if j == k:
            self._pending[j] = H
        elif key is not None:
            self._pending[j] = key
        else:
            self._pending[j] = {n: h.to("cpu") for n, h in H.items()}

    def _chunks(self, ctx: BlockContext, targets: list[int]) -> list[list[int]]:
        """The target blocks of one refresh, split so that no pass accumulates more than ``max_pass_gb`` GiB of
        Hessians on the device (an option of sources that define it; None: one pass). Every pass starts from
        the same inputs of block k with the same model, so the split is exact: more passes, the same numbers."""
        limit = getattr(self, "max_pass_gb", None)
        if limit is None or len(targets) < 2:
            return [targets]
        budget = limit * 2**30
        blocks = ctx.adapter.blocks
        chunks, cur, used = [], [], 0
        for j in targets:
            b = sum(h.numel() * h.element_size()
                    for h in (self._zeros(m, "meta") for m in ctx.adapter.linears(blocks[j]).values()))
            if cur and used + b > budget:
                chunks.append(cur)
                cur, used = [], 0
            cur.append(j)
            used += b
        chunks.append(cur)
        if len(chunks) > 1:
            log.info("%s: the Hessians of blocks %d..%d are accumulated in %d passes (max_pass_gb=%g)",
                     self.label, targets[0], targets[-1], len(chunks), limit)
        return chunks

    def _note_memory(self, result: dict[int, dict[str, Tensor]]) -> None:
        """Bytes of the fp32 Hessians: per linear, per block, and all targets of one pass (held at once)."""
        mem = self.memory
        total = 0
        for H in result.values():
            block = 0
            for n, h in H.items():
                b = h.numel() * h.element_size()
                block += b
                prev = mem["per_linear"].get(n)
                if prev is None or b > prev["bytes"]:
                    mem["per_linear"][n] = {"shape": list(h.shape), "bytes": b}
            mem["block_max_bytes"] = max(mem["block_max_bytes"], block)
            total += block
        mem["pass_peak_bytes"] = max(mem["pass_peak_bytes"], total)

    def _pass(self, ctx: BlockContext, targets: list[int], gdtype: torch.dtype) -> dict[int, dict[str, Tensor]]:
        adapter = ctx.adapter
        blocks = adapter.blocks
        K = len(blocks)
        s = ctx.k
        dev = ctx.device
        pass_modules = [blocks[m] for m in range(s, K)] + list(adapter.head_modules())
        lin = {j: adapter.linears(blocks[j]) for j in targets}
        H = {j: {n: self._zeros(m, dev) for n, m in lin[j].items()} for j in targets}
        keys = [(j, n) for j in targets for n in lin[j]]
        captured: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        if getattr(adapter.model, "training", False):
            log.warning("%s: the model is in training mode (dropout active?); call model.eval()", self.label)

        def hook_for(key):
            def hook(module, inputs, output):
                captured[key] = (inputs[0].detach(), output)
            return hook

        if torch.is_inference_mode_enabled():
            raise HessianError(f"{self.label}: the {self.title} Hessian needs autograd; do not call it under "
                               "torch.inference_mode() (no_grad is fine)")
        N, T = ctx.inps.shape[0], ctx.inps.shape[1]
        if T < 2:
            raise ConfigError(f"{self.label}: calibration windows need at least 2 tokens (labels are the next tokens)")
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
                            log.warning("%s: block %d %s does not influence the loss; its Hessian gets no term",
                                        self.label, *key)
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
                self._finish(h, N)
                if not all_finite([h]):
                    raise HessianError(f"block {j} {n}: {self.title} Hessian contains NaN/Inf")
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
            # Σ_i ℓ_i: windows are always summed (H does not depend on grad_batch_size); ``mean`` divides each
            # window's sum by its T−1 terms (all windows have the same length)
            loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
            if self.loss_reduction == "mean":
                loss = loss / (T - 1)
            if not torch.isfinite(loss):
                raise HessianError(f"block {ctx.k}: non-finite calibration loss in the forward pass "
                                   f"(windows {b0}..{b0 + n_b - 1}); the {x0.dtype} forward overflowed")
            missing = [key for key in keys if key not in captured]
            if missing:
                raise HessianError(f"{self.label}: linears {missing} were not called in the forward pass")
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
                raise HessianError(f"block {ctx.k}: non-finite output gradients (loss scale {S:g}, {x0.dtype}); "
                                   f"use {self.label}.loss_scale=dynamic, a smaller scale, or grad_dtype bf16/fp32")
            if S / 2 < DYNAMIC_MIN_SCALE:
                raise HessianError(f"block {ctx.k}: output gradients overflow even at loss scale {S:g}")
            self._scale = S / 2
            self.stats["overflow_retries"] += 1
            log.info("%s: non-finite Δ at loss scale %g; retrying the batch with %g", self.label, S, self._scale)

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

    # ------------------------------------------------------------------------------------- caching

    def _cache_key(self, ctx: BlockContext, gdtype: torch.dtype) -> str:
        adapter = ctx.adapter
        s = ctx.k
        mods = [adapter.blocks[m] for m in range(s, len(adapter.blocks))] + list(adapter.head_modules())
        options = {
            **self._cache_options(),
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
