"""What the Triton interpreter does on stores, and the kernels' explicit bfloat16 rounding."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from attnprec.kernels import interpreted
from attnprec.kernels._triton import store_rounded

pytestmark = pytest.mark.skipif(not interpreted(), reason="checks the CPU interpreter")


@triton.jit
def _plain_store(x_ptr, y_ptr, n, BLK: tl.constexpr):
    o = tl.arange(0, BLK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n).to(y_ptr.dtype.element_ty), mask=o < n)


@triton.jit
def _rounded_store(x_ptr, y_ptr, n, BF16: tl.constexpr, BLK: tl.constexpr):
    o = tl.arange(0, BLK)
    store_rounded(y_ptr + o, tl.load(x_ptr + o, mask=o < n), o < n, BF16)


def _values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g) * torch.exp(4 * torch.randn(4000, generator=g))
    # ties (exactly halfway between bfloat16 neighbours) of both parities, signed zero, inf,
    # the overflow threshold
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2.0**-130 * 1.5])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.39e38])
    return torch.cat([x, ties, special]).float()


def _run(kernel, x, dtype, **kw):
    y = torch.empty(x.shape, dtype=dtype)
    kernel[(1,)](x, y, x.numel(), BLK=triton.next_power_of_2(x.numel()), **kw)
    return y


def test_interpreter_fp16_store_rounds_to_nearest_even():
    x = _values()
    assert torch.equal(_run(_plain_store, x, torch.float16), x.to(torch.float16))


def test_interpreter_bf16_store_truncates():
    """The reason the kernels store bfloat16 bits themselves: a plain conversion truncates
    normal numbers (and maps float32 subnormals to wrong values: 1.5 * 2^-130 became
    2^-127 in triton 3.9's interpreter)."""
    x = _values()
    y = _run(_plain_store, x, torch.bfloat16).float()
    normal = torch.isfinite(x) & (x.abs() >= 2.0**-126)
    trunc = (x.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(y[normal], trunc[normal])
    assert not torch.equal(y, x.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_store_rounded_is_rne(dtype):
    x = _values()
    y = _run(_rounded_store, x, dtype, BF16=dtype == torch.bfloat16)
    assert torch.equal(y, x.to(dtype))


def test_store_rounded_keeps_nan():
    x = torch.tensor([float("nan"), 1.0, -float("nan")])
    y = _run(_rounded_store, x, torch.bfloat16, BF16=True)
    assert torch.isnan(y[0]) and torch.isnan(y[2]) and y[1] == 1.0
