"""The contract between the sequential pipeline and a Hessian source.

The pipeline (``oac.pipeline``) walks the decoder blocks in order. For block ``k`` it builds a
:class:`BlockContext` and, for every group of linears it is about to quantize, asks the source
``hessians(ctx, group)`` for one fp32 d_in×d_in matrix per linear. Sources never modify weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class BlockContext:
    """Everything a Hessian source may need about the block being quantized.

    ``inps``: [N, T, d_model] hidden states entering block ``k`` for the N calibration windows
    (model dtype; CPU or device). They already reflect the quantized blocks < k.
    ``block_kwargs``: keyword arguments the model passes to every decoder block (attention mask,
    position embeddings, ...), captured once and replayed verbatim.
    ``calib_ids``: [N, T] token ids of the calibration windows (labels for OAC).
    ``adapter``: the model adapter (blocks, final norm, lm_head; see ``oac.models``).
    """

    k: int
    block: nn.Module
    inps: Tensor
    block_kwargs: dict[str, Any]
    calib_ids: Tensor
    adapter: Any
    device: torch.device
    batch_size: int = 1


class HessianSource(Protocol):
    name: str

    def hessians(self, ctx: BlockContext, group: dict[str, nn.Linear]) -> dict[str, Tensor]:
        """Return {linear name: fp32 Hessian [d_in, d_in]} for every linear of ``group``."""
        ...

    def record(self) -> dict:
        """Settings and normalisation to store in result.json."""
        ...
