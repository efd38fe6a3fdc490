"""Range-adapted polynomial weights: the relative-minimax polynomial for e^x on [-R, R].

At the cost of a degree-P Taylor weight, the polynomial p* minimizing
max_{|x|<=R} |p(x) e^{-x} - 1| (Remez exchange, in mpmath) makes the weight error orders of
magnitude smaller (docs/bounds/minimax.md). The coefficients are rounded to float64 (what
``polynomial_attention`` receives), and the error bound is certified *for those rounded
coefficients* by interval (arb) evaluation of r(x) = p(x) e^{-x} on a partition of [-R, R],
in mean-value form r([a, b]) in r(m) + r'([a, b]) [-h, h]; this also certifies p > 0 there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mpmath
import torch

from attnprec._validate import check_int
from attnprec.analysis.bounds.rounding import upper
from attnprec.analysis.bounds.taylor import _Balls, _check_radius, _check_tol
from attnprec.attention.taylor import MAX_DEGREE, _check_coeffs, check_degree

__all__ = [
    "minimax_exp_coeffs",
    "minimax_weight_bound",
    "polynomial_ratio_range",
    "polynomial_output_bound",
    "minimax_degree_needed",
    "polynomial_error_bound",
]

_PREC = 128

#: The largest radius the Remez exchange takes: its working precision grows with R (about
#: 2.9 R bits, for the range e^{-R}..e^R of its system), and e^R overflows float64 past 709.
MAX_RADIUS = 700.0

#: The most subintervals :func:`polynomial_ratio_range` evaluates (its time is linear in them).
MAX_PIECES = 2**20


def _check_minimax_radius(radius: object) -> float:
    """``radius`` checked as in :func:`.taylor._check_radius`, and at most :data:`MAX_RADIUS`."""
    r = _check_radius(radius)
    if r > MAX_RADIUS:
        raise ValueError(f"radius: expected at most {MAX_RADIUS:g} for a minimax fit, got {r!r}")
    return r


def _remez(radius: float, degree: int, iters: int = 40) -> list[float]:
    """Relative-minimax coefficients of e^x on [-R, R], by the Remez exchange (mpmath).

    Works in ``_PREC`` bits, or more where the range ``e^{-R}..e^R`` of the system's
    entries and the powers ``R^P`` need them (in 128 bits its LU factorization finds the
    system singular past R ~ 60).
    """
    span = 2 * radius * math.log2(math.e) + degree * math.log2(radius + 1)
    with mpmath.workprec(max(_PREC, 64 + math.ceil(span))):
        R = mpmath.mpf(radius)
        n = degree + 2
        xs = [-R * mpmath.cos(mpmath.pi * i / (n - 1)) for i in range(n)]

        def err(c: list, x: mpmath.mpf) -> mpmath.mpf:
            return mpmath.polyval(c[::-1], x) * mpmath.exp(-x) - 1

        c: list = []
        for _ in range(iters):
            rows = [
                [x**j for j in range(degree + 1)] + [(-1) ** i * mpmath.exp(x)]
                for i, x in enumerate(xs)
            ]
            sol = mpmath.lu_solve(mpmath.matrix(rows), mpmath.matrix([mpmath.exp(x) for x in xs]))
            c = [sol[j] for j in range(degree + 1)]
            level = abs(sol[degree + 1])
            # Zeros of the error between consecutive reference points (signs alternate).
            zs = [-R]
            for a, b in zip(xs[:-1], xs[1:], strict=True):
                fa = err(c, a)
                for _ in range(50):
                    mid = (a + b) / 2
                    fm = err(c, mid)
                    if (fm > 0) == (fa > 0):
                        a, fa = mid, fm
                    else:
                        b = mid
                zs.append((a + b) / 2)
            zs.append(R)
            # The extremum of |err| in each segment between zeros: dense sample, then golden.
            new = []
            for a, b in zip(zs[:-1], zs[1:], strict=True):
                grid = [a + (b - a) * i / 32 for i in range(33)]
                vals = [abs(err(c, x)) for x in grid]
                i = max(range(33), key=lambda t: vals[t])
                lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, 32)]
                g = (mpmath.sqrt(5) - 1) / 2
                for _ in range(30):
                    m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
                    if abs(err(c, m1)) >= abs(err(c, m2)):
                        hi = m2
                    else:
                        lo = m1
                cand = (lo + hi) / 2
                best = max([cand, grid[i]], key=lambda x: abs(err(c, x)))
                new.append(best)
            new[0], new[-1] = (
                -R if abs(err(c, -R)) >= abs(err(c, new[0])) else new[0],
                R if abs(err(c, R)) >= abs(err(c, new[-1])) else new[-1],
            )
            top = max(abs(err(c, x)) for x in new)
            xs = new
            if level > 0 and top - level <= level * mpmath.mpf(2) ** -20:
                break
        return [float(x) for x in c]


def _shift(coeffs: list, m):  # type: ignore[no-untyped-def]
    """Coefficients of p(m + t) in t, exactly in arb: b_j = sum_{i>=j} c_i C(i, j) m^{i-j}."""
    b = list(coeffs)
    deg = len(b) - 1
    for i in range(deg):  # repeated synthetic division (Taylor shift by Horner)
        for j in range(deg - 1, i - 1, -1):
            b[j] = b[j] + m * b[j + 1]
    return b


@lru_cache(maxsize=1024)
def _ratio_range(coeffs: tuple[float, ...], radius: float, pieces: int) -> tuple[float, float]:
    """Enclose r = p e^{-x} on each piece [m - h, m + h] as r(m) + r'(ball) [-h, h].

    r'(x) = q(x) e^{-x} with q = p' - p; q is Taylor-shifted to m exactly, so its enclosure
    on the ball has width about 2 |q'(m)| h and the range is overestimated by O(h^2 |r''|),
    not by the huge ball blow-up of Horner in the monomial basis.
    """
    with _Balls(160) as be:
        c = [be.num(x) for x in coeffs] + [be.num(0.0)]
        qc = [c[j + 1] * (j + 1) - c[j] for j in range(len(coeffs))]
        pc = c[:-1]
        lo, hi = math.inf, -math.inf
        h = be.num(radius) / pieces
        unit = be.unit()
        for i in range(pieces):
            m = be.num(-radius) + h * (2 * i + 1)
            em = be.exp(-m)
            r_mid = _shift(pc, m)[0] * em
            beta = _shift(qc, m)
            t = unit * h
            qball = beta[-1]
            for bj in reversed(beta[:-1]):
                qball = qball * t + bj
            dball = qball * em * be.exp(-t)
            enc = r_mid + dball * t
            lo = min(lo, be.down(enc))
            hi = max(hi, be.up(enc))
        return lo, hi


@torch.no_grad()
def polynomial_ratio_range(
    coeffs: torch.Tensor | tuple[float, ...], radius: float, pieces: int = 2048
) -> tuple[float, float]:
    """Certified [lo, hi] containing r(x) = p(x) e^{-x} for every |x| <= radius.

    Interval (arb) evaluation in mean-value form on ``pieces`` equal subintervals
    (``1 <= pieces <= MAX_PIECES``, 2**20); the enclosure is an overestimate of the true
    range by at most about (R / pieces) max |r'|.

    Parameters
    ----------
    coeffs : torch.Tensor or tuple of float
        c_0..c_P of p, non-empty and finite.
    radius : float
        R >= 0, finite.
    pieces : int, optional
        Number of subintervals (default 2048; 1 when R = 0).

    Returns
    -------
    tuple of float
        ``(lo, hi)``, cached.

    Raises
    ------
    TypeError
        If ``radius`` is not a real number or ``pieces`` not an integer.
    ValueError
        If ``coeffs`` is empty or not finite, ``radius`` negative or not finite, or
        ``pieces`` out of range.

    Notes
    -----
    Error: certified (arb balls at 160 bits, or mpmath intervals; rounded outward).
    """
    radius = _check_radius(radius)
    c = tuple(float(x) for x in (coeffs.tolist() if isinstance(coeffs, torch.Tensor) else coeffs))
    if not c or not all(math.isfinite(x) for x in c):
        raise ValueError("coeffs: expected a non-empty sequence of finite numbers")
    pieces = check_int("pieces", pieces, 1, MAX_PIECES)
    pieces = 1 if radius == 0.0 else pieces
    return _ratio_range(c, radius, pieces)


@lru_cache(maxsize=256)
def _minimax(radius: float, degree: int) -> tuple[float, ...]:
    return tuple(_remez(radius, degree)) if radius > 0 else (1.0,) + (0.0,) * degree


def minimax_exp_coeffs(radius: float, degree: int) -> torch.Tensor:
    """Coefficients c_0..c_P (float64) of the relative-minimax polynomial for e^x on [-R, R].

    Minimizes max_{|x|<=R} |p(x) - e^x| / e^x over degree-P polynomials (Remez exchange with
    the weight e^{-x}, in mpmath of 128 bits or more, cached); pass to
    ``polynomial_attention(..., coeffs=...)``. Its certified weight error (for the float64
    coefficients returned) is :func:`minimax_weight_bound`. ``radius`` is at most
    ``MAX_RADIUS`` (700); the fit slows as R and P grow (seconds at R = 700, P = 8).

    Parameters
    ----------
    radius : float
        R, finite, in ``[0, MAX_RADIUS]``; R = 0 gives the constant 1.
    degree : int
        P, in ``[0, MAX_DEGREE]`` (170).

    Returns
    -------
    torch.Tensor
        float64 ``[P + 1]``, lowest power first.

    Raises
    ------
    TypeError
        If ``radius`` is not a real number or ``degree`` not an integer.
    ValueError
        If ``radius`` or ``degree`` is out of range.

    Notes
    -----
    Error: the coefficients are a numerical fit (near-minimax, not certified); their weight
    error is certified separately by :func:`minimax_weight_bound`.
    """
    radius = _check_minimax_radius(radius)
    degree = check_degree(degree)
    return torch.tensor(_minimax(radius, degree), dtype=torch.float64)


def minimax_weight_bound(radius: float, degree: int) -> float:
    """Certified sup_{|x|<=R} |p(x) e^{-x} - 1| for the float64 minimax coefficients.

    From :func:`polynomial_ratio_range`; a value < 1 also certifies p > 0 on [-R, R].

    Parameters
    ----------
    radius : float
        R, finite, in ``[0, MAX_RADIUS]`` (700).
    degree : int
        P, in ``[0, MAX_DEGREE]`` (170).

    Returns
    -------
    float
        The bound.

    Raises
    ------
    TypeError, ValueError
        As :func:`minimax_exp_coeffs`.

    Notes
    -----
    Error: certified for the float64 coefficients :func:`minimax_exp_coeffs` returns.
    """
    lo, hi = polynomial_ratio_range(minimax_exp_coeffs(radius, degree), radius)
    return max(hi - 1.0, 1.0 - lo)


@torch.no_grad()
def polynomial_output_bound(coeffs: torch.Tensor | tuple[float, ...], radius: float) -> float:
    """Worst relative output error of polynomial attention against softmax for |s| <= R.

    |y_p - y| <= B max_j |v_j - y| with B = (b - a) / (b + a), r = p e^{-x} in [a, b]
    (the argument of :mod:`.taylor`); ``inf`` when a <= 0.

    Parameters
    ----------
    coeffs : torch.Tensor or tuple of float
        c_0..c_P of p, non-empty and finite.
    radius : float
        R >= 0, finite: the largest |s| = |scale q.k|.

    Returns
    -------
    float
        B, or ``inf``.

    Raises
    ------
    TypeError, ValueError
        As :func:`polynomial_ratio_range`.

    Notes
    -----
    Error: a sound bound for every input with ``|s| <= R`` (certified range, rounded up).
    """
    lo, hi = polynomial_ratio_range(coeffs, radius)
    if lo <= 0.0:
        return math.inf
    return upper((hi - lo) / (hi + lo), 3)


def minimax_degree_needed(radius: float, tol: float, max_degree: int = 40) -> int:
    """Least P whose minimax polynomial gives |y_p - y| <= tol max_j |v_j - y_i| for |s| <= R.

    ``radius`` is at most ``MAX_RADIUS`` (700), ``max_degree`` at most ``MAX_DEGREE`` (170).

    Parameters
    ----------
    radius : float
        R, finite, in ``[0, MAX_RADIUS]``.
    tol : float
        Allowed relative output error, in ``(0, 1)``.
    max_degree : int, optional
        The largest degree tried, in ``[0, MAX_DEGREE]`` (default 40).

    Returns
    -------
    int
        The least such P.

    Raises
    ------
    TypeError
        If an argument is not a number (``max_degree``: an integer).
    ValueError
        If an argument is out of range, or no degree up to ``max_degree`` suffices.

    Notes
    -----
    Error: sound; chosen with :func:`polynomial_output_bound`, a certified bound.
    """
    radius = _check_minimax_radius(radius)
    tol = _check_tol(tol)
    max_degree = check_int("max_degree", max_degree, 0, MAX_DEGREE)
    for p in range(max_degree + 1):
        if polynomial_output_bound(minimax_exp_coeffs(radius, p), radius) <= tol:
            return p
    raise ValueError(f"max_degree: no degree <= {max_degree} reaches tol={tol} at R={radius}")


@torch.no_grad()
def polynomial_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    rows: object = None,
) -> torch.Tensor:
    """A posteriori per-element bound on |polynomial_attention - softmax_attention|.

    Both outputs evaluated in float64 with certified radii (Horner with an elementwise
    radius for the polynomial weights), their difference plus the radii
    (:mod:`.approximation`). ``inf`` where the polynomial normalizer is not certified
    positive.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, finite; taken as exact.
    coeffs : torch.Tensor or sequence of float
        c_0..c_P of the weight polynomial: 1-D, finite, not all zero.
    causal, scale
        As in the attention methods (scale defaults to 1/sqrt(d_k)).
    rows : int or sequence of int, optional
        As in :func:`.taylor.taylor_error_bound`.

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]`` (the selected rows when ``rows`` is given).

    Raises
    ------
    TypeError, ValueError
        Naming the argument: bad ``coeffs``, shapes, dtypes, non-finite inputs or ``rows``.

    Notes
    -----
    Error: sound: ``|ŷ_p - ŷ| + eps_p + eps`` with certified radii eps (:mod:`.approximation`).
    """
    from attnprec.analysis.bounds.approximation import output_difference

    c = _check_coeffs(coeffs)  # (the method's own check: 1-D, finite, not all zero)
    return output_difference(
        q, k, v, causal=causal, scale=scale, rows=rows, coeffs=list(c), coeff_rel=0.0
    )
