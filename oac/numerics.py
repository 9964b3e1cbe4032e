"""Controlled numeric perturbation: replicates that measure the floating-point band on one machine.

``jitter_seed=K`` multiplies every Hessian handed to a solver by (1 + 2⁻²³·u) elementwise, u uniform in
[−1, 1], symmetric (u_ij = u_ji, so H stays symmetric) and drawn from a generator seeded by (K, block, layer):
a perturbation of at most one fp32 ulp (2⁻²³ is fp32's relative spacing at 1), i.e. what another BLAS, thread
count or CPU does to H. The replicates K = 1, 2, ... of one configuration spread as far as last-bit
differences make it spread: the *numeric band*, reported next to the calibration-seed spread
(``experiments/seeds.py``). ``jitter_seed=null`` (the default) leaves H untouched: the default path never
calls :func:`jitter`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

EPS = 2.0**-23


def _generator(seed: int, block: int, name: str) -> torch.Generator:
    key = hashlib.sha256(f"{int(seed)}:{int(block)}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def jitter(H: Tensor, seed: int, block: int, name: str) -> Tensor:
    """H ⊙ (1 + 2⁻²³·u) with u symmetric, uniform in [−1, 1], seeded by (seed, block, name). Works on
    [d, d] and stacked [..., d, d] Hessians; returns a new tensor of H's dtype and device."""
    d = H.shape[-1]
    u = torch.rand(H.shape, generator=_generator(seed, block, name), dtype=torch.float64) * 2 - 1
    u = torch.triu(u) + torch.triu(u, 1).transpose(-1, -2)
    assert u.shape[-2:] == (d, d)
    return (H.double() * (1 + EPS * u).to(H.device)).to(H.dtype)
