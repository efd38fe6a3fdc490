"""Double-double helpers for the float64 sums: exp, an exact-extraction sum, and the logs.

A float64 ``logsumexp`` done the usual way (``m + log(sum exp(l - m))``) carries the
rounding of ``l - m``, about half an ulp from every ``exp``, the summation error and the
``log``'s own ulp. Here each term ``exp(l_i - m)`` is a pair ``hi + lo`` good to about
``2^-66`` relative, the sum is exact for the ``hi`` parts (Rump, Ogita and Oishi's
extraction) and compensated for the rest, and the log is refined by one Newton step with
the same exp, so the result is the exact value rounded once. Near a result of 0 the
sums are pivoted (``log|P| + log|1 + R|``, :func:`log1p_dd` summing a series for small
``R``), so the rounding is relative to the result there too: it is never measurably less
accurate than SciPy's ``logsumexp`` (benchmarks/bench_lognum.py, docs/accuracy.md). Not
differentiable by design: callers use it only without autograd.
"""

from __future__ import annotations

import functools
import math

import torch

_LN2 = math.log(2.0)
# ln 2 split as in fdlibm: e * _LN2_HI is exact for |e| < 2^21.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
# ln2 / 256 with 33 significant bits (k * _C_HI exact for |k| < 2^20) and the remainder.
_N = 256
_C_HI = math.ldexp(round(math.ldexp(_LN2 / _N, 41)), -41)
_EXP_DEAD = -746.0  # exp below this is < 2^-1076: it rounds to 0
_SQRT_HALF = math.sqrt(0.5)


@functools.cache
def _table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``2^(j/256)`` for j = 0..255 as ``hi + lo``, ``hi`` split in two 26-bit halves
    (for TwoProd), and ``ln2/256 - _C_HI``; on ``device`` (one copy per device)."""
    import mpmath

    with mpmath.workprec(200):
        hi, lo = [], []
        for j in range(_N):
            t = mpmath.mpf(2) ** (mpmath.mpf(j) / _N)
            hi.append(float(t))
            lo.append(float(t - hi[-1]))
        c_lo = float(mpmath.log(2) / _N - mpmath.mpf(_C_HI))
    h = torch.tensor(hi, dtype=torch.float64, device=device)
    a1 = h * 134217729.0
    h_hi = a1 - (a1 - h)
    return (
        torch.stack([h, h_hi, h - h_hi]),
        torch.tensor(lo, dtype=torch.float64, device=device),
        c_lo,
    )


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s + e == a + b`` exactly (Knuth's TwoSum), ``s = fl(a + b)``."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def exp_dd(d: torch.Tensor, d_lo: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(d + d_lo)`` as ``hi + lo`` with relative error below ``2^-66``.

    ``d = k ln2/256 + r`` (``k * _C_HI`` exact, so ``d - k _C_HI`` is exact),
    ``|r| <= ln2/512`` held as ``r_hi + r_lo``; ``exp(r) = 1 + r + r^2 P(r)`` (Taylor to
    ``r^5``, truncation ``< 2^-71``), times the double-double ``2^(j/256)``,
    ``j = k mod 256``, the leading product exact (TwoProd) and renormalized (TwoSum), then
    scaled by ``2^((k - j)/256)`` exactly. The low part's rounding below the normal range
    adds absolute ``2^-1074``, past ``2^-66`` relative for results below about ``2^-1008``
    (``d`` under about -698; a review measured ``8e-17`` relative at ``d = -708.3``):
    callers count ``2^-1074`` per term; ``d`` below -746 (``-inf`` included) gives 0; for
    ``d <= 709``.
    """
    tab, t_lo, c_lo = _table(d.device)
    x = torch.clamp(d, min=_EXP_DEAD)
    k = torch.round(x * (_N / _LN2))
    r_hi = x - k * _C_HI  # exact
    r_lo = d_lo - k * c_lo
    r = r_hi + r_lo
    tail = r * r * (0.5 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120))))
    e = torch.floor(k * (1 / _N))
    j = torch.nan_to_num(k - e * _N).long()  # NaN d: any index, r carries the NaN
    th, th_hi, th_lo = tab[:, j]
    tl = t_lo[j]
    # TwoProd(th, r_hi), th pre-split
    p = th * r_hi
    a1 = r_hi * 134217729.0
    r_h = a1 - (a1 - r_hi)
    r_l = r_hi - r_h
    p_err = ((th_hi * r_h - p) + th_hi * r_l + th_lo * r_h) + th_lo * r_l
    hi, h_err = two_sum(th, p)
    lo = h_err + (p_err + th * (r_lo + tail) + tl * (1 + r + tail))
    scale = torch.pow(2.0, e)
    return hi * scale, lo * scale


def _extract(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x = top + rest`` exactly, every ``top`` on one grid along ``dim``.

    With ``sigma = 1.5 * 2^p`` above ``2 (n + 1) max|x|``, ``fl(sigma + x) - sigma`` takes
    the leading bits of every term on the grid ``ulp(sigma)``, so the sum of the tops is
    exact in any order (Rump, Ogita and Oishi 2008); ``|rest| <= ulp(sigma) / 2 <=
    (n + 1) 2^-51 max|x|``.
    """
    big = x.abs().amax(dim, keepdim=True)
    _, p = torch.frexp(big * (2 * (x.shape[dim] + 1)))
    sigma = torch.ldexp(torch.full_like(big, 1.5), p)
    top = (x + sigma) - sigma
    return top, x - top


def extract_sum(hi: torch.Tensor, lo: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum(hi + lo)`` along ``dim`` (kept) as a pair ``s + e``.

    ``hi`` is split twice (:func:`_extract`); both sums of tops are exact, and only the
    second remainders (each at most ``(n + 1)^2 2^-102 max|hi|``) and the ``lo`` are
    summed in float64: for ``n <= 2^16`` an error below ``2^-90 max|hi| + n u sum|lo|``.
    """
    t1, r1 = _extract(hi, dim)
    t2, r2 = _extract(r1, dim)
    s, e = two_sum(t1.sum(dim, keepdim=True), t2.sum(dim, keepdim=True))
    return two_sum(s, e + (r2.sum(dim, keepdim=True) + lo.sum(dim, keepdim=True)))


def shift_log_dd(
    shift: torch.Tensor, s: torch.Tensor, s_lo: torch.Tensor, e_extra: torch.Tensor
) -> torch.Tensor:
    """``shift + log|s + s_lo| + e_extra ln 2`` rounded once (``|s_lo| <= ulp(s)``,
    ``e_extra`` integer-valued); ``s = 0`` gives ``-inf``.

    ``|s| = f 2^e`` (f in [0.5, 1)); ``t0 = log f`` corrected by one Newton step,
    ``(f - exp(t0)) / exp(t0)`` with ``exp_dd``; the parts are added with TwoSum.
    """
    f, e = torch.frexp(s.abs())
    f_lo = torch.ldexp(s_lo * torch.sign(s), -e)
    e = e.to(s.dtype) + e_extra
    t0 = torch.log(f)
    g_hi, g_lo = exp_dd(t0)
    delta = ((f - g_hi) + (f_lo - g_lo)) / g_hi  # f - g_hi is exact (Sterbenz)
    a, a_err = two_sum(shift, e * _LN2_HI)
    b, b_err = two_sum(a, t0)
    out = b + ((a_err + b_err) + (e * _LN2_LO + delta))
    return torch.where(s == 0, -math.inf, out)


def ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x 2^e`` for integer-valued ``e`` with ``|e| <= 2200``, exact wherever the result is
    normal: two factors ``2^(e/2)`` (``torch.ldexp`` with a float exponent forms ``2^e``
    itself, which overflows for ``e > 1023`` and turns ``0 2^1074`` into NaN)."""
    h = torch.floor(e * 0.5)
    return x * torch.pow(2.0, h) * torch.pow(2.0, e - h)


def log_dd(x: torch.Tensor, x_lo: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(x + x_lo)`` for ``x > 0`` (``|x_lo| <= ulp(x)``) as ``hi + lo``, to about
    ``2^-65`` absolute: ``x = f 2^e`` with ``f`` in ``[1/sqrt 2, sqrt 2)`` (``e = 0`` near
    1, where the parts would otherwise cancel), ``t0 = log f`` refined by one Newton step
    with ``exp_dd``, ``e ln 2`` split in two (``e * _LN2_HI`` exact)."""
    f, e_i = torch.frexp(x)
    low = f < _SQRT_HALF
    f = torch.where(low, 2 * f, f)
    e = e_i.to(x.dtype) - low.to(x.dtype)
    f_lo = ldexp(torch.as_tensor(x_lo, dtype=x.dtype), -e)
    t0 = torch.log(f)
    g_hi, g_lo = exp_dd(t0)
    delta = ((f - g_hi) + (f_lo - g_lo)) / g_hi  # f - g_hi is exact (Sterbenz)
    hi, err = two_sum(e * _LN2_HI, t0)
    return hi, err + (e * _LN2_LO + delta)


# Taylor coefficients (-1)^(k+1)/k of log1p for k = 3..15: the tail after r - r^2/2.
_LOG1P_TAIL = [(-1.0) ** (k + 1) / k for k in range(3, 16)]
#: ``log1p_dd`` sums the series below this ``|r|`` (truncation ``2^-5*14/15 < 2^-70`` relative).
LOG1P_SERIES = 2.0**-5


def log1p_dd(r: torch.Tensor, r_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log|1 + r + r_lo|`` as ``hi + lo`` (``|r_lo| <= ulp(r)``), relative to the result.

    For ``|r| <= 2^-5`` the series ``r - r^2/2 + r^3 P(r)``: ``r^2`` exact (TwoProd), the
    tail in float64 (its rounding ``~u |r|^3 <= 2^-63 |r|``), ``r_lo`` through
    ``r_lo (1 - r)``. Otherwise :func:`log_dd` of ``|1 + r|`` formed exactly (TwoSum),
    whose ``2^-65`` absolute error is below ``2^-60`` of ``|log|1 + r|| >= 2^-5.1``.
    ``1 + r = 0`` gives ``-inf``.
    """
    small = torch.abs(r) <= LOG1P_SERIES
    rs = torch.where(small, r, 0.0)
    sq, sq_err = two_prod(rs, rs)
    tail = torch.full_like(rs, _LOG1P_TAIL[-1])
    for c in reversed(_LOG1P_TAIL[:-1]):
        tail = tail * rs + c
    hi_s, e1 = two_sum(rs, -0.5 * sq)
    lo_s = e1 + (torch.where(small, r_lo, 0.0) * (1 - rs) - 0.5 * sq_err + sq * rs * tail)
    v, v_err = two_sum(torch.ones_like(r), torch.where(small, 1.0, r))
    v, v_lo = two_sum(v, v_err + torch.where(small, 0.0, r_lo))  # v = 0 only if 1 + r is
    sgn = torch.sign(v)
    zero = v == 0
    hi_l, lo_l = log_dd(torch.where(zero, 1.0, v * sgn), v_lo * sgn)
    hi_l = torch.where(zero, -math.inf, hi_l)
    return torch.where(small, hi_s, hi_l), torch.where(small, lo_s, torch.where(zero, 0.0, lo_l))


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p + e == a * b`` exactly (Dekker's product with Veltkamp's split), for
    ``|a|, |b| <= 2^900`` (no overflow in the split)."""
    p = a * b
    a1 = a * 134217729.0  # 2^27 + 1
    a_hi = a1 - (a1 - a)
    b1 = b * 134217729.0
    b_hi = b1 - (b1 - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
