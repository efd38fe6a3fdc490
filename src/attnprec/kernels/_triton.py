"""Triton helpers shared by the kernels: the output store (explicit RNE for bfloat16)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, y, mask, BF16: tl.constexpr):
    """Store float32 ``y`` in ``ptr``'s dtype, rounding to nearest even.

    float16 and float32 stores round to nearest even on a GPU and under the interpreter.
    The interpreter's float32->bfloat16 conversion truncates (and mishandles subnormals),
    so bfloat16 is rounded here in integer arithmetic (add half an ulp minus one plus the
    kept lsb, keep the top 16 bits) and the bits are stored as they are: no conversion
    runs at all. NaN becomes the quiet NaN 0x7FC0 (the bit trick could turn it into inf).
    """
    if BF16:
        bits = y.to(tl.uint32, bitcast=True)
        hi = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
        hi = tl.where(y != y, 0x7FC0, hi).to(tl.uint16)
        tl.store(ptr.to(tl.pointer_type(tl.uint16)), hi, mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_quotient(o_ptr, num, den, rows, rm, dvo, dvm, dv, BF16: tl.constexpr):
    """Store the rows ``num / den`` of a ``[BLK, d_v]`` output tile (padding rows divide by 1)."""
    y = num / tl.where(rm, den, 1.0)[:, None]
    store_rounded(o_ptr + rows[:, None] * dv + dvo[None, :], y, rm[:, None] & dvm[None, :], BF16)


__all__ = ["store_rounded", "store_quotient", "triton"]
