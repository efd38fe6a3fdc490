"""Accurate elementwise log-space primitives on plain tensors.

Every function computes in float64 and rounds once to the promoted input dtype
(float16/bfloat16/float32 inputs are exact in float64). Error guarantee, measured
against mpmath in ``tests/lognum/test_elementwise.py`` and tabulated in
docs/accuracy.md: at most 2 ulps (float32) and 4 ulps (float64) of
``max(|exact|, 1)``.

Branches are evaluated on "safe" substituted inputs so that the branch not taken
never produces an infinite or NaN gradient. Gradients are the analytic derivatives at the
branch switches, ties and limits too (``log1pexp'(0) = 1/2``, ``logaddexp`` splits
``1/2, 1/2`` at ``a = b``, ``logsubexp`` gives ``+inf, -inf`` there), within 8 units of
roundoff (tested, docs/accuracy.md). The difference ``b - a`` of the binary functions is
carried as a double-double (its rounding error applied as a factor ``1 + d_lo``), so the
derivative with respect to a far smaller argument, ``~ e^(b - a)``, does not pick up the
relative error ``u |a - b|`` of a rounded difference. No gradient goes through
``torch.frexp`` (whose mantissa derivative divides by a float32 power of two: ``inf``
below ``2^-149``, 0 above ``2^128``).
"""

from __future__ import annotations

import math

import torch

from ._checks import COMPUTE, broadcast, check_float, out_dtype
from ._dd import ldexp

__all__ = ["log1mexp", "log1pexp", "logaddexp", "logsubexp"]

_LN2 = math.log(2.0)
# ln 2 split as in fdlibm: e * _LN2_HI is exact for |e| < 2^21.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def _log1mexp64(a: torch.Tensor) -> torch.Tensor:
    # Maechler (2012): log(-expm1(a)) near 0, log1p(-exp(a)) below -log 2. "0.0 - expm1"
    # is +0 at a = 0 (plain negation gives -0, whose log has the derivative 1/(-0) = -inf,
    # so the gradient at 0 would be +inf instead of -inf).
    near = a > -_LN2
    hi = torch.log(0.0 - torch.expm1(torch.where(near, a, -1.0)))
    lo = torch.log1p(-torch.exp(torch.where(near, -1.0, a)))
    return torch.where(near, hi, lo)


def _log1pexp64(a: torch.Tensor) -> torch.Tensor:
    # a + log1p(exp(-a)) above 0, log1p(exp(a)) at and below it: no overflow, full relative
    # accuracy for a << 0. Two branches on safe inputs, not max(a, 0) + log1p(exp(-|a|)):
    # the kinks of max and |.| at 0 give the derivative 1 + 0 there instead of 1/2.
    up = a > 0
    hi = torch.where(up, a, 0.0)
    lo = torch.where(up, 0.0, a)
    return torch.where(up, hi + torch.log1p(torch.exp(-hi)), torch.log1p(torch.exp(lo)))


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """Compute ``log(1 - exp(a))`` for ``a <= 0``.

    Parameters
    ----------
    a : torch.Tensor
        Real floating-point tensor.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``a``. ``-inf`` at ``a == 0``, ``0`` at ``a == -inf``,
        NaN for ``a > 0`` (the logarithm of a negative number) and for NaN input.

    Notes
    -----
    Uses Maechler's switch at ``-log 2``: ``log(-expm1(a))`` above it,
    ``log1p(-exp(a))`` below. Computed in float64 and rounded once; the error is at
    most 2 ulps (float32) / 4 ulps (float64) of ``max(|exact|, 1)`` (docs/accuracy.md).
    """
    check_float("a", a)
    return _log1mexp64(a.to(COMPUTE)).to(a.dtype)


def log1pexp(a: torch.Tensor) -> torch.Tensor:
    """Compute ``log(1 + exp(a))`` (softplus) without overflow.

    Parameters
    ----------
    a : torch.Tensor
        Real floating-point tensor.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``a``; ``inf`` at ``+inf``, ``0`` at ``-inf``.

    Notes
    -----
    Evaluated in float64 as ``a + log1p(exp(-a))`` above 0 and ``log1p(exp(a))`` at and
    below it (two branches, so that the derivative at 0 is 1/2), rounded once. Error at
    most 2 ulps (float32) / 4 ulps (float64) of ``max(|exact|, 1)``.
    """
    check_float("a", a)
    return _log1pexp64(a.to(COMPUTE)).to(a.dtype)


def _diff_lo(x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The rounding error of ``d = fl(x - y)`` (TwoSum, exact: ``d + lo == x - y``),
    without gradient; 0 where the difference is not finite."""
    with torch.no_grad():
        xd, yd, dd = x.detach(), y.detach(), d.detach()
        bb = dd - xd
        lo = (xd - (dd - bb)) - (yd + bb)
        return torch.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0)


def _log1pexp_neg(d: torch.Tensor, d_lo: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(d + d_lo))`` for ``d <= 0`` (``d_lo`` a rounding error of ``d``, no
    gradient): the factor ``1 + d_lo`` keeps ``exp`` and the derivative ``~ e^d``
    accurate relative to themselves however negative ``d`` is."""
    return torch.log1p(torch.exp(d) * (1 + d_lo))


def _logaddexp64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(a, b)
    # a == b covers +-inf on both sides, where a - b is NaN.
    tie = a == b
    diff = a - b
    d = torch.where(tie, 0.0, -torch.abs(diff))
    d_lo = torch.where(diff > 0, -1.0, 1.0) * _diff_lo(a, b, diff)  # d = -|diff|
    return m + _log1pexp_neg(d, torch.where(tie, 0.0, d_lo))


def _shift_log64(
    shift: torch.Tensor, v: torch.Tensor, e_extra: torch.Tensor | None = None
) -> torch.Tensor:
    """``shift + log|v| + e_extra ln 2`` with absolute error about ``u (|result| + 2)``.

    ``log|v|`` may be large while ``shift`` cancels it; rounding the large log would
    cost an ulp of ``|log|v||``. With ``|v| = f 2^e``: ``(shift + e ln2_hi)`` (exact
    product, one rounding) plus the small ``log f + e ln2_lo``. ``v = 0`` gives -inf
    (NaN where ``shift`` is +inf or NaN: ``inf + log 0``), with a zero gradient to ``v``
    (never ``0 * inf``). ``e_extra`` (integer-valued, e.g. the exponent weights were
    scaled by) joins ``e``.

    Under autograd ``f = |v| 2^-e`` is formed with ``e`` detached and two exact float64
    powers of two (:func:`_dd.ldexp`), so ``d/dv = 1/v`` wherever that is a float:
    ``torch.frexp``'s own derivative divides by ``2^e`` in float32 (``inf`` for
    ``|v| < 2^-149``, 0 for ``|v| >= 2^128``).
    """
    a = torch.abs(v)
    zero = a == 0
    if torch.is_grad_enabled() and v.requires_grad:
        with torch.no_grad():
            _, e_i = torch.frexp(a.detach())
        e = e_i.to(v.dtype)
        f = ldexp(torch.where(zero, 1.0, a), -e)
    else:
        f, e_i = torch.frexp(torch.where(zero, 1.0, a))
        e = e_i.to(v.dtype)
    if e_extra is not None:
        e = e + e_extra
    out = (shift + e * _LN2_HI) + (torch.log(f) + e * _LN2_LO)
    return torch.where(zero, shift - math.inf, out)


def _shifted_log1mexp64(
    a: torch.Tensor, d: torch.Tensor, d_lo: torch.Tensor | None = None
) -> torch.Tensor:
    """``a + log1mexp(d)`` for ``d <= 0``, accurate even when the two terms cancel.

    Near ``d = 0``, ``log(-expm1(d))`` is large and negative and ``a`` may cancel it;
    its rounding (an ulp of the large log) would then dominate. Writing
    ``-expm1(d) = f 2^e`` gives ``a + e ln2_hi`` (exact product, one rounding) plus
    the small ``log f + e ln2_lo``, so the result keeps absolute accuracy ~u.
    ``d_lo``: the rounding error of ``d`` (no gradient), applied below ``-log 2`` as the
    factor ``1 + d_lo`` of ``exp(d)`` (there the derivative ``~ -e^d`` would otherwise
    carry the relative error ``u |d|``; above, that error is below ``u``).
    """
    near = d > -_LN2
    x = 0.0 - torch.expm1(torch.where(near, d, -1.0))  # +0 at d = 0 (see _log1mexp64)
    zero = x == 0
    # At x = 0 the value is -inf; a + log(x) there gives it the derivative of log at +0
    # (+inf), the analytic one, where _shift_log64 would meet |x|'s kink (0 * inf = NaN).
    hi = torch.where(
        zero,
        a + torch.log(torch.where(zero, x, 1.0)),
        torch.where(x < 0, math.nan, _shift_log64(a, torch.where(zero, 1.0, x))),
    )
    far = torch.exp(torch.where(near, -1.0, d))
    if d_lo is not None:
        far = far * (1 + torch.where(near, 0.0, d_lo))
    lo = a + torch.log1p(-far)
    return torch.where(near, hi, lo)


def _logsubexp64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a == b: log1mexp(0) = -inf, so equal finite (or -inf) arguments give exactly -inf.
    # b - a is exact there (0) and keeps its derivative; only equal infinities, where it
    # is NaN, take a constant 0.
    diff = b - a
    return _shifted_log1mexp64(
        a, torch.where((a == b) & torch.isinf(a), 0.0, diff), _diff_lo(b, a, diff)
    )


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute ``log(exp(a) + exp(b))`` elementwise (broadcasting).

    Parameters
    ----------
    a, b : torch.Tensor
        Real floating-point tensors of broadcastable shapes.

    Returns
    -------
    torch.Tensor
        In the promoted dtype of ``a`` and ``b``.

    Notes
    -----
    ``max(a, b) + log1p(exp(-|a - b|))`` in float64, rounded once. Error at most
    2 ulps (float32) / 4 ulps (float64) of ``max(|exact|, 1)``.
    """
    check_float("a", a)
    check_float("b", b)
    dt = out_dtype(a, b)
    a, b = broadcast(("a", "b"), a, b)
    return _logaddexp64(a.to(COMPUTE), b.to(COMPUTE)).to(dt)


def logsubexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Compute ``log(exp(a) - exp(b))`` for ``a >= b`` elementwise (broadcasting).

    Parameters
    ----------
    a, b : torch.Tensor
        Real floating-point tensors of broadcastable shapes.

    Returns
    -------
    torch.Tensor
        In the promoted dtype. Exactly ``-inf`` where ``a == b`` (finite or ``-inf``);
        NaN where ``a < b`` (negative difference), where ``a == b == +inf``, or on NaN.

    Notes
    -----
    ``a + log1mexp(b - a)`` in float64, rounded once; near cancellation ``b - a`` is
    exact (Sterbenz), so the result keeps full accuracy. Error at most 2 ulps
    (float32) / 4 ulps (float64) of ``max(|exact|, 1)``.
    """
    check_float("a", a)
    check_float("b", b)
    dt = out_dtype(a, b)
    a, b = broadcast(("a", "b"), a, b)
    return _logsubexp64(a.to(COMPUTE), b.to(COMPUTE)).to(dt)
