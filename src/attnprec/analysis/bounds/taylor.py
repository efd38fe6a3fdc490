"""Taylor truncation bounds for ``taylor_attention`` (weights T_P(s) = sum_{p<=P} s^p / p!).

Everything rests on the ratio r(x) = T_P(x) e^{-x} of the Taylor weight to the exact one:

- r'(x) = -x^P / P! e^{-x}, so r decreases for even P (and r > 0 since T_P > 0), and has its
  maximum r(0) = 1 for odd P. Hence sup_{|x|<=R} |r(x) - 1| = max(|r(-R) - 1|, |r(R) - 1|)
  exactly (:func:`taylor_weight_bound`).
- For any weights w_j > 0 with exact output y = sum w_j v_j / sum w_j, and any c,
  y_T - y = sum_j w_j (r_j - c)(v_j - y) / sum_j w_j r_j, a convex combination of
  (1 - c / r_j)(v_j - y) when every r_j > 0. With r in [a, b] the choice c = 2ab / (a + b)
  gives |y_T - y| <= (b - a) / (b + a) max_j |v_j - y| (:func:`taylor_degree_needed`).
- A posteriori (:func:`taylor_error_bound`), both outputs are evaluated in float64 with
  certified radii (:mod:`.approximation`): the bound is |y_T - y| itself up to the float64
  evaluation errors (see docs/bounds/taylor.md).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from attnprec._validate import check_int, check_real
from attnprec.analysis.bounds.rounding import U64, upper
from attnprec.attention.taylor import MAX_DEGREE, check_degree

__all__ = [
    "taylor_ratio_range",
    "taylor_weight_bound",
    "taylor_degree_needed",
    "taylor_output_bound",
    "taylor_error_bound",
]


def _check_radius(radius: object) -> float:
    r = check_real("radius", radius)
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"radius: expected a finite number >= 0, got {radius!r}")
    return r


def _check_tol(tol: object) -> float:
    """``tol`` as a float in (0, 1), else an error naming ``tol``."""
    t = check_real("tol", tol)
    if not (0.0 < t < 1.0):
        raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
    return t


class _Balls:
    """Interval arithmetic for the certified ranges: python-flint's ``arb`` when installed,
    else ``mpmath.iv`` (outward-rounded intervals; slower, same guarantee)."""

    def __init__(self, prec: int) -> None:
        self.prec = prec
        try:
            import flint

            self.flint: Any = flint
        except ImportError:
            self.flint = None

    def __enter__(self) -> _Balls:
        if self.flint is not None:
            self._saved = self.flint.ctx.prec
            self.flint.ctx.prec = self.prec
        else:
            from mpmath import iv

            self._saved = iv.prec
            iv.prec = self.prec
        return self

    def __exit__(self, *exc: object) -> None:
        if self.flint is not None:
            self.flint.ctx.prec = self._saved
        else:
            from mpmath import iv

            iv.prec = self._saved

    def num(self, x: float):  # type: ignore[no-untyped-def]
        if self.flint is not None:
            return self.flint.arb(x)
        from mpmath import iv

        return iv.mpf(x)

    def unit(self):  # type: ignore[no-untyped-def]
        """The interval [-1, 1]."""
        if self.flint is not None:
            return self.flint.arb(0, 1)
        from mpmath import iv

        return iv.mpf([-1, 1])

    def exp(self, x):  # type: ignore[no-untyped-def]
        if self.flint is not None:
            return x.exp()
        from mpmath import iv

        return iv.exp(x)

    def up(self, x) -> float:  # type: ignore[no-untyped-def]
        """A float >= every point of ``x``."""
        hi = x.upper() if self.flint is not None else x.b
        return math.nextafter(float(hi), math.inf)

    def down(self, x) -> float:  # type: ignore[no-untyped-def]
        """A float <= every point of ``x``."""
        lo = x.lower() if self.flint is not None else x.a
        return math.nextafter(float(lo), -math.inf)


def _ratio(be: _Balls, x: float, degree: int):  # type: ignore[no-untyped-def]
    """Enclosure of r(x) = T_P(x) e^{-x} (call inside ``be``)."""
    xa = be.num(x)
    t = be.num(1.0)
    term = be.num(1.0)
    for p in range(1, degree + 1):
        term = term * xa / p
        t = t + term
    return t * be.exp(-xa)


def taylor_ratio_range(radius: float, degree: int) -> tuple[float, float]:
    """Certified [lo, hi] containing r(x) = T_P(x) / e^x for every |x| <= radius.

    Exact extremes up to outward rounding: r is decreasing for even P, and for odd P has its
    maximum 1 at x = 0 (r'(x) = -x^P e^{-x} / P!). ``lo`` may be <= 0 (odd P, large radius),
    where the Taylor normalizer can vanish.

    Parameters
    ----------
    radius : float
        R >= 0, finite: the largest |x| = |scale q.k|.
    degree : int
        P, the highest power kept, in ``[0, MAX_DEGREE]`` (170).

    Returns
    -------
    tuple of float
        ``(lo, hi)``, cached per argument pair.

    Raises
    ------
    TypeError
        If ``radius`` is not a real number or ``degree`` not an integer.
    ValueError
        If ``radius`` is negative or not finite, or ``degree`` is out of range.

    Notes
    -----
    Error: certified (arb balls, or mpmath intervals without python-flint, at 128 bits,
    rounded outward to float64).
    """
    # Checked before the cache: its keys equate True with 1 and 4.0 with 4.
    return _ratio_range(_check_radius(radius), check_degree(degree))


@lru_cache(maxsize=4096)
def _ratio_range(radius: float, degree: int) -> tuple[float, float]:
    with _Balls(128) as be:
        r_neg, r_pos = _ratio(be, -radius, degree), _ratio(be, radius, degree)
        if degree % 2 == 0:
            return be.down(r_pos), be.up(r_neg)
        return min(be.down(r_neg), be.down(r_pos)), 1.0


def taylor_weight_bound(radius: float, degree: int) -> float:
    """Bound on the relative Taylor weight error sup_{|x|<=R} |T_P(x) - e^x| / e^x.

    Parameters
    ----------
    radius : float
        R >= 0, the largest |x| = |scale q.k|.
    degree : int
        P >= 0, the highest power kept.

    Returns
    -------
    float
        max(|r(-R) - 1|, |r(R) - 1|) with r(x) = T_P(x) e^{-x}, rounded up: the exact supremum
        (monotonicity of r, module docstring), never above the Lagrange bound
        R^{P+1} e^R / (P+1)!. Certified with arb ball arithmetic (mpmath intervals
        without python-flint).
    """
    lo, hi = taylor_ratio_range(radius, degree)
    return max(hi - 1.0, 1.0 - lo) if hi > 1.0 else 1.0 - lo


def taylor_output_bound(radius: float, degree: int) -> float:
    """Worst relative output error of Taylor attention on inputs with |scale q.k| <= R.

    |y_T - y| <= B * max_j |v_j - y| with B = (b - a) / (b + a) for r in [a, b]
    (:func:`taylor_ratio_range`); ``inf`` when a <= 0 (the normalizer can vanish).

    Parameters
    ----------
    radius : float
        R >= 0, finite: the largest |x| = |scale q.k|.
    degree : int
        P, the highest power kept, in ``[0, MAX_DEGREE]`` (170).

    Returns
    -------
    float
        B in ``[0, 1]``, or ``inf``.

    Raises
    ------
    TypeError
        If ``radius`` is not a real number or ``degree`` not an integer.
    ValueError
        If ``radius`` is negative or not finite, or ``degree`` is out of range.

    Notes
    -----
    Error: a sound bound for every input with ``|scale q.k| <= R`` (certified range,
    rounded up with :func:`~attnprec.analysis.bounds.rounding.upper`).
    """
    lo, hi = taylor_ratio_range(radius, degree)
    if lo <= 0.0:
        return math.inf
    if math.isinf(hi):  # r(-R) past float64: (b - a) / (b + a) < 1, its limit (NaN before)
        return 1.0
    return min(1.0, upper((hi - lo) / (hi + lo), 3))


def taylor_degree_needed(radius: float, tol: float, max_degree: int = 256) -> int:
    """Least degree P with |taylor_attention - softmax_attention| <= tol max_j |v_j - y_i|.

    Holds for every input with |scale q_i . k_j| <= radius, any n, d, values and mask
    (module docstring: B(R, P) = (b - a) / (b + a) <= tol with r = T_P / exp in [a, b]).

    Degrees past ``MAX_DEGREE`` (170, what ``taylor_attention`` takes) are not tried.

    Parameters
    ----------
    radius : float
        R >= 0, finite: the largest |scale q.k| of the inputs.
    tol : float
        Allowed relative output error, in ``(0, 1)``.
    max_degree : int, optional
        The largest degree tried, ``>= 0`` (default 256, capped at 170).

    Returns
    -------
    int
        The least such P.

    Raises
    ------
    TypeError
        If an argument is not a number (``max_degree``: an integer).
    ValueError
        If ``radius`` is negative or not finite, ``tol`` is not in (0, 1), ``max_degree``
        is negative, or no degree up to ``max_degree`` suffices.

    Notes
    -----
    Error: sound; the degree is chosen with :func:`taylor_output_bound`, a certified bound.
    """
    radius = _check_radius(radius)
    tol = _check_tol(tol)
    max_degree = min(check_int("max_degree", max_degree), MAX_DEGREE)
    for p in range(max_degree + 1):
        if taylor_output_bound(radius, p) <= tol:
            return p
    raise ValueError(f"max_degree: no degree <= {max_degree} reaches tol={tol} at R={radius}")


@torch.no_grad()
def taylor_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    degree: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    rows: object = None,
) -> torch.Tensor:
    """A posteriori per-element bound on |taylor_attention - softmax_attention| (exact maps).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``; taken as exact values.
    degree : int
        P, the highest power of the Taylor weight.
    causal, scale
        As in the attention methods (scale defaults to 1/sqrt(d_k)).
    rows : int or sequence of int, optional
        Only these query rows (or a sampled count of them).

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``: both outputs evaluated in float64 with certified
        radii, their difference plus the radii (:mod:`.approximation`): the true error up
        to float64 evaluation, whatever the logits (each method normalized by its own
        normalizer, so no key is lost to float64 underflow). ``inf`` where the Taylor
        normalizer is not certified away from 0 (odd P, logits near the polynomial's root).
    """
    from attnprec.analysis.bounds.approximation import output_difference

    degree = check_degree(degree)
    coeffs = [1.0 / math.factorial(p) for p in range(degree + 1)]
    return output_difference(
        q, k, v, causal=causal, scale=scale, rows=rows, coeffs=coeffs, coeff_rel=U64
    )
