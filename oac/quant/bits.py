"""Bit accounting (PROTOCOLS.md §4, METHODS.md B2-B4).

Every quantized model reports three averages over the weights of the quantized linear layers:
``bits_nominal``, ``bits_reported`` (the method paper's own convention) and ``bits_full``
(everything a decoder needs with naive storage).
"""

from __future__ import annotations


def uniform_bits(wbits: int, groupsize: int, d_in: int, *, packed_zero: bool = False) -> tuple[float, float]:
    """(reported, full) for RTN/GPTQ: b, and b + (16+16)/g (fp16 zero) or b + (16+b)/g (packed zero)."""
    g = d_in if groupsize in (-1, 0, None) else groupsize
    overhead = (16 + wbits) / g if packed_zero else 32 / g
    return float(wbits), wbits + overhead


def spqr_bits(
    wbits: int,
    groupsize: int,
    qq_groupsize: int,
    outlier_fraction: float,
    *,
    qq_scale_bits: int | None = 3,
    qq_zero_bits: int | None = 3,
    round_zero: bool = False,
) -> float:
    """SpQR average bits (METHODS.md B3). Unquantized statistics count as 16 bits."""
    sb = 16 if qq_scale_bits is None else qq_scale_bits
    if round_zero:
        zb = wbits if qq_zero_bits is None else qq_zero_bits
        second = (16 + 16) / (groupsize * qq_groupsize)
        return wbits + (sb + wbits) / groupsize + second + 32 * outlier_fraction
    zb = 16 if qq_zero_bits is None else qq_zero_bits
    n_second = (qq_scale_bits is not None) + (qq_zero_bits is not None)
    second = n_second * (16 + 16) / (groupsize * qq_groupsize)
    return wbits + (sb + zb) / groupsize + second + 32 * outlier_fraction


def billm_bits(salient_fraction: float, blocksize: int, d_out: int) -> tuple[float, float]:
    """(reported, full) for BiLLM: 1 + r, and 2 + 128/B + 1/d_out (METHODS.md B4)."""
    reported = 1.0 + salient_fraction
    full = (1 - salient_fraction) * 1 + salient_fraction * 2 + (1 - salient_fraction) * 1 + 1 / d_out + 8 * 16 / blocksize
    return reported, full
