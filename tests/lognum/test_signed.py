"""SignedLog and ComplexLog: invariants, conversions, exact signs, accuracy vs mpmath."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lognum_ref import NP, PREC, ULP_LIMIT, U, logs, ref_logaddexp, ref_logsubexp, ulp_error

from attnprec.lognum import ComplexLog, SignedLog

DTYPES = [torch.float32, torch.float64]
inf, nan = math.inf, math.nan


def sl(logs_, signs, dtype=torch.float64):
    return SignedLog(torch.tensor(logs_, dtype=dtype), torch.tensor(signs, dtype=torch.int8))


# --- construction and invariants ----------------------------------------------------


def test_default_sign_and_zero():
    x = SignedLog(torch.tensor([0.0, -inf, 2.0]))
    assert x.sign.tolist() == [1, 0, 1] and x.sign.dtype == torch.int8


@pytest.mark.parametrize(
    "log, sign, exc, name",
    [
        (torch.tensor([1, 2]), None, TypeError, "log"),
        (torch.tensor([1j]), None, TypeError, "log"),
        (torch.zeros(2), torch.zeros(3, dtype=torch.int8), ValueError, "sign"),
        (torch.zeros(2), torch.tensor([2, 1]), ValueError, "sign"),
        (torch.tensor([-inf, 0.0]), torch.tensor([1, 1]), ValueError, "sign"),
        (torch.tensor([0.0, 0.0]), torch.tensor([0, 1]), ValueError, "sign"),
        (torch.zeros(1), torch.tensor([1j]), TypeError, "sign"),
        (torch.zeros(1), [1], TypeError, "sign"),
    ],
)
def test_bad_construction(log, sign, exc, name):
    with pytest.raises(exc, match=f"^{name}:"):
        SignedLog(log, sign)


def test_bad_operands():
    x = SignedLog(torch.zeros(2))
    with pytest.raises(ValueError, match="^other:"):
        x + SignedLog(torch.zeros(3))
    with pytest.raises(TypeError, match="^other:"):
        x * "a"
    with pytest.raises(TypeError, match="^k:"):
        x.pow(2.0)
    with pytest.raises(TypeError, match="^x:"):
        SignedLog.from_float(torch.tensor([1]))
    with pytest.raises(ValueError, match="^dim:"):
        x.sum(dim=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_float_to_float_roundtrip(dtype):
    x = torch.tensor([3.5, -2.0, 0.0, -0.0, 1e-30, -7e20, inf, -inf], dtype=dtype)
    s = SignedLog.from_float(x)
    assert s.sign.tolist() == [1, -1, 0, 0, 1, -1, 1, -1]
    back = s.to_float()
    assert back.dtype == dtype
    # One rounding of the log (u |log x|) and of exp and the cast (u each): relative
    # error <= u (|log x| + 2) to first order; a factor 2 covers the second order.
    u = U[dtype]
    fin = torch.isfinite(x) & (x != 0)
    tol = 2 * u * (torch.log(torch.abs(x[fin].double())).abs() + 2)
    rel = ((back[fin].double() - x[fin].double()) / x[fin].double()).abs()
    assert (rel <= tol).all()
    assert torch.equal(back[~fin], x[~fin])


def test_nan_propagates():
    s = SignedLog.from_float(torch.tensor([nan, 1.0]))
    assert math.isnan(s.to_float()[0].item())
    assert math.isnan((s + s).to_float()[0].item())
    assert math.isnan((s * s).to_float()[0].item())
    assert math.isnan(s.sum().to_float().item())
    assert math.isnan(SignedLog.from_float(torch.tensor([1.0, nan])).prod().to_float().item())
    # NaN has the sign +1 whatever the operation and the operands' order (nan * 0 had the
    # sign 0, which a mask of zeros read as a zero; 0 - nan had -1: a review)
    nan_, zero = SignedLog.from_float(torch.tensor([nan])), SignedLog.from_float(torch.zeros(1))
    for r in (nan_ + zero, zero + nan_, zero - nan_, nan_ * zero, zero / zero, nan_ - nan_):
        assert math.isnan(r.log.item()) and r.sign.item() == 1
    # and as built (a review: SignedLog(nan, -1) and ComplexLog(nan + i pi) kept -1)
    built = (SignedLog(torch.tensor([nan]), torch.tensor([-1])),
             ComplexLog(torch.tensor([complex(nan, math.pi)], dtype=torch.complex128)))  # fmt: skip
    for r in built:
        assert math.isnan(r.to_signed().log.item() if isinstance(r, ComplexLog) else r.log.item())
        assert r.sign.item() == 1


def test_overflow_to_float_is_inf():
    s = SignedLog(torch.tensor([1000.0, 1000.0, -1000.0]), torch.tensor([1, -1, 1]))
    assert s.to_float().tolist() == [inf, -inf, 0.0]
    assert s.to_float(torch.float64).tolist() == [inf, -inf, 0.0]


def test_far_beyond_range():
    big = SignedLog(torch.tensor([1000.0]))
    small = SignedLog(torch.tensor([-1000.0]))
    assert (big * small).log.item() == 0.0
    assert (big / small).log.item() == 2000.0
    assert abs((big + big).log.item() - (1000.0 + math.log(2.0))) <= 1e-4
    assert (big + small).log.item() == 1000.0
    assert (big - big).sign.item() == 0


def test_to_complex_and_mpmath():
    s = sl([0.0, math.log(2.0), -inf], [1, -1, 0])
    z = s.to_complex()
    assert z.dtype == torch.complex128
    assert z.imag.tolist() == [0.0, math.pi, 0.0] and z.real[2].item() == -inf
    vals = s.to_mpmath()
    assert vals[0] == 1 and vals[2] == 0
    assert abs(vals[1] + 2) < mpmath.mpf(2) ** -50


def test_tensor_like():
    x = SignedLog.from_float(torch.arange(-6.0, 6.0).reshape(3, 4))
    assert x.shape == (3, 4) and x.ndim == 2 and len(x) == 3 and x.numel() == 12
    assert x[1].shape == (4,) and x[:, 1:3].shape == (3, 2)
    assert x.reshape(2, 6).shape == (2, 6) and x.transpose(0, 1).shape == (4, 3)
    assert x.unsqueeze(0).shape == (1, 3, 4) and x.flatten().shape == (12,)
    assert x.permute(1, 0).shape == (4, 3) and x.mT.shape == (4, 3)
    y = SignedLog.from_float(torch.ones(3, 1)) + SignedLog.from_float(torch.ones(1, 4))
    assert y.shape == (3, 4)
    assert torch.equal((x * 2.0).to_float(), torch.arange(-6.0, 6.0).reshape(3, 4) * 2)


@pytest.mark.parametrize("op", ["sum", "prod"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4)])
def test_reduction_shapes(op, shape):
    # Like torch's; dim=None with keepdim keeps every dim with size 1.
    x = SignedLog.from_float(torch.arange(1.0, 1.0 + math.prod(shape)).reshape(shape))
    t = torch.ones(shape)
    cases = [
        ({}, ()),
        ({"keepdim": True}, (1,) * len(shape)),
        ({"dim": 0}, getattr(t, op)(0).shape),
        ({"dim": -1, "keepdim": True}, getattr(t, op)(-1, keepdim=True).shape),
    ]
    for kwargs, want in cases:
        got = getattr(x, op)(**kwargs)
        assert got.shape == got.log.shape == got.sign.shape == want, kwargs


# --- exact signs --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_x_plus_minus_x_is_exact_zero(dtype):
    x = SignedLog.from_float(torch.tensor([1e-30, -3.0, 7e30, 0.5], dtype=dtype))
    z = x + (-x)
    assert torch.equal(z.log, torch.full((4,), -inf, dtype=dtype))
    assert torch.equal(z.sign, torch.zeros(4, dtype=torch.int8))
    assert torch.equal((x - x).sign, z.sign)


@pytest.mark.parametrize("cls", [SignedLog, ComplexLog])
def test_product_of_many_negatives(cls):
    n = 10_001
    x = SignedLog(torch.full((n,), 1e-3), -torch.ones(n, dtype=torch.int8))
    if cls is ComplexLog:
        x = ComplexLog(x.to_complex())
    p = x.prod()
    assert p.sign.item() == -1
    c = x.cumprod(0)
    want = torch.where(torch.arange(n) % 2 == 0, -1, 1).to(torch.int8)
    assert torch.equal(c.sign, want)
    if cls is ComplexLog:
        pi32 = torch.tensor(math.pi, dtype=torch.float32).item()
        assert p.log.imag.item() == pi32
        assert set(c.log.imag.tolist()) == {0.0, pi32}
    assert x[0].pow(n).sign.item() == -1 and x[0].pow(n - 1).sign.item() == 1


def test_pow_and_reciprocal_special_values():
    x = sl([0.0, -inf, math.log(3.0)], [-1, 0, -1])
    assert x.pow(0).to_float().tolist() == [1.0, 1.0, 1.0]
    assert x.pow(-1).to_float()[:2].tolist() == [-1.0, inf]
    assert x.reciprocal().sign.tolist() == [-1, 1, -1]
    assert x.pow(2).sign.tolist() == [1, 0, 1]
    assert (x / sl([-inf], [0])).to_float().tolist()[0] == -inf  # x / 0 = -inf for x = -1


# --- accuracy against mpmath ---------------------------------------------------------


@st.composite
def signed_pairs(draw, dtype):
    n = draw(st.integers(1, 6))
    la = draw(st.lists(logs(dtype, allow_inf=True), min_size=n, max_size=n))
    # Near cancellation: some b logs equal or adjacent to a's.
    other = draw(st.lists(logs(dtype, allow_inf=True), min_size=n, max_size=n))
    how = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    lb = [
        o if h == 0 else v if h == 1 else float(NP[dtype](v * (1 - 2**-20)))
        for v, o, h in zip(la, other, how, strict=True)
    ]
    ra = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    rb = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    sa = [0 if v == -inf else r for v, r in zip(la, ra, strict=True)]
    sb = [0 if v == -inf else r for v, r in zip(lb, rb, strict=True)]
    return la, sa, lb, sb


def _ref_add(la: float, sa: int, lb: float, sb: int) -> tuple[mpmath.mpf, int]:
    """Exact log|sa e^la + sb e^lb| and its sign, via expm1 of the difference (no exp of
    huge logs, no loss when e^la and e^lb agree to more than PREC bits)."""
    if sb == 0:
        return (mpmath.mpf(la) if sa else mpmath.ninf), sa
    if sa == 0:
        return mpmath.mpf(lb), sb
    hi, shi, lo = (la, sa, lb) if la >= lb else (lb, sb, la)
    if sa == sb:
        return ref_logaddexp(hi, lo), shi
    if la == lb:
        return mpmath.ninf, 0
    return ref_logsubexp(hi, lo), shi


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_mul_div_add_sub_ulps(dtype, data):
    la, sa, lb, sb = data.draw(signed_pairs(dtype))
    x, y = sl(la, sa, dtype), sl(lb, sb, dtype)
    prod, quot, add, sub = x * y, x / y, x + y, x - y
    big = torch.finfo(dtype).max
    with mpmath.workprec(PREC):
        # a log from max + half an ulp on rounds to +-inf (ties to even: max is odd)
        edge = mpmath.mpf(big) + mpmath.ldexp(torch.finfo(dtype).eps, math.frexp(big)[1] - 2)
        for i in range(len(la)):
            mla, mlb = mpmath.mpf(la[i]), mpmath.mpf(lb[i])
            if sa[i] and sb[i]:
                # The log of a product is la + lb: compare logs directly (no exp). A log
                # past the format's range is +-inf: the product overflows, or underflows
                # to a zero.
                for r, exact in ((prod, mla + mlb), (quot, mla - mlb)):
                    got = (r.log[i].item(), r.sign[i].item())
                    if exact >= edge:
                        assert got == (inf, sa[i] * sb[i]), (got, exact)
                    elif exact <= -edge:
                        assert got == (-inf, 0), (got, exact)
                    else:
                        assert got[1] == sa[i] * sb[i]
                        assert ulp_error(got[0], exact, dtype) <= ULP_LIMIT[dtype]
            for got, sign_b in ((add, sb[i]), (sub, -sb[i])):
                want, want_sign = _ref_add(la[i], sa[i], lb[i], sign_b)
                assert got.sign[i].item() == want_sign
                err = ulp_error(got.log[i].item(), want, dtype)
                assert err <= ULP_LIMIT[dtype], (la[i], lb[i], got.log[i].item(), err)


# --- autograd -----------------------------------------------------------------------


def test_gradients_flow_through_log():
    torch.manual_seed(0)
    la = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sa = torch.tensor([1, -1, 1, 1] * 5, dtype=torch.int8).reshape(5, 4)
    x, y = SignedLog(la, sa), SignedLog(lb)
    out = (x @ y).sum() + (x * x).sum() + (x + x[0]).sum() + x.cumsum(1).sum()
    out.log.backward()
    assert torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()
    # d/dl_i log sum_j exp(l_j) = softmax: SignedLog.sum matches torch.logsumexp's grad.
    l1 = torch.randn(7, dtype=torch.float64, requires_grad=True)
    SignedLog(l1).sum().log.backward()
    l2 = l1.detach().clone().requires_grad_(True)
    torch.logsumexp(l2, 0).backward()
    assert torch.allclose(l1.grad, l2.grad, rtol=1e-12, atol=0)


# --- ComplexLog -----------------------------------------------------------------------


def test_complexlog_phase_and_zero():
    z = torch.tensor(
        [0 + 0j, 1 + 3 * math.pi * 1j, complex(-inf, 0), 2 - math.pi * 1j], dtype=torch.complex128
    )
    c = ComplexLog(z)
    assert c.sign.tolist() == [1, -1, 0, -1]
    assert c.log.imag.tolist() == pytest.approx([0, math.pi, 0, math.pi], abs=0)
    assert c.log.real[2].item() == -inf
    assert isinstance(c * c, ComplexLog) and (c * c).sign.tolist() == [1, 1, 0, 1]
    s = c.to_signed()
    assert type(s) is SignedLog and torch.equal(s.sign, c.sign)


def test_complexlog_many_pi_terms_never_drift():
    # A GOOM phase accumulated as k*pi in float32 drifts; the sign here stays exact.
    k = torch.arange(100_000, dtype=torch.float64)
    c = ComplexLog(torch.complex(torch.zeros_like(k), k * math.pi).to(torch.complex128))
    want = torch.where(k % 2 == 1, -1, 1).to(torch.int8)
    assert torch.equal(c.sign, want)
    total = c.sum()  # 50_000 (+1) and 50_000 (-1): exactly zero
    assert total.sign.item() == 0 and total.log.real.item() == -inf


def test_complexlog_bad_input():
    with pytest.raises(TypeError, match="^z:"):
        ComplexLog(torch.zeros(2))
    with pytest.raises(ValueError, match="^z:"):
        ComplexLog(torch.tensor([1.0j]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_gradient_at_ties(dtype):
    # d/da log(e^a + e^b) = 1/2 at a = b (it was (1, 0): the difference of equal logs was a
    # constant); away from ties the gradient is unchanged, and x - x is an exact zero.
    la = torch.tensor([0.0, 3.0, -2.0], dtype=dtype, requires_grad=True)
    lb = torch.tensor([0.0, 3.0, -1.0], dtype=dtype, requires_grad=True)
    s = SignedLog(la) + SignedLog(lb)
    s.log.sum().backward()
    e = math.exp(-1.0)
    want_a = torch.tensor([0.5, 0.5, e / (1 + e)], dtype=dtype)
    u = U[dtype]
    assert torch.equal(la.grad[:2], want_a[:2]) and torch.equal(lb.grad[:2], want_a[:2])
    # off the ties: within 8 roundings (the rule of test_elementwise's gradient test)
    assert abs(la.grad[2].item() - want_a[2].item()) <= 8 * u * want_a[2].item()
    assert abs(la.grad[2].item() + lb.grad[2].item() - 1) <= 16 * u
    z = SignedLog(la.detach()) - SignedLog(la.detach())
    assert (z.log == -inf).all() and (z.sign == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_reductions(dtype, shape):
    # Over an empty dim: sum = 0 (-inf, sign 0), prod = 1 (log 0, sign 1), prefix sums and
    # products empty; slices without elements give empty results; shapes as torch's.
    x = SignedLog(torch.zeros(shape, dtype=dtype))
    t = torch.zeros(shape)
    for dim in [None, *range(len(shape))]:
        for keepdim in (False, True):
            kw = {"keepdim": keepdim} if dim is None else {"dim": dim, "keepdim": keepdim}
            s, p = x.sum(**kw), x.prod(**kw)
            want = t.sum(**kw).shape if dim is not None else ((1,) * len(shape) if keepdim else ())
            assert s.shape == p.shape == want and s.dtype == dtype
            assert (s.log == -inf).all() and (s.sign == 0).all()
            assert (p.log == 0).all() and (p.sign == 1).all()
        if dim is not None:
            for c in (x.cumsum(dim), x.cumprod(dim)):
                assert c.shape == shape and c.log.dtype == dtype and c.sign.dtype == torch.int8
    m = SignedLog(torch.zeros(2, 0, dtype=dtype)) @ SignedLog(torch.zeros(0, 3, dtype=dtype))
    assert m.shape == (2, 3) and (m.log == -inf).all() and (m.sign == 0).all()
    m = SignedLog(torch.zeros(0, 2, dtype=dtype)) @ SignedLog(torch.zeros(2, 3, dtype=dtype))
    assert m.shape == (0, 3)


@pytest.mark.parametrize("a, b", [(0.0, -1e-100), (0.0, -1e-300), (1e-300, 0.0), (0.1, -700.3),
                                  (-396.31505974760677, -977.844758472748)])  # fmt: skip
def test_add_gradients_tiny_and_far_differences(a, b):
    # x - y and x + y as logsubexp/logaddexp: the analytic derivatives within 8u (the rule
    # of test_elementwise's gradient test); tiny differences gave +-inf, far ones 64 x 8u.
    for sy in (-1, 1):
        la = torch.tensor([a], dtype=torch.float64, requires_grad=True)
        lb = torch.tensor([b], dtype=torch.float64, requires_grad=True)
        s = SignedLog(la) + SignedLog(lb, torch.tensor([sy], dtype=torch.int8))
        ga, gb = torch.autograd.grad(s.log.sum(), (la, lb))
        with mpmath.workprec(200):
            ma, mb = mpmath.mpf(a), mpmath.mpf(b)
            if sy < 0:
                want = (-1 / mpmath.expm1(mb - ma), -1 / mpmath.expm1(ma - mb))
            else:
                want = (1 / (1 + mpmath.exp(mb - ma)), 1 / (1 + mpmath.exp(ma - mb)))
            for got, w in zip((ga.item(), gb.item()), want, strict=True):
                assert abs(mpmath.mpf(got) - w) <= 8 * 2.0**-53 * abs(w) + 2.0**-1072, (got, w)


# --- ComplexLog: the parity of the phase, decided exactly ------------------------------


def _parity_ref(im: float) -> tuple[bool, int]:
    """(within pi/4 of k pi, (-1)^k) for the exact float im, mpmath at 300 bits."""
    with mpmath.workprec(300):
        k = int(mpmath.nint(mpmath.mpf(im) / mpmath.pi))
        return abs(mpmath.mpf(im) - k * mpmath.pi) <= mpmath.pi / 4, -1 if k % 2 else 1


@pytest.mark.parametrize("cdt, limit", [(torch.complex64, 2.0**24), (torch.complex128, 2.0**53)])
def test_complexlog_parity_exact(cdt, limit):
    # The check ran in the input precision: complex64 accepted parts out of tolerance from
    # |im| ~ 1e5 and gave wrong signs from ~1e8 (86572608 is 0.0028 from 27556917 pi, odd,
    # yet +1); complex128 from ~1e14. Now exact below the limit, ValueError from it on.
    fdt = torch.float32 if cdt == torch.complex64 else torch.float64
    g = torch.Generator().manual_seed(7)
    ims = []
    for mag in (1.0, 1e3, 1e5, 1e7, limit / 2, limit * 0.99, 1e12, 1e14, 1e15):
        if mag < limit:
            ims += (torch.rand(300, generator=g, dtype=torch.float64) * mag).to(fdt).tolist()
            k = (torch.rand(100, generator=g, dtype=torch.float64) * mag / math.pi).floor()
            ims += (k * math.pi).to(fdt).tolist()  # rounded k pi: always read as k
    ims += [float(torch.tensor(v, dtype=fdt)) for v in (limit - limit / 2**20, limit / 2 + 1)]
    for im in ims:
        for x in (im, -im):
            ok, want = _parity_ref(x)
            z = torch.complex(torch.tensor([1.0], dtype=fdt), torch.tensor([x], dtype=fdt))
            if ok:
                assert ComplexLog(z).sign.item() == want, x
            else:
                with pytest.raises(ValueError, match="^z:"):
                    ComplexLog(z)
    for k in (1, 3, 2**20 + 1, int(limit / 4) + 1):  # rounded odd multiples: negative
        z = torch.complex(torch.ones(1, dtype=fdt), (torch.tensor([k], dtype=torch.float64)
                                                     * math.pi).to(fdt))  # fmt: skip
        assert ComplexLog(z).sign.item() == -1
    if cdt == torch.complex128:  # the reviewer's value, exactly within the band: odd
        z = torch.tensor([complex(0.0, 86572608.0)], dtype=cdt)
        assert ComplexLog(z).sign.item() == -1
    for bad in (limit, -limit, 2 * limit, 86572608.0 if fdt == torch.float32 else 1e17):
        z = torch.complex(torch.ones(1, dtype=fdt), torch.tensor([bad], dtype=fdt))
        with pytest.raises(ValueError, match="^z: imaginary part .* too large"):
            ComplexLog(z)


def test_complexlog_special_parts():
    # An infinite imaginary part has no sign (it was read as +1); NaN gives a NaN log;
    # complex32 keeps float32 logs, as SignedLog does for float16.
    for im in (inf, -inf):
        with pytest.raises(ValueError, match="^z: an infinite imaginary part"):
            ComplexLog(torch.complex(torch.tensor([1.0]), torch.tensor([im])))
    c = ComplexLog(torch.complex(torch.tensor([1.0, -inf]), torch.tensor([nan, 3 * math.pi])))
    assert math.isnan(c.log.real[0].item()) and c.sign.tolist()[1] == 0
    with pytest.warns(UserWarning):  # torch: ComplexHalf is experimental
        z = torch.tensor([1 + 0j, 2 + 3.140625j]).to(torch.complex32)
    c = ComplexLog(z)
    assert c.dtype == torch.float32 and c.sign.tolist() == [1, -1]
    with pytest.raises(ValueError, match="^z: imaginary part .* too large"):
        ComplexLog(torch.tensor([1 + 2048j]).to(torch.complex32))


# --- pow, ==, operand errors --------------------------------------------------------------


def test_pow_huge_exponents_one_rounding():
    # k log|x| rounded once: k = 2^53 + 1 was rounded to float64 first (0.75 ulp); float32
    # logs with k > 2^29 rounded twice (float64 product, then float32); k >= 2^64 raised
    # OverflowError.
    from fractions import Fraction

    def ulps(got: float, exact: Fraction, dtype: torch.dtype) -> float:
        p = 53 if dtype == torch.float64 else 24
        return float(abs(Fraction(got) - exact)) / 2.0 ** (math.frexp(got)[1] - p)

    cases = [(torch.float64, 1.5, 2**53 + 1), (torch.float64, 0.1, 3**40),
             (torch.float64, -0.7, -(2**60 + 12345)), (torch.float32, 1.5, 6004799861074603),
             (torch.float32, -2.25, 2**61 + 7), (torch.float64, 1.5, 2**70 + 1)]  # fmt: skip
    for dtype, lv, k in cases:
        x = SignedLog(torch.tensor([lv], dtype=dtype))
        got = x.pow(k).log.item()
        exact = Fraction(float(torch.tensor(lv, dtype=dtype))) * k
        assert ulps(got, exact, dtype) <= 0.5, (dtype, lv, k, got)
    y = SignedLog(torch.tensor([0.5, -inf, 0.0]), torch.tensor([-1, 0, 1])).pow(2**1100 + 3)
    assert y.log.tolist() == [inf, -inf, 0.0] and y.sign.tolist() == [-1, 0, 1]
    g = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    SignedLog(g).pow(2**53 + 1).log.backward()
    assert g.grad.item() == float(2**53 + 1)


def test_equality_is_elementwise():
    # == compared identity (two equal values were "not equal"); now values, elementwise.
    x = sl([0.0, -inf, 1.0, nan], [1, 0, -1, 1])
    y = sl([0.0, -inf, 1.0, nan], [1, 0, -1, 1])
    assert (x == y).tolist() == [True, True, True, False]
    assert (x != y).tolist() == [False, False, False, True]
    assert (x == sl([0.0, -inf, 1.0, nan], [-1, 0, 1, 1])).tolist() == [False, True, False, False]
    assert (x == torch.tensor([1.0, 0.0, -math.e, 2.0], dtype=torch.float64)).tolist()[:3] == [
        True, True, True]  # fmt: skip
    assert (x == 1).tolist() == [True, False, False, False]
    assert (x == "a") is False and len({x, y}) == 2  # hashed by identity, as tensors are


def test_operand_errors_name_the_argument():
    x = SignedLog(torch.zeros(2))
    with pytest.raises(TypeError, match="^other:"):
        x + torch.tensor([1j, 2j])
    with pytest.raises(TypeError, match="^other:"):
        x * torch.tensor([1, 2])
    with pytest.raises(ValueError, match="^self:"):
        x @ SignedLog(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^other:"):
        SignedLog(torch.zeros(2, 2)) @ x
    with pytest.raises(ValueError, match="^other:"):
        SignedLog(torch.zeros(2, 3)) @ SignedLog(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="^other:"):
        SignedLog(torch.zeros(2, 2, 3)) @ SignedLog(torch.zeros(3, 3, 1))


def test_python_numbers_keep_their_float64_log():
    """A Python number's log is taken in float64 and rounded once with the result: it was
    rounded to the operand's float32 first, so ``x * 1e-300`` became an exact zero and
    ``x * 1e300`` inf (a review's find); the dtype stays the operand's, as in torch."""
    x = SignedLog.from_float(torch.tensor([2.0, -4.0]))
    lx = x.log.double()
    for got, want in (
        (x * 1e-300, lx + math.log(1e-300)),
        (x / 1e-300, lx - math.log(1e-300)),
        (1e-300 / x, math.log(1e-300) - lx),
        (x * 10**400, lx + math.log(10**400)),
    ):
        assert got.log.dtype == torch.float32
        torch.testing.assert_close(got.log, want.float())
    assert ((x * 1e-300).sign == torch.tensor([1, -1], dtype=torch.int8)).all()
    assert ((1e-300 / x).sign == torch.tensor([1, -1], dtype=torch.int8)).all()
    assert not bool((SignedLog.from_float(torch.zeros(1)) == 1e-300).any())
    torch.testing.assert_close((x + 1e300).log, torch.full((2,), math.log(1e300)).float())


def test_a_nan_with_sign_zero_is_refused():
    """Sign 0 exactly where the log is -inf; a NaN's sign is +1 (a review: NaN with sign 0
    read as a zero, and became +1 in the first operation)."""
    with pytest.raises(ValueError, match="^sign: 0 is allowed only"):
        SignedLog(torch.tensor([math.nan]), torch.tensor([0]))


def test_to_float_refuses_an_integer_dtype():
    """A review: e^100 to int32 gave -2147483648."""
    with pytest.raises(TypeError, match="^dtype"):
        SignedLog(torch.tensor([100.0])).to_float(torch.int32)


@pytest.mark.parametrize("x", [3.0, 0.1, -7.5, 1e30])
def test_equality_with_a_number_is_as_for_tensors(x):
    """A review: ``y == 3.0`` was False where ``y == torch.tensor([3.0])`` was True (the
    number's float64 log against the operand's float32 one)."""
    t = torch.tensor([x])
    y = SignedLog.from_float(t)
    assert bool((y == x).item()) == bool((t == x).item()) == bool((y == t).item())
    assert not bool((y != x).item())
