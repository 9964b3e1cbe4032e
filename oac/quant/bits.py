"""Bit accounting (PROTOCOLS.md §4, METHODS.md B2-B4).

Every quantized model reports three averages over the weights of the quantized linear layers:
``bits_nominal``, ``bits_reported`` (the method paper's own convention) and ``bits_full``
(everything a decoder needs with naive storage).
"""

from __future__ import annotations


def n_groups(d_in: int, groupsize: int | None) -> int:
    """Groups of ``groupsize`` consecutive columns per row: ceil(d_in / g), the last one shorter when g does
    not divide d_in (the GPTQ reference's behaviour); 1 for per-channel (-1, 0 or None)."""
    if groupsize in (-1, 0, None):
        return 1
    return -(-int(d_in) // int(groupsize))


def uniform_bits(wbits: int, groupsize: int, d_in: int, *, packed_zero: bool = False) -> tuple[float, float]:
    """(reported, full) for RTN/GPTQ: b, and b + (16+16)·n_g/d_in (fp16 zero) or b + (16+b)·n_g/d_in
    (packed zero), n_g = ceil(d_in/g) groups per row (1 per-channel). When g divides d_in this is exactly the
    b + 32/g of PROTOCOLS.md §4 (both are the correctly rounded value of the same rational); a short last
    group still carries a full (s, z) pair."""
    per_group = (16 + wbits) if packed_zero else 32
    return float(wbits), wbits + per_group * n_groups(d_in, groupsize) / int(d_in)


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


def billm_bits(salient_fraction: float, blocksize: int, d_out: int, d_in: int | None = None) -> tuple[float, float]:
    """(reported, full) for BiLLM: 1 + r, and 2 + 128·n_b/d_in + 1/d_out (METHODS.md B4).

    n_b = ceil(d_in/B) blocks per row, each storing its 8 fp16 statistics per row (a short last block too);
    without ``d_in`` (or when B divides d_in) the overhead is the 128/B of B4.
    """
    reported = 1.0 + salient_fraction
    stats = 8 * 16 / blocksize if d_in is None else 8 * 16 * n_groups(d_in, blocksize) / int(d_in)
    full = (1 - salient_fraction) * 1 + salient_fraction * 2 + (1 - salient_fraction) * 1 + 1 / d_out + stats
    return reported, full
