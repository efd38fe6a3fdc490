"""Accurate elementwise log-space primitives on plain tensors.

Every function computes in float64 and rounds once to the promoted input dtype
(float16/bfloat16/float32 inputs are exact in float64). Error guarantee, measured
against mpmath in ``tests/lognum/test_elementwise.py`` and tabulated in
docs/accuracy.md: at most 2 ulps (float32) and 4 ulps (float64) of
``max(|exact|, 1)``.

Branches are evaluated on "safe" substituted inputs so that the branch not taken
never produces an infinite or NaN gradient.
"""

from __future__ import annotations

import math

import torch

from ._checks import COMPUTE, broadcast, check_float, out_dtype

__all__ = ["log1mexp", "log1pexp", "logaddexp", "logsubexp"]

_LN2 = math.log(2.0)
# ln 2 split as in fdlibm: e * _LN2_HI is exact for |e| < 2^21.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def _log1mexp64(a: torch.Tensor) -> torch.Tensor:
    # Maechler (2012): log(-expm1(a)) near 0, log1p(-exp(a)) below -log 2.
    near = a > -_LN2
    hi = torch.log(-torch.expm1(torch.where(near, a, -1.0)))
    lo = torch.log1p(-torch.exp(torch.where(near, -1.0, a)))
    return torch.where(near, hi, lo)


def _log1pexp64(a: torch.Tensor) -> torch.Tensor:
    # max(a, 0) + log1p(exp(-|a|)): no overflow, full relative accuracy for a << 0.
    return torch.clamp(a, min=0.0) + torch.log1p(torch.exp(-torch.abs(a)))


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
    Evaluated as ``max(a, 0) + log1p(exp(-|a|))`` in float64, rounded once. Error at
    most 2 ulps (float32) / 4 ulps (float64) of ``max(|exact|, 1)``.
    """
    check_float("a", a)
    return _log1pexp64(a.to(COMPUTE)).to(a.dtype)


def _logaddexp64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(a, b)
    # a == b covers +-inf on both sides, where a - b is NaN.
    d = torch.where(a == b, 0.0, -torch.abs(a - b))
    return m + torch.log1p(torch.exp(d))


def _shift_log64(shift: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``shift + log|v|`` with absolute error about ``u (|result| + 2)``.

    ``log|v|`` may be large while ``shift`` cancels it; rounding the large log would
    cost an ulp of ``|log|v||``. With ``|v| = f 2^e``: ``(shift + e ln2_hi)`` (exact
    product, one rounding) plus the small ``log f + e ln2_lo``. ``v = 0`` gives -inf.
    """
    f, e = torch.frexp(torch.abs(v))
    e = e.to(v.dtype)
    return (shift + e * _LN2_HI) + (torch.log(f) + e * _LN2_LO)


def _shifted_log1mexp64(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``a + log1mexp(d)`` for ``d <= 0``, accurate even when the two terms cancel.

    Near ``d = 0``, ``log(-expm1(d))`` is large and negative and ``a`` may cancel it;
    its rounding (an ulp of the large log) would then dominate. Writing
    ``-expm1(d) = f 2^e`` gives ``a + e ln2_hi`` (exact product, one rounding) plus
    the small ``log f + e ln2_lo``, so the result keeps absolute accuracy ~u.
    """
    near = d > -_LN2
    x = -torch.expm1(torch.where(near, d, -1.0))
    hi = torch.where(x == 0, a - math.inf, torch.where(x < 0, math.nan, _shift_log64(a, x)))
    lo = a + torch.log1p(-torch.exp(torch.where(near, -1.0, d)))
    return torch.where(near, hi, lo)


def _logsubexp64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a == b: log1mexp(0) = -inf, so equal finite (or -inf) arguments give exactly -inf.
    return _shifted_log1mexp64(a, torch.where(a == b, 0.0, b - a))


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
