"""Exact references (mpmath) and the ulp metric shared by the lognum tests."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import torch
from hypothesis import strategies as st

PREC = 400  # bits; far beyond float64, so reference rounding never matters
# Beyond this distance a correction is below e^-FAR < 2^-2800 relative: dropped exactly
# as far as any float comparison can tell (and mpmath need not form e^(1e308)).
FAR = 2000.0
mp = mpmath.mp

ULP_LIMIT = {torch.float32: 2.0, torch.float64: 4.0}
U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
NP = {torch.float32: np.float32, torch.float64: np.float64}


def ulp_of(x: float, dtype: torch.dtype) -> float:
    """ulp of max(|x|, 1) in ``dtype`` (the accuracy metric of docs/accuracy.md)."""
    _, e = math.frexp(max(abs(x), 1.0))  # x = f 2^e, f in [0.5, 1)
    p = 24 if dtype == torch.float32 else 53
    return math.ldexp(1.0, e - p)


def ulp_error(got: float, exact: mpmath.mpf, dtype: torch.dtype) -> float:
    """|got - exact| in ulps of max(|exact|, 1); equal infinities are 0, NaN mismatch inf."""
    if math.isnan(got) or mpmath.isnan(exact):
        return 0.0 if (math.isnan(got) and mpmath.isnan(exact)) else math.inf
    if mpmath.isinf(exact) or math.isinf(got):
        # A finite exact result beyond the dtype's range correctly rounds to +-inf.
        big = float(np.finfo(NP[dtype]).max) * (1 + 2.0 ** -(53 if dtype == torch.float64 else 24))
        if math.isinf(got) and not mpmath.isinf(exact) and abs(exact) >= big:
            return 0.0 if (got > 0) == (exact > 0) else math.inf
        return 0.0 if mpmath.mpf(got) == exact else math.inf
    with mpmath.workprec(PREC):
        err = abs(mpmath.mpf(got) - exact)
        return float(err / ulp_of(float(exact), dtype))


def m(x: float) -> mpmath.mpf:
    return mpmath.mpf(x)


def ref_log1mexp(a: float) -> mpmath.mpf:
    with mpmath.workprec(PREC):
        if a > 0 or math.isnan(a):
            return mpmath.nan
        if a == 0:
            return mpmath.ninf
        if a < -FAR:
            return -mpmath.exp(m(-FAR))  # |exact| < e^-FAR: any value this small is exact
        return mpmath.log(-mpmath.expm1(m(a)))


def ref_log1pexp(a: float) -> mpmath.mpf:
    with mpmath.workprec(PREC):
        if abs(a) > FAR:
            return m(max(a, 0.0))  # off by < e^-FAR relative
        return mpmath.log1p(mpmath.exp(m(a)))


def ref_logaddexp(a: float, b: float) -> mpmath.mpf:
    with mpmath.workprec(PREC):
        if a == b == -math.inf:
            return mpmath.ninf
        hi, lo = max(a, b), min(a, b)
        if lo == -math.inf or m(hi) - m(lo) > FAR:
            return m(hi)
        return m(hi) + mpmath.log1p(mpmath.exp(m(lo) - m(hi)))


def ref_logsubexp(a: float, b: float) -> mpmath.mpf:
    with mpmath.workprec(PREC):
        if a < b:
            return mpmath.nan
        if a == b:
            return mpmath.ninf
        if b == -math.inf or m(a) - m(b) > FAR:
            return m(a)
        return m(a) + mpmath.log(-mpmath.expm1(m(b) - m(a)))


def exact_signed_sum(logs: list[float], signs: list[float]) -> tuple[mpmath.mpf, mpmath.mpf]:
    """(sum_i s_i exp(l_i), sum_i |s_i| exp(l_i)) at PREC bits."""
    with mpmath.workprec(PREC):
        terms = [m(s) * mpmath.exp(m(l)) for l, s in zip(logs, signs, strict=True) if s != 0]
        return mpmath.fsum(terms), mpmath.fsum(abs(t) for t in terms)


def exact_fsum(parts: list[mpmath.mpf]) -> mpmath.mpf:
    """The sum of finite mpf values computed exactly (at a precision covering their
    exponent span, at most 4000 bits: parts further below the largest are rounded, which
    matters only for a sum that cancels below them), then rounded once to the working
    precision."""
    nz = [x for x in parts if x != 0]
    if not nz:
        return mpmath.mpf(0)
    hi = max(int(x._mpf_[2]) + int(x._mpf_[3]) for x in nz)
    lo = min(int(x._mpf_[2]) for x in nz)
    prec = mpmath.mp.prec
    with mpmath.workprec(min(hi - lo + 64, 4000)):
        total = mpmath.fsum(nz)
    with mpmath.workprec(prec):
        return +total


def exact_log_sum(logs: list[float], weights: list[float]) -> tuple[mpmath.mpf, int, float, float]:
    """``(log|s|, sign s, log sum|x_i|, log max|x_i|)`` of ``s = sum_i w_i exp(l_i)``.

    ``log|s|`` is exact to ``2^-PREC`` relative to itself, also where ``|s|`` is 1 to
    far more than ``PREC`` bits (``1 + e^-300``, ``-1 + e^(-2^-1074)``): it is
    ``log|P| + log|1 + R|`` with ``P`` the largest term and ``R = sum_i q_i (1 +
    expm1(l_i - l_p))``, ``q_i = w_i / w_p``: the ratios and the small parts are summed
    exactly and rounded once (``mpmath.fsum``), so ``-1 + 1`` cancels exactly and
    ``expm1`` keeps what ``exp`` would round away. An exact zero gives
    ``(-inf, 0, ...)``; the last two are floats (``-inf`` if there is no term).
    """
    with mpmath.workprec(PREC):
        pairs = [
            (m(l), m(w)) for l, w in zip(logs, weights, strict=True) if w != 0 and l != -math.inf
        ]
        if not pairs:
            return mpmath.ninf, 0, -math.inf, -math.inf
        lam_all = [l + mpmath.log(abs(w)) for l, w in pairs]
        p = max(range(len(pairs)), key=lambda i: lam_all[i])
        lp, wp = pairs[p]
        parts, abs_rel = [], [mpmath.mpf(1)]  # abs_rel: |x_i| / |P|
        for i, (l, w) in enumerate(pairs):
            if i != p:  # q e^d: as q + q expm1(d) near ties (|d| < 1), where it nears q
                q, d = w / wp, l - lp
                if d > -1:
                    em = mpmath.expm1(d)
                    parts += [q, q * em]
                    abs_rel.append(abs(q) * (1 + em))
                else:
                    parts.append(q * mpmath.exp(d))
                    abs_rel.append(abs(parts[-1]))
        r = exact_fsum(parts)
        v = exact_fsum([mpmath.mpf(1), *parts])  # 1 + r, exact before its one rounding
        # log1p: 1 + (others / |P|) at PREC bits would drop others below 2^-PREC
        las = float(lam_all[p] + mpmath.log1p(mpmath.fsum(abs_rel[1:])))
        lam = float(lam_all[p])
        if v == 0:
            return mpmath.ninf, 0, las, lam
        tail = mpmath.log1p(r) if abs(r) < 0.5 else mpmath.log(abs(v))
        sign = (1 if wp > 0 else -1) * (1 if v > 0 else -1)
        return lam_all[p] + tail, sign, las, lam


def exact_prefix_log_sums(
    logs: list[float], weights: list[float]
) -> list[tuple[mpmath.mpf, int, float, float]]:
    """:func:`exact_log_sum` of every prefix. Up to 64 terms each prefix on its own;
    longer ones in one pass, the running largest term kept apart from the sum of the
    others (a term that loses the lead joins them) at ``PREC`` bits, so no prefix is the
    log of a sum rounded near 1 (exact unless the others cancel below ``2^-300``)."""
    if len(logs) <= 64:
        return [exact_log_sum(logs[: t + 1], weights[: t + 1]) for t in range(len(logs))]
    out: list[tuple[mpmath.mpf, int, float, float]] = []
    with mpmath.workprec(PREC):
        piv = None  # (term, log|term|)
        others, abs_sum = mpmath.mpf(0), mpmath.mpf(0)
        for l, w in zip(logs, weights, strict=True):
            if w != 0 and l != -math.inf:
                t, lt = m(w) * mpmath.exp(m(l)), m(l) + mpmath.log(abs(m(w)))
                abs_sum += abs(t)
                if piv is None:
                    piv = (t, lt)
                elif abs(t) > abs(piv[0]):
                    others, piv = others + piv[0], (t, lt)
                else:
                    others += t
            if piv is None:
                out.append((mpmath.ninf, 0, -math.inf, -math.inf))
                continue
            r = others / piv[0]
            las, lam = float(mpmath.log(abs_sum)), float(piv[1])
            if r == -1:
                out.append((mpmath.ninf, 0, las, lam))
                continue
            tail = mpmath.log1p(r) if r > -1 else mpmath.log(-1 - r)
            sign = (1 if piv[0] > 0 else -1) * (1 if r > -1 else -1)
            out.append((piv[1] + tail, sign, las, lam))
    return out


def log_diff(got: float, exact: mpmath.mpf) -> float:
    """|got - exact| for a computed log and an exact one (``-inf`` equal to ``-inf``)."""
    if exact == mpmath.ninf or got == -math.inf:
        return 0.0 if got == exact else math.inf
    with mpmath.workprec(PREC):
        return float(abs(mpmath.mpf(got) - exact))


def mlog(x: mpmath.mpf) -> float:
    """float(log|x|) with -inf for 0."""
    with mpmath.workprec(PREC):
        return -math.inf if x == 0 else float(mpmath.log(abs(x)))


def log_err(got: float, exact: mpmath.mpf) -> float:
    """|got - log|exact|| evaluated in mpmath."""
    with mpmath.workprec(PREC):
        if exact == 0:
            return 0.0 if got == -math.inf else math.inf
        return float(abs(mpmath.mpf(got) - mpmath.log(abs(exact))))


# --- strategies ---------------------------------------------------------------------

LN2 = math.log(2.0)


def switch_points(dtype: torch.dtype) -> list[float]:
    """Values at and around the branch switches of the elementwise functions."""
    npdt = NP[dtype]
    base = [-LN2, 0.0, -37.0, 18.0, 33.3, -1.0, 1.0, 709.0, -745.0, 88.7, -103.0]
    out: list[float] = []
    for v in base:
        x = npdt(v)
        for _ in range(3):
            out += [float(x)]
            x = np.nextafter(x, npdt(np.inf))
        x = npdt(v)
        for _ in range(3):
            x = np.nextafter(x, npdt(-np.inf))
            out += [float(x)]
    finfo = np.finfo(npdt)
    out += [float(finfo.tiny), -float(finfo.tiny), float(finfo.smallest_subnormal)]
    out += [-float(finfo.smallest_subnormal), float(finfo.max), -float(finfo.max)]
    return out


def logs(dtype: torch.dtype, *, allow_inf: bool = False) -> st.SearchStrategy[float]:
    """Finite floats of ``dtype`` over the whole exponent range, the switch points,
    and (optionally) -inf."""
    width = 32 if dtype == torch.float32 else 64
    parts = [
        st.floats(allow_nan=False, allow_infinity=False, width=width),
        st.floats(-60.0, 60.0, width=width),
        st.sampled_from(switch_points(dtype)),
    ]
    if allow_inf:
        parts.append(st.just(-math.inf))
    return st.one_of(*parts)


@st.composite
def near_pairs(draw: st.DrawFn, dtype: torch.dtype) -> tuple[float, float]:
    """(a, b) with b a few ulps below a, or a tiny relative distance: near cancellation."""
    npdt = NP[dtype]
    a = npdt(draw(logs(dtype)))
    k = draw(st.integers(1, 8))
    b = a
    with np.errstate(over="ignore"):
        for _ in range(k):
            b = np.nextafter(b, npdt(-np.inf))
    if not np.isfinite(b):
        b = a
    return float(a), float(b)


# --- gradients ------------------------------------------------------------------------

U64 = 2.0**-53


def check_sum_grad(
    got: list[float],
    logs: list[float],
    weights: list[float],
    dtype: torch.dtype,
    t: int | None = None,
    term_log_error: float = 0.0,
) -> None:
    """``got``: the gradient of ``log|s|`` with respect to the logs, ``s`` the sum of all
    terms (``t`` None) or the prefix sum of terms ``0..t`` (the only output used), against
    the exact ``d log|s| / d l_i = w_i e^(l_i) / s`` (mpmath).

    Rule (docs/accuracy.md): the gradient is ``sign w_i exp(l_i - L)`` from the float64
    log ``L`` of the result, so its relative error is at most
    ``expm1(beta + u (|log|g_i|| + 3)) + u_out``, ``beta`` the result's
    :func:`signed_sum_error_bound`; for a prefix sum ``beta`` is that of the reversed
    prefix sum ``C_i = sum_{t' >= i} g_t' / s_t'`` (here one nonzero term, ``n - i`` terms,
    with the result's bound as its term error). Values beyond the dtype's range are
    ``+-inf``; terms not in the sum (or zero) get exactly 0.
    """
    from attnprec.lognum import signed_sum_error_bound

    n = len(logs)
    last = n - 1 if t is None else t
    ref = exact_log_sum(logs[: last + 1], weights[: last + 1])
    lv, sign = ref[0], ref[1]
    assert sign != 0
    beta = signed_sum_error_bound(
        last + 1, ref[2], float(lv), torch.float64, term_log_error, ref[3]
    ).item()
    big = float(np.finfo(NP[dtype]).max)
    with mpmath.workprec(PREC):
        for i, (l, w) in enumerate(zip(logs, weights, strict=True)):
            if i > last or w == 0 or l == -math.inf:
                assert got[i] == 0, (i, got)
                continue
            lg = m(l) - lv  # log|g_i| - log|w_i|
            want = sign * m(w) * mpmath.exp(lg)
            b = beta
            if t is not None:  # the reversed prefix sum C_i = 1 / s_t over n - i terms
                b = signed_sum_error_bound(
                    n - i, float(-lv), float(-lv), torch.float64, beta + U64 * abs(float(lv)),
                    float(-lv),
                ).item()  # fmt: skip
            if abs(want) > big:
                assert got[i] == (math.inf if want > 0 else -math.inf), (i, got[i], want)
                continue
            tol = math.expm1(b + U64 * (abs(float(lg + mpmath.log(abs(m(w))))) + 3)) + U[dtype]
            tiny = float(np.finfo(NP[dtype]).smallest_subnormal)
            assert abs(m(got[i]) - want) <= tol * abs(want) + tiny, (i, got[i], float(want), tol)
