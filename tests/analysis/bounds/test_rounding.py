"""Rounding primitives: constants against their definitions, bounds against exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnprec.analysis.bounds import rounding as R

U32 = 2.0**-24
U16 = 2.0**-11


def test_gamma_definition_and_vacuous():
    assert R.gamma(0, U32) == 0.0
    assert R.gamma(10, U32) == 10 * U32 / (1 - 10 * U32)
    assert R.gamma(2**11, U16) == math.inf  # n u = 1
    with pytest.raises(ValueError, match="n"):
        R.gamma(-1, U32)
    with pytest.raises(ValueError, match="u"):
        R.gamma(3, 1.5)
    # counts per row, elementwise: the same constants
    counts = torch.tensor([[0.0], [10.0], [2.0**11]], dtype=torch.float64)
    got = R.gamma(counts, U16).flatten().tolist()
    assert got == [R.gamma(0, U16), R.gamma(10, U16), math.inf]
    for bad in (torch.tensor([-1.0]), torch.tensor([1.5])):
        with pytest.raises(ValueError, match="n"):
            R.gamma(bad, U32)


@given(
    st.lists(st.sampled_from([2.0**-53, 2.0**-52, 2.0**-24, 2.0**-11, 2.0**-8]), max_size=6),
    st.integers(0, 4096),
)
def test_excess_and_deficit_have_no_cancellation(us, depth):
    """(1 + u_1)...(1 + u_k)(1 + u)^depth - 1 and 1 - (1 - u_1)... as excess / deficit of the
    logs: never below the exact value (mpmath at 60 digits), and within 1e-13 of it; the
    naive float64 product loses u = 2^-53 entirely."""
    mpmath.mp.dps = 60
    ua = 2.0**-53
    hi = sum(math.log1p(u) for u in us) + depth * math.log1p(ua)
    lo = sum(math.log1p(-u) for u in us) + depth * math.log1p(-ua)
    ex_hi = mpmath.fprod([1 + mpmath.mpf(u) for u in us]) * (1 + mpmath.mpf(ua)) ** depth - 1
    ex_lo = 1 - mpmath.fprod([1 - mpmath.mpf(u) for u in us]) * (1 - mpmath.mpf(ua)) ** depth
    for got, exact in ((R.excess(hi), ex_hi), (R.deficit(lo), ex_lo)):
        assert got >= exact and got <= exact * (1 + 1e-13)
        t = torch.tensor([hi if exact is ex_hi else lo], dtype=torch.float64)
        got_t = float((R.excess(t) if exact is ex_hi else R.deficit(t))[0])
        assert got_t >= exact and got_t <= exact * (1 + 1e-13)


def test_products_near_one_in_float64():
    u = 2.0**-53
    assert (1 + u) * (1 + u) - 1 == 0.0  # what the bounds computed before excess
    assert R.excess(2 * math.log1p(u)) >= 2 * u
    assert R.theta(1, u) >= u and R.theta_lo(1, u) >= u
    assert R.exp_rel(1.0, u, "default") >= 9 * u  # (1 + 8u) e^{u} - 1 >= 9u


def test_depths():
    assert R.summation_depth(1) == 0
    assert R.summation_depth(100) == 99
    assert R.summation_depth(100, "pairwise") == 7
    assert R.summation_depth(100, "blocked", 16) == 15 + 6
    assert R.summation_depth(10, "blocked", 64) == 9
    with pytest.raises(ValueError, match="block"):
        R.summation_depth(10, "blocked")
    with pytest.raises(ValueError, match="order"):
        R.summation_depth(10, "random")
    assert R.pairwise_gamma(100, U32) == R.gamma(7, U32)
    assert R.blocked_gamma(100, 16, U32) == R.gamma(21, U32)


def _exact_dot(a: torch.Tensor, b: torch.Tensor) -> Fraction:
    return sum(
        (Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b, strict=True)), Fraction(0)
    )


@given(st.integers(1, 64), st.integers(0, 2**31), st.sampled_from(["recursive", "blocked"]))
def test_fp32_dot_within_bound(n, seed, order):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g).float()
    b = torch.randn(n, generator=g).float()
    if order == "recursive":
        acc = torch.zeros((), dtype=torch.float32)
        for x, y in zip(a, b, strict=True):
            acc = acc + x * y
        gam = R.dot_gamma(n, U32)
    else:
        parts = [(a[i : i + 8] * b[i : i + 8]).sum() for i in range(0, n, 8)]
        acc = torch.zeros((), dtype=torch.float32)
        for p in parts:
            acc = acc + p
        gam = R.dot_gamma(n, U32, "blocked", 8)
    err = abs(Fraction(float(acc)) - _exact_dot(a, b))
    bound = Fraction(gam) * _exact_dot(a.abs(), b.abs())
    assert err <= bound


def test_dot_gamma_covers_a_fused_chain():
    """An FMA chain ``s = fma(a_i, b_i, s)`` from ``s = 0`` rounds its first product
    (``fma(a_1, b_1, 0) = fl(a_1 b_1)``), so the first term passes n roundings: the FMA
    constant gamma_{n-1} it was given was exceeded 2.0x at n = 2 and was 0 at n = 1."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float64).float())  # noqa: E731
    a1, b1 = f32(1 + 2**-12), f32(1 + 2**-12 + 2**-23)
    a2, b2 = f32(2.0**-24 * (1 + 2.0**-10)), 1.0  # just above half an ulp of s1: rounds up
    s1 = f32(a1 * b1)  # fma(a1, b1, 0)
    s2 = f32(Fraction(a2) * Fraction(b2) + Fraction(s1))  # fma(a2, b2, s1), rounded once
    for n, s in ((1, s1), (2, s2)):
        exact = _exact_dot(torch.tensor([a1, a2][:n]), torch.tensor([b1, b2][:n]))
        err = abs(Fraction(s) - exact)
        assert err > 0
        mag = Fraction(abs(a1 * b1)) + (Fraction(a2) * Fraction(b2) if n == 2 else 0)
        assert err <= Fraction(R.dot_gamma(n, U32)) * mag
        assert err > Fraction(R.gamma(n - 1, U32)) * mag  # (gamma_0 = 0)


@given(st.integers(1, 16), st.integers(1, 24), st.integers(0, 2**31))
def test_fp32_matmul_within_bound(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g).float()
    b = torch.randn(n, 3, generator=g).float()
    c = (a @ b).double()
    exact = a.double() @ b.double()  # error ~ n 2^-53, covered below
    err = (c - exact).abs()
    slack = R.gamma(n, R.U64) * (a.abs().double() @ b.abs().double())
    assert bool((err <= R.matmul_bound(a, b, U32) + slack).all())


def test_matmul_bound_arguments_named():
    a = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="^a: expected a torch.Tensor"):
        R.matmul_bound([[1.0]], a, U32)  # AttributeError before
    with pytest.raises(ValueError, match="^b: expected 2 rows"):
        R.matmul_bound(a, torch.ones(4, 2, dtype=torch.float64), U32)  # torch's error before
    with pytest.raises(ValueError, match="^b: expected finite"):
        R.matmul_bound(a, torch.full((2, 2), math.nan, dtype=torch.float64), U32)
    with pytest.raises(TypeError, match="^a: expected a real floating"):
        R.matmul_bound(a.long(), a.T, U32)
    with pytest.raises(TypeError, match="^b: expected a real floating"):
        R.matmul_bound(a, a.T.to(torch.complex128), U32)
    with pytest.raises(ValueError, match="^a: expected shape"):
        R.matmul_bound(torch.ones(2, dtype=torch.float64), a, U32)


@pytest.mark.parametrize("f", [R.lse_bound, R.softmax_bound])
def test_lse_and_softmax_bound_arguments_named(f):
    with pytest.raises(ValueError, match="^x: expected at least one entry"):
        f(torch.empty(2, 0, dtype=torch.float64), U32)  # IndexError before
    with pytest.raises(ValueError, match="^x: expected a tensor with at least one dim"):
        f(torch.tensor(1.0, dtype=torch.float64), U32)
    with pytest.raises(TypeError, match="^x: expected a real floating"):
        f(torch.ones(2, 3, dtype=torch.complex128), U32)  # cast with a warning before
    with pytest.raises(ValueError, match="^dim"):
        f(torch.ones(2, 3, dtype=torch.float64), U32, dim=2)
    with pytest.raises(ValueError, match="^u_acc: expected a unit roundoff"):
        f(torch.ones(2, 3, dtype=torch.float64), U32, u_acc=2.0)


def test_block_fma_names_its_unit_roundoffs():
    with pytest.raises(ValueError, match="^u_in: expected a unit roundoff"):
        R.block_fma_gamma(10, U32, 4, u_in=2.0)
    with pytest.raises(ValueError, match="^u_acc: expected a unit roundoff"):
        R.block_fma_gamma(10, 2.0, 4)


def test_block_fma_constant():
    g = R.block_fma_gamma(128, U32, 32, u_in=U16)
    assert g == pytest.approx((1 + U16) ** 2 * (1 + R.gamma(31 + 3, U32)) - 1, rel=1e-12)
    assert R.block_fma_gamma(128, U32, 32, exact_products=False) == R.gamma(35, U32)


def test_higham_mary():
    lam = R.hm_lambda(1000, U32, 1e-3)
    assert R.hm_failure_probability(1000, U32, lam) == pytest.approx(1e-3, rel=1e-9)
    assert R.probabilistic_gamma(1000, U32, lam) < R.gamma(1000, U32)
    with pytest.raises(ValueError, match="delta"):
        R.hm_lambda(10, U32, 0.0)
    # lam < 0 gave lam's probability (the bound never holds there), NaN gave 1 (a review)
    for lam in (-3.0, math.nan, math.inf, True):
        for f in (R.hm_failure_probability, R.probabilistic_gamma):
            with pytest.raises((ValueError, TypeError), match="^lam:"):
                f(1000, U32, lam)
    assert R.hm_failure_probability(10, U32, 1e200) == 0.0  # no OverflowError
    for lam in (np.float32(6.0), np.int64(6), torch.tensor(6.0)):  # numbers as NumPy's, torch's
        assert R.hm_failure_probability(1000, U32, lam) == R.hm_failure_probability(1000, U32, 6.0)
    assert R.probabilistic_gamma(10, U32, 1e200) == math.inf


def test_higham_mary_empirical_rate():
    # Stated failure probability 0.05 per inner product; the observed rate must stay below it.
    n, trials, delta = 256, 400, 0.05
    lam = R.hm_lambda(n, U32, delta)
    gam = R.probabilistic_gamma(n, U32, lam)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(trials, n, generator=g).float()
    b = torch.rand(trials, n, generator=g).float()
    acc = torch.zeros(trials, dtype=torch.float32)
    for i in range(n):
        acc = acc + a[:, i] * b[:, i]
    exact = (a.double() * b.double()).sum(-1)
    ref_err = R.gamma(n, R.U64) * exact
    fails = ((acc.double() - exact).abs() > gam * exact + ref_err).float().mean()
    assert float(fails) <= delta


def _mp_lse(row):
    return mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in row))


@given(st.integers(1, 32), st.floats(0.1, 30.0), st.integers(0, 2**31))
def test_lse_and_softmax_fp32(n, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = (spread * torch.randn(2, n, generator=g)).float()
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(-1, keepdim=True)
    y = (m + torch.log(s)).squeeze(-1)
    p = e / s
    lb = R.lse_bound(x, U32)
    sb = R.softmax_bound(x, U32)
    mpmath.mp.prec = 80
    for r in range(2):
        lse = _mp_lse(x[r])
        assert abs(mpmath.mpf(float(y[r])) - lse) <= float(lb[r])
        for i in range(n):
            pi = mpmath.exp(mpmath.mpf(float(x[r, i])) - lse)
            assert abs(mpmath.mpf(float(p[r, i])) - pi) <= float(sb[r, i])


def test_exp_model_with_argument_rounding():
    from attnprec.analysis.precision import Elementary

    gpu = Elementary(exp=2.0, exp_arg=1.0)
    assert R.exp_rel(0.0, U32, gpu) == pytest.approx(4 * U32)
    assert R.exp_rel(10.0, U32, gpu) > R.exp_rel(0.0, U32, gpu)
    with pytest.raises(ValueError, match="elementary"):
        R.exp_rel(1.0, U32, "cuda")


@pytest.mark.parametrize("fmt, lo", [("fp32", -87.0), ("fp16", -9.0), ("bf16", -87.0)])
def test_the_default_exp_model_covers_exp2_of_a_rounded_constant(fmt, lo):
    """``exp(x) = exp2(fl(x fl(log2 e)))`` (``__expf``, ``tl.exp``): the constant's own
    rounding (0.224 u in float32) is an argument error too; the default ``exp_arg = 1``
    was 1.18x under it with a correctly rounded exp2, before any ulp of exp2 itself."""
    from attnprec.analysis.precision import FORMATS, Elementary, round_to

    u = FORMATS[fmt].u
    g = torch.Generator().manual_seed(0)
    x = round_to(lo * torch.rand(20000, generator=g, dtype=torch.float64), fmt)
    c = round_to(torch.tensor(1 / math.log(2), dtype=torch.float64), fmt)
    e = torch.exp2(round_to(x * c, fmt))  # exp2 exact (float64): the argument's error only
    rel = (e * torch.exp(-x) - 1).abs()
    allow = R.exp_rel(x.abs(), u, Elementary(exp=0.0, exp_arg=Elementary().exp_arg))
    assert bool((rel <= allow).all()), float((rel / allow).max())


@given(st.integers(1, 32), st.integers(0, 2**31))
def test_lognum_signed_sum(n, seed):
    from attnprec.lognum import logsumexp

    g = torch.Generator().manual_seed(seed)
    a = 5 * torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.sign(torch.randn(n, generator=g, dtype=torch.float64))
    val, sign = logsumexp(a, dim=-1, b=b, return_sign=True)
    mpmath.mp.prec = 200
    exact = mpmath.fsum(
        mpmath.mpf(float(s)) * mpmath.exp(mpmath.mpf(float(x))) for x, s in zip(a, b, strict=True)
    )
    if exact == 0:
        return
    # kappa rounded up: log sum |x| from above (its float64 lse error bound), log |s| from
    # below (one rounding of the 200-bit value to float64).
    las = float(torch.logsumexp(a, -1) + R.lse_bound(a, R.U64, min_normal=2.0**-1022))
    lav = float(mpmath.log(abs(exact)))
    lav = lav - 2 * R.U64 * abs(lav)
    bound = R.lognum_sum_bound(n, las, lav)
    if math.isfinite(float(bound)):
        assert int(sign) == (1 if exact > 0 else -1)
        assert abs(mpmath.mpf(float(val)) - mpmath.log(abs(exact))) <= float(bound)
        assert float(R.lognum_sum_rel(n, las, lav)) >= float(bound)


def test_exp_up_bounds_exp_below_the_normal_range():
    """Below ``e^-708`` the float64 exp is a multiple of ``2^-1074``: a relative raise is
    not enough (a review: 1.5x under ``e^x`` at x = -744.04, and 0 past -745.13)."""
    x = torch.linspace(-746.0, -700.0, 4001, dtype=torch.float64)
    up = R.exp_up(x)
    with mpmath.workdps(60):
        for xi, ui in zip(x.tolist(), up.tolist(), strict=True):
            assert mpmath.mpf(ui) >= mpmath.exp(mpmath.mpf(xi)), xi
    assert float(R.exp_up(torch.tensor(-math.inf, dtype=torch.float64))) == 0.0


def test_exp_down_bounds_exp_from_below_down_to_the_subnormals():
    """``exp_down``, the lower bound the quantization parts divide by: at most ``e^x`` on
    the subnormal range (where a float64 exp rounds to a multiple of ``2^-1074``, up by up to
    half of one: 1.99x above ``e^x`` at x = -745.126) and around 0, where the exp of a tiny
    argument rounds to 1; never negative."""
    x = torch.cat(
        [
            torch.linspace(-746.0, -700.0, 4001, dtype=torch.float64),
            torch.linspace(-1e-12, 1e-12, 101, dtype=torch.float64),
            torch.linspace(-50.0, 50.0, 1001, dtype=torch.float64),
        ]
    )
    lo = R.exp_down(x)
    assert bool((lo >= 0).all())
    with mpmath.workdps(60):
        for xi, li in zip(x.tolist(), lo.tolist(), strict=True):
            assert mpmath.mpf(li) <= mpmath.exp(mpmath.mpf(xi)), xi
    # the form it replaced is above e^x there
    x0 = -745.126
    plain = float(torch.exp(torch.tensor(x0, dtype=torch.float64))) * (1 - 4 * R.U64)
    with mpmath.workdps(60):
        assert mpmath.mpf(plain) > 1.9 * mpmath.exp(mpmath.mpf(x0))
