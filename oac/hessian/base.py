"""The contract between the block loop (``oac.pipeline``) and a Hessian source.

The loop walks the decoder blocks in order. For block ``k`` it builds a :class:`BlockContext` and, for every
group of linears it is about to quantize, asks the source ``hessians(ctx, group)`` for one fp32 d_in×d_in matrix
per linear (``None`` from a source that feeds no Hessian). Sources never modify weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn


@dataclass
class BlockContext:
    """Everything a Hessian source may need about the block being quantized.

    ``inps``: [N, T, d_model] hidden states entering block ``k`` for the N calibration windows
    (model dtype; CPU or device). They already reflect the quantized blocks < k. None for an uncalibrated
    source (no calibration data: RTN).
    ``block_kwargs``: keyword arguments the model passes to every decoder block (attention mask,
    position embeddings, ...), captured once and replayed verbatim.
    ``calib_ids``: [N, T] token ids of the calibration windows (labels for OAC).
    ``adapter``: the model adapter (blocks, final norm, lm_head; see ``oac.models``).
    """

    k: int
    block: nn.Module
    inps: Tensor | None
    block_kwargs: dict[str, Any]
    calib_ids: Tensor | None
    adapter: Any
    device: torch.device
    batch_size: int = 1


class HessianSource(Protocol):
    """What ``HessianSpec.build`` returns (registered in ``oac.hessian``)."""

    name: ClassVar[str]
    calibrated: ClassVar[bool]  # False: needs no calibration data, no block inputs (the loop runs no forward)
    supports_groups: ClassVar[bool]  # can serve true-sequential sub-groups of a block
    RESUME_STATE: ClassVar[tuple[str, ...]]  # run state a checkpoint saves and a resume restores (not options)

    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, Tensor | None]:
        """Return {linear name: fp32 Hessian [d_in, d_in] (or None)} for every linear of ``group``."""
        ...

    def record(self) -> dict:
        """Settings and normalisation to store in result.json."""
        ...
