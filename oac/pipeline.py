"""Sequential block-by-block quantization (METHODS.md A5).

    catch the inputs of block 0 (and every kwarg the model passes to blocks)
    for each block k:
        for each group of linears (all at once, or true-sequential sub-groups):
            H_l = hessian_source.hessians(block k, group)      # layer-wise 2XᵀX or OAC's Ĥ
            Ŵ_l = solve(W_l, H_l, cfg)                           # GPTQ / SpQR / BiLLM / ...
        inputs of block k+1 = block k (now quantized) applied to the inputs of block k

Only the current block needs to be on the compute device (``offload=True``); calibration
activations stay where ``act_device`` says.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oac.hessian.base import BlockContext
from oac.models import Adapter, fit_kwargs, run_block
from oac.numerics import jitter
from oac.solvers.common import check_finite

log = logging.getLogger(__name__)


class _Caught(Exception):
    pass


@dataclass
class PipelineState:
    """What the block loop produces: per-layer statistics and phase timings."""

    layers: list[dict] = field(default_factory=list)
    time_s: dict = field(default_factory=lambda: {"catch": 0.0, "hessian": 0.0, "solve": 0.0, "propagate": 0.0})
    start_block: int = 0


def _non_block_modules(adapter: Adapter) -> list[nn.Module]:
    mods = [m for n, m in adapter.decoder.named_children() if n != "layers"]
    return mods + [adapter.model.lm_head]


@torch.no_grad()
def catch_block_inputs(adapter: Adapter, calib_ids: Tensor, device, *, batch_size: int = 1,
                       act_device=None) -> tuple[Tensor, dict]:
    """Run the embeddings on all windows; return inputs of block 0 [N,T,d] and the block kwargs."""
    act_device = act_device or device
    for m in _non_block_modules(adapter):
        m.to(device)
    block0 = adapter.blocks[0]
    store: dict = {}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store["hidden"] = hidden
        store.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    handle = block0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    chunks = []
    try:
        for b0 in range(0, calib_ids.shape[0], batch_size):
            try:
                adapter.model(input_ids=calib_ids[b0 : b0 + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
            chunks.append(store.pop("hidden").to(act_device))
    finally:
        handle.remove()
    kwargs = store["kwargs"]
    kwargs["_capture_batch"] = min(batch_size, calib_ids.shape[0])
    kwargs["use_cache"] = False
    return torch.cat(chunks), kwargs


@torch.no_grad()
def propagate(block: nn.Module, inps: Tensor, kwargs: dict, device, batch_size: int) -> Tensor:
    """Apply one block to all cached inputs (outputs written into a new buffer on the inputs' device)."""
    outs = torch.empty_like(inps)
    for b0 in range(0, inps.shape[0], batch_size):
        x = inps[b0 : b0 + batch_size].to(device)
        outs[b0 : b0 + x.shape[0]] = run_block(block, x, fit_kwargs(kwargs, x.shape[0])).to(outs.device)
    return outs


def quantize_model(
    adapter: Adapter,
    calib_ids: Tensor,
    source,
    solve: Callable,
    solver_cfg,
    *,
    device,
    true_sequential: bool = False,
    offload: bool = True,
    batch_size: int = 1,
    act_device=None,
    on_block_done: Callable | None = None,
    resume: dict | None = None,
    jitter_seed: int | None = None,
) -> PipelineState:
    """Quantize every linear of every decoder block in place. Returns per-layer stats and timings.

    One loop for every method: a source that is not ``calibrated`` (RTN's "no Hessian") gets no calibration
    data, so nothing is caught or propagated and the solver is called with ``H = None``.
    ``on_block_done(k, state, inps)`` is called after block k is finished (checkpointing; ``inps`` None
    without calibration); ``resume`` = {"block": k, "inps": Tensor | None, "state": PipelineState} restarts at k.
    """
    state = PipelineState()
    calibrated = getattr(source, "calibrated", True)
    inps, kwargs = None, {}
    if calibrated:
        t0 = time.perf_counter()
        inps, kwargs = catch_block_inputs(adapter, calib_ids, device, batch_size=batch_size, act_device=act_device)
        state.time_s["catch"] += time.perf_counter() - t0
    if resume is not None:
        state = resume["state"]
        if inps is not None:
            inps = resume["inps"].to(inps.device, inps.dtype)
        state.start_block = resume["block"]
    blocks = adapter.blocks
    for k in tqdm(range(state.start_block, len(blocks)), desc="blocks", initial=state.start_block,
                  total=len(blocks), mininterval=5):
        block = blocks[k].to(device)
        linears = adapter.linears(block)
        groups = adapter.sequential_groups() if (true_sequential and getattr(source, "supports_groups", False)) \
            else [list(linears)]
        ctx = BlockContext(k=k, block=block, inps=inps, block_kwargs=kwargs, calib_ids=calib_ids,
                           adapter=adapter, device=torch.device(device), batch_size=batch_size)
        for group in groups:
            t = time.perf_counter()
            hessians = source.hessians(ctx, {n: linears[n] for n in group})
            state.time_s["hessian"] += time.perf_counter() - t
            for name in group:
                layer = linears[name]
                t = time.perf_counter()
                H = hessians.pop(name)
                W = layer.weight.data
                check_finite(W, H, f"block {k} {name}")
                if jitter_seed is not None and H is not None:
                    H = jitter(H, jitter_seed, k, name)
                res = solve(W.float(), H, solver_cfg)
                layer.weight.data = res.weight.to(W.dtype).reshape(W.shape)
                dt = time.perf_counter() - t
                state.time_s["solve"] += dt
                rec = {"block": k, "name": name, "shape": list(W.shape), "time_s": dt}
                rec.update({key: v for key, v in res.stats.items() if isinstance(v, (int, float, str, bool))})
                state.layers.append(rec)
                del H, res
        if calibrated:
            t = time.perf_counter()
            inps = propagate(block, inps, kwargs, device, batch_size)
            state.time_s["propagate"] += time.perf_counter() - t
        if offload and str(device) != "cpu":
            blocks[k].to("cpu")
        if on_block_done is not None:
            on_block_done(k, state, inps)
    return state


def aggregate_bits(layers: list[dict]) -> dict:
    """Weight-count-weighted averages of the per-layer bit figures and fractions."""
    total = sum(r.get("n_weights", r["shape"][0] * r["shape"][1]) for r in layers)
    out = {}
    for key in ("bits_nominal", "bits_reported", "bits_full", "outlier_fraction", "salient_fraction"):
        if layers and all(key in r for r in layers):
            out[key] = sum(r[key] * r.get("n_weights", r["shape"][0] * r["shape"][1]) for r in layers) / total
    out["n_weights"] = total
    return out
