"""GuidedQuant's grouped Fisher Hessians (Kim et al., ICML 2025), from OAC's gradient pass (``hessian: guided``).

For a linear layer with inputs x_n (n runs over the tokens of all calibration windows) and output gradients
δ_n = ∂ℓ/∂y_n [d_out] (the next-token cross-entropy of the window, through the later blocks and the head: the
same pass as OAC's, ``oac/hessian/gradients.py``), the d_out output channels are split into G contiguous groups
of d_out/G channels and group g gets

    H_g = (1/N) Σ_n s_{n,g} x_n x_nᵀ,     s_{n,g} = Σ_{c ∈ group g} δ_{n,c}²          (N = number of windows)

GuidedQuant writes s_{n,g} as the *mean* over the group's channels; the sum used here is (d_out/G) times it, one
constant for all groups of a layer, which changes no solver result (METHODS.md C3; each group is moreover solved
on its own) and makes G = 1 exactly OAC's token-diagonal Ĥ (``product=token``: (1/N) Σ_n ‖δ_n‖² x_n x_nᵀ), bit
for bit, so the two can be compared without tolerance. ``record()`` states the normalisation.

What the solver receives: for G = 1 one [d_in, d_in] H per linear (every solver); for G > 1 a stack
[G, d_in, d_in] — row group g of W, rows [g·d_out/G, (g+1)·d_out/G), is solved with H[g]
(``oac.solvers.common.solve_row_groups``: GPTQ and SpQR; BiLLM refuses G > 1, see ``oac/solvers/billm.py``).
G must divide every linear's d_out (checked once the model is loaded, before calibration).

Refresh (which model state the Hessians of block k come from) is OAC's: ``once`` (default: GuidedQuant's one
backward pass of the full-precision model; G = 1 then equals OAC's ``product=token refresh=once``), ``per_block``
(from the inputs of block k after the quantized blocks < k, like OAC's C5) or ``every`` r blocks. Labels, loss
reduction and scale, gradient dtype and mini-batching are OAC's options with OAC's meaning.

Memory: G fp32 matrices of d_in² per linear, i.e. G times OAC's or the layer-wise H (LLaMA-7B: 64 MB·G per
4096-wide projection, 485 MB·G for down_proj); with ``refresh=once`` the Hessians of all blocks are accumulated in
the one pass (≈ 28 GB·G for a 7B model; 0.5 GB·G for SmolLM2-135M) and then wait in host RAM for their block —
or, with ``cache_dir``, on disk only. ``max_pass_gb`` bounds the device side: the pass is split into several
passes from the same inputs, each accumulating some of the blocks (exact, bit for bit; more passes).
``record()["memory"]`` gives the bytes per linear, the largest block and the largest pass.

Cache (``cache_dir``): entries live under ``<cache_dir>/guided_hessian/`` (OAC's under ``oac_hessian/``) and the
key carries ``source: guided`` and G, so guided and OAC entries never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from oac.errors import ConfigError
from oac.hessian import HessianSpec
from oac.hessian.gradients import GradientHessian, check_pass_options
from oac.registry import check_float, check_int


@dataclass
class GuidedOptions:
    """The guided source's options (``method.guided``; defaults in configs/hessian/guided.yaml)."""

    groups: int = 1  # G >= 1 contiguous groups of output channels, one Hessian each (must divide d_out)
    refresh: str = "once"  # once (GuidedQuant: one pass of the FP model) | per_block | every (refresh_every)
    refresh_every: int = 4
    labels: str = "data"  # data (empirical Fisher) | sampled (labels drawn from the model)
    seed: int = 0  # sampled labels only
    grad_dtype: str | None = None  # None = model dtype | fp32 | fp16 | bf16
    loss_reduction: str = "sum"  # sum | mean (token mean per window); irrelevant to the result (C3)
    loss_scale: float | str = 1.0  # S > 0, or "dynamic"
    grad_batch_size: int = 1  # windows per forward+backward (exact for any value)
    cache_dir: str | None = None  # reuse the Hessians across runs (exact; oac/hessian/cache.py)
    max_pass_gb: float | None = None  # split a once/every pass so it accumulates at most this many GiB (exact)

    def __post_init__(self):
        w = "method.guided"
        check_int(w, "groups", self.groups, 1)
        check_pass_options(w, self)
        if self.max_pass_gb is not None:
            check_float(w, "max_pass_gb", self.max_pass_gb, 0, lo_open=True)
            self.max_pass_gb = float(self.max_pass_gb)


class GuidedHessian(GradientHessian):
    """Grouped Fisher Hessians for the sequential pipeline (``hessian: guided``).

    ``GuidedHessian(GuidedOptions(...))``, or the same options as keywords for scripts and tests.
    """

    name = "guided"
    options_class = GuidedOptions
    cache_kind = "guided_hessian"
    label = "guided"
    title = "guided"

    def record(self) -> dict:
        G = self.groups
        norm = ("(1/N) * sum_n s_ng x_n x_n^T, s_ng = sum over the d_out/G channels c of group g of (dl/dy_nc)^2 "
                "(= d_out/G * GuidedQuant's channel mean; G = 1: OAC's product=token H exactly); "
                f"l = {'sum' if self.loss_reduction == 'sum' else 'mean'} of the T-1 next-token CE terms of each "
                f"window ({self.labels} labels); loss scale divided out")
        return {
            "hessian": self.name,
            "groups": G,
            "row_rule": "rows [g*d_out/G, (g+1)*d_out/G) are solved with H[g]; G = 1: one [d_in, d_in] H",
            "refresh": self.refresh,
            "refresh_every": self.refresh_every,
            "labels": self.labels,
            "seed": self.seed,
            "grad_dtype": self.grad_dtype,
            "loss_reduction": self.loss_reduction,
            "loss_scale": self.loss_scale,
            "loss_scale_final": self._scale,
            "grad_batch_size": self.grad_batch_size,
            "cache_dir": self.cache_dir,
            "max_pass_gb": self.max_pass_gb,
            "normalisation": norm,
            "memory": self.memory,
            "stats": self.record_stats(),
        }

    # ------------------------------------------------------------------------------- the accumulator

    def _zeros(self, lin: nn.Linear, device) -> Tensor:
        G, d_in = self.groups, lin.in_features
        if lin.out_features % G:
            raise ConfigError(f"method.guided.groups={G} does not divide d_out={lin.out_features} "
                              f"(the rows are split into {G} contiguous groups of d_out/{G})")
        shape = (d_in, d_in) if G == 1 else (G, d_in, d_in)
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def _accumulate(self, H: Tensor, X: Tensor, D: Tensor) -> None:
        """H[g] += Σ_{b,t} s_btg x_bt x_btᵀ in fp32, s_btg = Σ_{c ∈ g} D_btc² (X [B,T,d_in], D [B,T,d_out])."""
        B, T, d_in = X.shape
        G, d_out = self.groups, D.shape[-1]
        if G == 1:  # OAC's product=token accumulation, operation for operation
            w = D.square().sum(-1).sqrt().unsqueeze(-1)  # ‖δ_t‖
            Xw = (X * w).reshape(B * T, d_in)
            H.addmm_(Xw.T, Xw)
            return
        w = D.square().reshape(B, T, G, d_out // G).sum(-1).sqrt()  # [B, T, G]: √s
        for g in range(G):
            Xw = (X * w[..., g : g + 1]).reshape(B * T, d_in)
            H[g].addmm_(Xw.T, Xw)

    def _cache_options(self) -> dict:
        return {"source": self.name, "groups": self.groups}


SOURCE = HessianSpec("guided", GuidedHessian, GuidedOptions, options_key="guided", order=30,
                     row_groups=lambda opts: opts.groups)
