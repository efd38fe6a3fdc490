"""linear_recurrence against an exact (mpmath) sequential loop, within its bound."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lognum_ref import PREC, U

from attnprec.lognum import SignedLog, linear_recurrence

DTYPES = [torch.float32, torch.float64]


def _exact(a, b, x0):
    """x_t and T_t (the recurrence on absolute values), at PREC bits."""
    with mpmath.workprec(PREC):
        x = mpmath.mpf(x0)
        t = abs(x)
        xs, ts = [], []
        for ai, bi in zip(a, b, strict=True):
            x = mpmath.mpf(ai) * x + mpmath.mpf(bi)
            t = abs(mpmath.mpf(ai)) * t + abs(mpmath.mpf(bi))
            xs.append(x)
            ts.append(t)
        return xs, ts


def _bound(a, b, x0, dtype):
    u = 2.0**-53
    n = len(a)
    logs = lambda v: [abs(math.log(abs(x))) for x in v if x != 0]
    lam = sum(logs(a)) + max(logs(b), default=0.0) + max(logs([x0]), default=0.0)
    delta = (math.ceil(math.log2(max(n, 1))) + 3) * u * (4 * lam + 4)
    return math.expm1(delta), U[dtype]


@st.composite
def problems(draw, dtype):
    n = draw(st.integers(1, 40))
    width = 32 if dtype == torch.float32 else 64
    scale = draw(st.sampled_from([1.0, 1.5, 30.0]))
    coef = st.one_of(st.floats(-scale, scale, width=width), st.just(0.0))
    a = draw(st.lists(coef, min_size=n, max_size=n))
    b = draw(st.lists(st.floats(-10, 10, width=width), min_size=n, max_size=n))
    x0 = draw(st.one_of(st.just(0.0), st.floats(-10, 10, width=width)))
    return a, b, x0


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_matches_exact_loop(dtype, data):
    a, b, x0 = data.draw(problems(dtype))
    got = linear_recurrence(
        torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype), torch.tensor(x0, dtype=dtype)
    )
    assert got.dtype == dtype
    check_exact(got, a, b, x0, dtype)


def check_exact(got, a, b, x0, dtype):
    """``got`` (1-d) within the documented bound of the exact loop, signs right where the
    bound is below |x_t|."""
    xs, ts = _exact(a, b, x0)
    rel, u_out = _bound(a, b, x0, dtype)
    with mpmath.workprec(PREC):
        for t, (g, x, tt) in enumerate(zip(got.tolist(), xs, ts, strict=True)):
            if abs(x) > float(torch.finfo(dtype).max):
                assert math.isinf(g) and (g > 0) == (x > 0)  # overflow, as float would
                continue
            fi = torch.finfo(dtype)  # half the smallest subnormal (not a float64 for float64)
            eta = mpmath.mpf(fi.smallest_normal) * mpmath.mpf(fi.eps) / 2
            bound = rel * (1 + u_out) * tt + u_out * abs(x) + eta
            assert abs(mpmath.mpf(g) - x) <= bound, (t, g, float(x), float(bound))
            if bound < abs(x):
                assert (g > 0) == (x > 0)


def test_signedlog_far_beyond_range():
    # a = e^800 (no float holds it): x_t = e^(800 t) sum ... computed without overflow.
    n = 6
    a = SignedLog(torch.full((n,), 800.0, dtype=torch.float64), -torch.ones(n, dtype=torch.int8))
    b = SignedLog(torch.zeros(n, dtype=torch.float64))  # b_t = 1
    x = linear_recurrence(a, b)
    assert isinstance(x, SignedLog)
    with mpmath.workprec(PREC):
        xe, aa = mpmath.mpf(0), -mpmath.exp(800)
        for t in range(n):
            xe = aa * xe + 1
            assert x.sign[t].item() == (1 if xe > 0 else -1)
            assert abs(x.log[t].item() - mpmath.log(abs(xe))) <= 1e-12 * (t + 1) * 800


def test_signedlog_result_counts_its_rounded_log():
    # A SignedLog result stores log|x_t| in its log dtype: float32 logs near 1000 are off
    # by up to u32 |log x| (2.4e-5 relative here, 410x the float bound's u_out |x_t|); the
    # docstring's bound for SignedLog results has rho = expm1(u_out |log x_hat| / (1 -
    # u_out)) in its place.
    la, lb = [0.0, 0.1, -0.3, 0.05], [1000.3, -math.inf, 999.0, 998.5]
    sb = [1, 0, -1, 1]
    f32 = torch.float32
    x = linear_recurrence(
        SignedLog(torch.tensor(la, dtype=f32)),
        SignedLog(torch.tensor(lb, dtype=f32), torch.tensor(sb, dtype=torch.int8)),
    )
    la, lb = (torch.tensor(v, dtype=f32).tolist() for v in (la, lb))  # the stored logs
    u, u_out = 2.0**-53, 2.0**-24
    lam = sum(abs(v) for v in la) + max(abs(v) for v in lb if v != -math.inf)
    rel = math.expm1((math.ceil(math.log2(len(la))) + 3) * u * (4 * lam + 4))
    beyond = []
    with mpmath.workprec(PREC):
        xe = te = mpmath.mpf(0)
        for t in range(len(la)):
            ai = mpmath.exp(la[t])
            bi = sb[t] * mpmath.exp(lb[t]) if sb[t] else mpmath.mpf(0)
            xe, te = ai * xe + bi, ai * te + abs(bi)
            got = x.sign[t].item() * mpmath.exp(x.log[t].item())
            rho = mpmath.expm1(u_out * abs(x.log[t].item()) / (1 - u_out))
            e_t = rel * te
            assert abs(got - xe) <= e_t * (1 + rho) + rho * abs(xe), t
            beyond.append(abs(got - xe) > u_out * abs(xe) + e_t * (1 + u_out))
    assert any(beyond)  # the float bound alone would not hold


def test_zero_coefficient_restarts():
    a, b, x0 = [2.0, 0.0, 3.0, -1.0], [1.0, 5.0, 1.0, 2.0], 7.0
    x = linear_recurrence(*(torch.tensor(v, dtype=torch.float64) for v in (a, b, x0)))
    rel, u_out = _bound(a, b, x0, torch.float64)
    for g, want, tt in zip(x.tolist(), [15.0, 5.0, 16.0, -14.0], _exact(a, b, x0)[1], strict=True):
        assert abs(g - want) <= rel * (1 + u_out) * float(tt) + u_out * abs(want)


def test_dim_batch_and_x0_broadcast():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2 - 1
    b = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, generator=g, dtype=torch.float64)
    x1 = linear_recurrence(a, b, x0, dim=1)
    x2 = linear_recurrence(a.T, b.T, x0, dim=0)
    assert torch.equal(x1, x2.T)
    ref = x0.clone()
    for t in range(5):
        ref = a[:, t] * ref + b[:, t]
        assert torch.allclose(x1[:, t], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "call, name, exc",
    [
        (
            lambda: linear_recurrence(torch.ones(3, dtype=torch.int64), torch.ones(3)),
            "a",
            TypeError,
        ),
        (lambda: linear_recurrence(torch.ones(3), torch.ones(4)), "b", ValueError),
        (
            lambda: linear_recurrence(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3)),
            "x0",
            ValueError,
        ),
        (lambda: linear_recurrence(torch.ones(3), torch.ones(3), dim=2), "dim", ValueError),
    ],
)
def test_bad_input(call, name, exc):
    with pytest.raises(exc, match=f"^{name}:"):
        call()


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_steps(dtype):
    # No steps: no states, of the shape of the inputs (time dim 0), whatever x0.
    for shape, dim in (((0,), -1), ((3, 0), -1), ((0, 3), 0), ((2, 0, 4), 1)):
        a, b = torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)
        x0_shape = tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
        for x0 in (None, torch.ones(x0_shape, dtype=dtype)):
            got = linear_recurrence(a, b, x0, dim=dim)
            assert isinstance(got, torch.Tensor) and got.shape == shape and got.dtype == dtype
        got = linear_recurrence(SignedLog.from_float(a), b, dim=dim)
        assert isinstance(got, SignedLog) and got.shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_inputs_as_float_arithmetic(dtype):
    # An infinite state stays infinite (it became NaN: exp(inf - inf) in the shift), and
    # inf - inf and 0 * inf are NaN, as in the float loop. Without x0 the first state is
    # b_1 (there is no a_1 * x0 term).
    inf, nan = math.inf, math.nan
    cases = [([1.0, 1.0], [inf, 1.0]), ([1.0, 1.0], [inf, inf]), ([1.0, 1.0], [inf, -inf]),
             ([1.0, 0.0], [inf, 1.0]), ([0.5, -2.0, 1.0], [inf, 1.0, -3.0]),
             ([2.0, 1.0], [-inf, 1.0]), ([1.0, 1.0, 1.0], [1.0, nan, 1.0]),
             ([1.0, inf, 2.0], [1.0, 1.0, 1.0]), ([1.0, -inf, 1.0], [-1.0, 0.0, 5.0])]  # fmt: skip
    for a, b in cases:
        x, want = 0.0, []
        for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
            x = bi if i == 0 else ai * x + bi
            want.append(x)
        got = linear_recurrence(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
        for gv, wv in zip(got.tolist(), want, strict=True):
            assert (math.isnan(gv) and math.isnan(wv)) or gv == wv, (a, b, got, want)


VALUES = (0.0, -0.0, 1.0, -1.0, 2.0, -0.5, math.inf, -math.inf, math.nan)


@given(
    n=st.integers(1, 5),
    data=st.data(),
    with_x0=st.booleans(),
    signed=st.booleans(),
)
def test_nonfinite_inputs_give_the_float_loop(n, data, with_x0, signed):
    """Every sequence of zeros, ones, infinities and NaN gives what the float loop gives,
    batched beside finite sequences (a review: 386 of 4,000 such cases differed; the tree
    forms ``b_j prod a`` apart, making ``inf - inf`` or ``0 * inf`` the loop does not, or
    the reverse, and ``-inf - inf`` kept a mantissa of -2, so adding inf gave -inf)."""
    draw = lambda: data.draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n))  # noqa: E731
    a, b = draw(), draw()
    x0 = data.draw(st.sampled_from(VALUES)) if with_x0 else None
    x, want = x0, []
    for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
        x = bi if (x0 is None and i == 0) else ai * x + bi
        want.append(x)
    # the sequence, and a finite one beside it (the loop redoes only the former)
    A = torch.tensor([a, [0.5] * n], dtype=torch.float64)
    B = torch.tensor([b, [1.0] * n], dtype=torch.float64)
    X0 = None if x0 is None else torch.tensor([x0, 1.0], dtype=torch.float64)
    if signed:
        got = linear_recurrence(SignedLog.from_float(A), B, X0).to_float()
    else:
        got = linear_recurrence(A, B, X0)
    for t, (gv, wv) in enumerate(zip(got[0].tolist(), want, strict=True)):
        if math.isfinite(wv):  # (the loop is exact on these values) within the bound
            assert abs(gv - wv) <= _documented_bound(a[: t + 1], b[: t + 1], x0, n, wv)
        else:
            assert (math.isnan(gv) and math.isnan(wv)) or gv == wv, (a, b, x0, got[0], want)
    ref = linear_recurrence(A[1:], B[1:], None if X0 is None else X0[1:])
    assert torch.equal(got[1], ref[0])


def _documented_bound(a, b, x0, n, x_t):
    """:func:`linear_recurrence`'s error bound of its state ``t`` (float64 output) on
    finite inputs ``a, b`` up to ``t`` and ``x0``."""
    u = 2.0**-53
    depth = math.ceil(math.log2(n)) + (x0 is not None)
    logs = lambda xs: [abs(math.log(abs(x))) for x in xs if x != 0]  # noqa: E731
    a_used = a if x0 is not None else a[1:]  # (no a_1 x0 term without x0)
    lam = sum(logs(a_used)) + max(logs(b), default=0.0) + sum(logs([] if x0 is None else [x0]))
    delta = (depth + 3) * u * (4 * lam + 4)
    T = 0.0 if x0 is None else abs(x0)  # the recurrence on absolute values
    for i, (ai, bi) in enumerate(zip(a, b, strict=True)):
        T = abs(bi) if (x0 is None and i == 0) else abs(ai) * T + abs(bi)
    return math.expm1(delta) * (1 + u) * T + u * abs(x_t) + 2.0**-1075


def test_gradients_through_exactly_zero_states():
    """Autograd through the log-space scan differentiated log|a| and the shifts: where a
    state is exactly 0 the gradients were wrong, not merely NaN (a review). The adjoint
    recurrence gives the exact ones."""
    a = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64, requires_grad=True)
    x = linear_recurrence(a, b)
    assert x.tolist() == [0.0, 1.0, 0.0]
    x.sum().backward()
    assert a.grad.tolist() == [0.0, 0.0, 1.0]  # x_{t-1} (1 + a_{t+1} + ...)
    assert b.grad.tolist() == [2.5, 1.5, 1.0]


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(2))
    x0 = torch.randn(3, generator=g, dtype=torch.float64)
    for t in (a, b, x0):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(linear_recurrence, (a, b, x0))
    # broadcast operands and another time dim: gradients summed back to their shapes
    a2 = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: linear_recurrence(a, b, dim=0), (a2, b2))
