"""Generic helpers to move and cast a set of modules for one pass and put them back exactly afterwards."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sync(device) -> None:
    """Wait for the device (CUDA) so wall-clock timings mean what they say."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def all_finite(tensors: list[Tensor]) -> bool:
    """One fp32 sum per tensor (NaN/inf propagate) and a single host sync: cheaper than isfinite().all().

    A finite tensor can only be misreported if its fp32 sum overflows (|Σ| > 3e38).
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return bool(torch.isfinite(sums).all())


def module_device(m: nn.Module):
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return None


def move_modules(modules: list[nn.Module], dev) -> list[tuple[nn.Module, torch.device]]:
    """Move modules to ``dev``; return (module, original device) for those moved (see :func:`restore_devices`)."""
    dev = torch.device(dev)
    moved = []
    for m in modules:
        d = module_device(m)
        if d is not None and (d.type != dev.type or (dev.index is not None and d.index != dev.index)):
            moved.append((m, d))
            m.to(dev)
    return moved


def restore_devices(moved) -> None:
    for m, d in moved:
        m.to(d)


def cast_modules(modules: list[nn.Module], dtype: torch.dtype) -> list:
    """Cast floating parameters/buffers to ``dtype``; keep the originals to restore exactly (:func:`restore_cast`)."""
    saved, seen = [], set()
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen and p.is_floating_point() and p.dtype != dtype:
                seen.add(id(p))
                saved.append(("param", p, p.data))
                p.data = p.data.to(dtype)
        for mod in m.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != dtype and id(b) not in seen:
                    seen.add(id(b))
                    saved.append(("buffer", (mod, name), b))
                    mod._buffers[name] = b.to(dtype)
    return saved


def restore_cast(saved) -> None:
    for kind, obj, orig in saved:
        if kind == "param":
            obj.data = orig
        else:
            mod, name = obj
            mod._buffers[name] = orig


def cast_kwargs(kwargs: dict, dtype: torch.dtype) -> dict:
    """Floating tensors (and tuples of them) among block kwargs cast to ``dtype``."""
    def cast(v):
        if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != dtype:
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(t) for t in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}
