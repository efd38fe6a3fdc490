"""linear_recurrence kernel: exact rational reference, composed bound, signs, zeros, NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import DTYPES, exact_recurrence

from attnprec.analysis.bounds.graphs import recurrence_rounding_bound
from attnprec.kernels import interpreted, linear_recurrence, precision_for
from attnprec.kernels.recurrence import BLOCK_T


def check(a, b, x0=None):
    y = linear_recurrence(a, b, x0)
    assert y.dtype == a.dtype and y.shape == a.shape
    ref = exact_recurrence(a, b, x0)
    bound = recurrence_rounding_bound(
        a, b, x0, precision_for(a.dtype, interpreted()), block=BLOCK_T
    )
    # float64 rounding of the exact rational: 2^-53 |exact| <= 2^-52 |ref|
    lim = bound + 2.0**-52 * ref.abs()
    err = (y.double() - ref).abs()
    assert (err <= lim).all(), (err - lim).max()
    return y, ref


def gates(kind: str, shape, g):
    if kind == "gauss":
        return torch.randn(*shape, generator=g)
    if kind == "decay":
        return 0.8 + 0.2 * torch.rand(*shape, generator=g)
    if kind == "signs":  # gates of both signs near 1, some exact zeros (restarts)
        a = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
        a = a * (0.9 + 0.1 * torch.rand(*shape, generator=g))
        return torch.where(torch.rand(*shape, generator=g) < 0.05, 0.0, a)
    # "wide": far outside 1, within float16 range (e^10 < 65504)
    return torch.exp((8 * torch.randn(*shape, generator=g)).clamp(-10, 10))


# Each example is one interpreter run and an exact rational reference (~0.3 s).
@given(
    kind=st.sampled_from(["gauss", "decay", "signs", "wide"]),
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 100),
    rows=st.integers(1, 5),
    with_x0=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_recurrence_within_bound(kind, dtype, n, rows, with_x0, seed):
    g = torch.Generator().manual_seed(seed)
    a = gates(kind, (rows, n), g).to(dtype)
    b = torch.randn(rows, n, generator=g).to(dtype)
    x0 = torch.randn(rows, generator=g).to(dtype) if with_x0 else None
    check(a, b, x0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_recurrence_long(dtype):
    """n = 512 over many chunks, decaying gates of both signs."""
    g = torch.Generator().manual_seed(1)
    a = (gates("signs", (3, 512), g)).to(dtype)
    b = torch.randn(3, 512, generator=g).to(dtype)
    check(a, b, torch.ones(3, dtype=dtype))


def test_exact_signs_and_cancellation():
    """a = -1, b = 1 alternates 1, 0, 1, 0: the zeros are exact, across chunk boundaries."""
    a = -torch.ones(2, 70)
    b = torch.ones(2, 70)
    y, _ = check(a, b)
    assert torch.equal(y[:, 1::2], torch.zeros_like(y[:, 1::2]))
    assert torch.equal(y[:, 0::2], torch.ones_like(y[:, 0::2]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_subnormal_inputs_carried_by_later_gates(dtype):
    """b_1 below fp32's normal range, then a gate of 2^100: a flushed b_1 (fast math), or
    under the interpreter a bfloat16 subnormal loaded as another one (1.5 2^-130 as
    2^-127), is off by up to min_normal, times every later gate: the bound charged one
    min_normal in all (a review: 917x outside in bf16, 28 elements of an ordinary sweep
    1.7x). An exact FTZ emulation, then the kernel."""
    a = torch.tensor([[1.0, 2.0**100, 1.0, 0.5]], dtype=torch.float64).to(dtype)
    b = torch.tensor([[1.5 * 2.0**-130, 0.0, 0.0, 0.0]], dtype=torch.float64).to(dtype)
    bound = recurrence_rounding_bound(
        a, b, None, precision_for(a.dtype, interpreted()), block=BLOCK_T
    )
    ref = exact_recurrence(a, b, None)
    assert bool((ref[0, 1:] > 5e-10).all())
    ftz = torch.zeros_like(ref)  # b_1 flushed: every state 0
    assert bool(((ftz - ref).abs() <= bound + 2.0**-52 * ref.abs()).all())
    check(a, b)


def test_zero_gate_restarts():
    a = torch.full((1, 40), 3.0)
    a[0, 20] = 0.0
    b = torch.ones(1, 40)
    y = linear_recurrence(a, b)
    assert y[0, 20] == 1.0 and y[0, 21] == 4.0


def test_beyond_range_overflows_like_floats():
    """State magnitudes past float16 become inf in the output, without NaN."""
    a = torch.full((1, 40), 8.0, dtype=torch.float16)
    b = torch.ones(1, 40, dtype=torch.float16)
    y = linear_recurrence(a, b)
    assert torch.isinf(y[0, -1]) and not torch.isnan(y).any()


def test_nan_poisons_later_states():
    a = torch.ones(1, 10)
    b = torch.ones(1, 10)
    a[0, 4] = float("nan")
    a[0, 6] = 0.0  # a restart does not clear it: 0 * NaN is NaN
    y = linear_recurrence(a, b)
    assert not torch.isnan(y[0, :4]).any() and torch.isnan(y[0, 4:]).all()


def test_dim_argument():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 50, 4, generator=g)
    b = torch.randn(3, 50, 4, generator=g)
    y = linear_recurrence(a, b, dim=1)
    y2 = linear_recurrence(a.movedim(1, -1), b.movedim(1, -1))
    assert torch.equal(y, y2.movedim(-1, 1))
