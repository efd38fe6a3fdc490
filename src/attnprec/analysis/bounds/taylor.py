"""Taylor truncation bounds for ``taylor_attention`` (weights T_P(s) = sum_{p<=P} s^p / p!).

Everything rests on the ratio r(x) = T_P(x) e^{-x} of the Taylor weight to the exact one:

- r'(x) = -x^P / P! e^{-x}, so r decreases for even P (and r > 0 since T_P > 0), and has its
  maximum r(0) = 1 for odd P. Hence sup_{|x|<=R} |r(x) - 1| = max(|r(-R) - 1|, |r(R) - 1|)
  exactly (:func:`taylor_weight_bound`).
- For any weights w_j > 0 with exact output y = sum w_j v_j / sum w_j, and any c,
  y_T - y = sum_j w_j (r_j - c)(v_j - y) / sum_j w_j r_j, a convex combination of
  (1 - c / r_j)(v_j - y) when every r_j > 0. With r in [a, b] the choice c = 2ab / (a + b)
  gives |y_T - y| <= (b - a) / (b + a) max_j |v_j - y| (:func:`taylor_degree_needed`).
- A posteriori (:func:`taylor_error_bound`), the identity with c = 1 is evaluated in float64
  and only its evaluation error is bounded, so the bound is |y_T - y| itself up to a relative
  error of order n u64 (see docs/bounds/taylor.md).

The a-posteriori machinery is shared with range-adapted polynomials (:mod:`.minimax`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

from attnprec._validate import check_finite, check_qkv, resolve_scale
from attnprec.analysis.bounds.rounding import U64, gamma, softmax_bound, upper

__all__ = [
    "taylor_ratio_range",
    "taylor_weight_bound",
    "taylor_degree_needed",
    "taylor_output_bound",
    "taylor_error_bound",
    "ratio_error_bound",
]


def _check_degree(degree: int) -> int:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree: expected a non-negative integer, got {degree!r}")
    return degree


def _check_radius(radius: float) -> float:
    r = float(radius)
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"radius: expected a finite number >= 0, got {radius!r}")
    return r


@contextmanager
def _arb_prec(prec: int) -> Iterator[None]:
    """Run with python-flint's working precision at ``prec`` bits, restoring it after."""
    from flint import ctx

    saved = ctx.prec
    ctx.prec = prec
    try:
        yield
    finally:
        ctx.prec = saved


def _arb_ratio(x: float, degree: int):  # type: ignore[no-untyped-def]
    """Enclosure of r(x) = T_P(x) e^{-x} in arb ball arithmetic (call under _arb_prec)."""
    from flint import arb

    xa = arb(x)
    t = arb(1)
    term = arb(1)
    for p in range(1, degree + 1):
        term = term * xa / p
        t = t + term
    return t * (-xa).exp()


def _up(a) -> float:  # type: ignore[no-untyped-def]
    """A float >= every point of the arb ball ``a``."""
    return math.nextafter(float(a.upper()), math.inf)


def _down(a) -> float:  # type: ignore[no-untyped-def]
    return math.nextafter(float(a.lower()), -math.inf)


@lru_cache(maxsize=4096)
def taylor_ratio_range(radius: float, degree: int) -> tuple[float, float]:
    """Certified [lo, hi] containing r(x) = T_P(x) / e^x for every |x| <= radius.

    Exact extremes up to outward rounding: r is decreasing for even P, and for odd P has its
    maximum 1 at x = 0 (r'(x) = -x^P e^{-x} / P!). ``lo`` may be <= 0 (odd P, large radius),
    where the Taylor normalizer can vanish.
    """
    radius = _check_radius(radius)
    degree = _check_degree(degree)
    with _arb_prec(128):
        r_neg, r_pos = _arb_ratio(-radius, degree), _arb_ratio(radius, degree)
    if degree % 2 == 0:
        return _down(r_pos), _up(r_neg)
    return min(_down(r_neg), _down(r_pos)), 1.0


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
        R^{P+1} e^R / (P+1)!. Certified with arb ball arithmetic.
    """
    lo, hi = taylor_ratio_range(radius, degree)
    return max(hi - 1.0, 1.0 - lo) if hi > 1.0 else 1.0 - lo


def taylor_output_bound(radius: float, degree: int) -> float:
    """Worst relative output error of Taylor attention on inputs with |scale q.k| <= R.

    |y_T - y| <= B * max_j |v_j - y| with B = (b - a) / (b + a) for r in [a, b]
    (:func:`taylor_ratio_range`); ``inf`` when a <= 0 (the normalizer can vanish).
    """
    lo, hi = taylor_ratio_range(radius, degree)
    if lo <= 0.0:
        return math.inf
    return upper((hi - lo) / (hi + lo), 3)


def taylor_degree_needed(radius: float, tol: float, max_degree: int = 256) -> int:
    """Least degree P with |taylor_attention - softmax_attention| <= tol max_j |v_j - y_i|.

    Holds for every input with |scale q_i . k_j| <= radius, any n, d, values and mask
    (module docstring: B(R, P) = (b - a) / (b + a) <= tol with r = T_P / exp in [a, b]).

    Raises
    ------
    ValueError
        If ``tol`` is not in (0, 1), or no degree up to ``max_degree`` suffices.
    """
    radius = _check_radius(radius)
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
    for p in range(max_degree + 1):
        if taylor_output_bound(radius, p) <= tol:
            return p
    raise ValueError(f"max_degree: no degree <= {max_degree} reaches tol={tol} at R={radius}")


# ---------------------------------------------------------------------------------------------
# A posteriori: evaluate y_T - y in float64 and bound the evaluation error only.


def _horner_ratio(
    x: torch.Tensor, coeffs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho, err_rho, r, err_r): r = p(x) e^{-x} and rho = r - 1 evaluated directly, with
    rigorous bounds on their float64 errors.

    Horner with float64 coefficients c_p (exact as given): |p̂ - p| <= gamma_{2P} sum|c_p||x|^p
    (Higham 2002, eq. (5.3)); exp is within 1 ulp (2 u relative), one product and one
    subtraction round. So |r̂ - r| <= gamma_{2P+3} H e^{-x} and |rhô - rho| <= that + u |rhô|.
    """
    deg = coeffs.numel() - 1
    ax = x.abs()
    val = torch.full_like(x, float(coeffs[-1]))
    hab = torch.full_like(x, abs(float(coeffs[-1])))
    for c in coeffs.flip(0)[1:].tolist():
        val = val * x + c
        hab = hab * ax + abs(c)
    e = torch.exp(-x)
    r = val * e
    rho = r - 1.0
    err = upper(gamma(2 * deg + 3, U64) * hab * e / (1.0 - 2 * U64), 2 * deg + 6)
    return rho, upper(err + U64 * rho.abs() / (1.0 - U64), 3), r, err


def _tail_ratio(x: torch.Tensor, degree: int, terms: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """rho = T_P(x) e^{-x} - 1 = -e^{-x} sum_{p>P} x^p / p!, from the tail series.

    Accurate relative to |rho| where the direct form cancels (|x| small against P). Term
    t_{P+k} = prod_{i<=P+k} (x / i) carries gamma_{2(P+k)}; the sum of K terms gamma_{K-1};
    the remainder past K terms is <= |t_{P+K+1}| / (1 - |x| / (P+K+2)) when |x| < P+K+2
    (inf elsewhere, so the direct form is used there).
    """
    t = torch.ones_like(x)
    for i in range(1, degree + 2):
        t = t * (x / i)
    total = torch.zeros_like(x)
    absum = torch.zeros_like(x)
    for k in range(terms):
        total = total + t
        absum = absum + t.abs()
        t = t * (x / (degree + 2 + k))
    m = degree + terms + 1  # t now holds x^m / m!
    q = x.abs() / (m + 1)
    rem = torch.where(q < 1.0, t.abs() / (1.0 - q).clamp_min(1e-300), torch.inf)
    e = torch.exp(-x)
    rho = -(total * e)
    tail_err = gamma(4 * m + terms, U64) * absum + rem * (1.0 + gamma(2 * m, U64))
    err = (tail_err * e + gamma(3, U64) * (total.abs() * e)) / (1.0 - 2 * U64)
    return rho, upper(err, 2 * m + terms + 8)


def _taylor_rho(
    x: torch.Tensor, degree: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rho, err_rho, r, err_r) for Taylor: per element the tail or Horner form, whichever
    has the smaller certified error (separately for rho and for r = 1 + rho)."""
    coeffs = torch.tensor([1.0 / math.factorial(p) for p in range(degree + 1)], dtype=torch.float64)
    # 1/p! is not exact in float64: its rounding (<= u |c_p|) is one more Horner error term.
    rho_d, err_d, r_d, err_rd = _horner_ratio(x, coeffs)
    hab = sum(x.abs() ** p / math.factorial(p) for p in range(degree + 1))
    extra = U64 * hab * torch.exp(-x) * (1 + 4 * U64)
    err_d = upper(err_d + extra, degree + 8)
    err_rd = upper(err_rd + extra, degree + 8)
    rho_t, err_t = _tail_ratio(x, degree)
    r_t = 1.0 + rho_t
    err_rt = upper(err_t + U64 * r_t.abs() / (1.0 - U64), 3)
    use_t, use_rt = err_t < err_d, err_rt < err_rd
    return (
        torch.where(use_t, rho_t, rho_d),
        torch.where(use_t, err_t, err_d),
        torch.where(use_rt, r_t, r_d),
        torch.where(use_rt, err_rt, err_rd),
    )


def _ratio_derivative_bound(
    x: torch.Tensor, sigma: torch.Tensor, coeffs: torch.Tensor | None, degree: int
) -> torch.Tensor:
    """sigma * max_{|t-x|<=sigma} |d/dt (p(t) e^{-t})|, so |rho(s) - rho(x)| <= it for |s-x|<=sigma.

    Taylor: |r'(t)| = |t|^P e^{-t} / P!. General p: |p'(t) - p(t)| e^{-t} <= sum_p |c_p - (p+1)
    c_{p+1}| |t|^p e^{-t}.
    """
    tmax = x.abs() + sigma
    emax = torch.exp(-x + sigma)
    if coeffs is None:
        dmax = tmax**degree / math.factorial(degree) * emax
    else:
        c = coeffs.tolist() + [0.0]
        dmax = sum(abs(c[p] - (p + 1) * c[p + 1]) * tmax**p for p in range(len(c) - 1)) * emax
    return upper(sigma * dmax * (1 + 4 * U64), degree + 6)


def ratio_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rho_fn,  # type: ignore[no-untyped-def]
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-element bound on |y_w - y| where y_w uses weights e^{s} r(s) and y is softmax.

    ``rho_fn(x, sigma) -> (rho, err, r, err_r)``: r(x) - 1 and r(x) evaluated in float64 at
    the float64 logits x, with ``err`` (``err_r``) bounding their error for every exact
    logit |s - x| <= sigma. With p_j the softmax weights,
    D = sum_j p_j rho_j (v_j - y) / sum_j p_j r_j exactly;
    the returned bound is (|N̂| + err_N) / (Den̂ - err_Den) with every float64 error (logits,
    softmax weights, y, rho, products, sums) bounded first-order-free; ``inf`` where the
    denominator's lower bound is <= 0 (the method's normalizer can vanish).
    """
    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    sc = resolve_scale(scale, d_k)
    q, k, v = q.double(), k.double(), v.double()
    raw = q @ k.transpose(-1, -2)
    x = raw * sc
    # |x̂ - s| <= |scale| gamma_{d+1} |q|.|k| + u |x̂| (dot in any order, then the scaling).
    absdot = q.abs() @ k.abs().transpose(-1, -2)
    sigma = upper(abs(sc) * gamma(d_k + 1, U64) * absdot + U64 * x.abs() / (1 - U64), d_k + 4)
    mask = None
    if causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        x = x.masked_fill(~mask, -math.inf)
    # Softmax weights in float64 (the algorithm softmax_bound models), then the logit errors.
    m = x.amax(-1, keepdim=True)
    e = torch.exp(x - m)
    p = e / e.sum(-1, keepdim=True)
    pb = softmax_bound(x, U64, min_normal=2.0**-1022)
    sig = sigma if mask is None else sigma.masked_fill(~mask, 0.0)
    smax = sig.amax(-1, keepdim=True)
    grow = torch.expm1(sig + smax)
    pb = upper(pb + (p + pb) * grow, 6)
    # y = sum p_j v_j: |ŷ - y| <= sum pb_j |v_j| + gamma_{n+1} sum p̂_j |v_j|.
    y = p @ v
    eps_y = upper(pb @ v.abs() + gamma(n_k + 1, U64) * (p @ v.abs()), 2 * n_k + 4)
    xs = x if mask is None else x.masked_fill(~mask, 0.0)
    rho, erho, r, er = rho_fn(xs, sig)
    if mask is not None:
        rho, erho = rho.masked_fill(~mask, 0.0), erho.masked_fill(~mask, 0.0)
        r, er = r.masked_fill(~mask, 0.0), er.masked_fill(~mask, 0.0)
    # Products A B C with A = p, B = rho, C = v - y, each known to within a, b, c.
    A, a = p.unsqueeze(-1), pb.unsqueeze(-1)
    B, b = rho.unsqueeze(-1), erho.unsqueeze(-1)
    C = v.unsqueeze(-3) - y.unsqueeze(-2)
    c = upper(eps_y.unsqueeze(-2) + U64 * C.abs(), 3)
    terms = A * B * C
    aA, aB, aC = A.abs(), B.abs(), C.abs()
    prop = a * (aB + b) * (aC + c) + aA * b * (aC + c) + aA * aB * c
    num = terms.sum(-2)
    err_num = (prop + gamma(2, U64) * terms.abs()).sum(-2) + gamma(n_k, U64) * terms.abs().sum(-2)
    err_num = upper(err_num, 2 * n_k + 8)
    # The normalizer sum_j p_j r_j, from r itself: 1 + sum p rho would cancel when it is tiny.
    pr = p * r
    den = pr.sum(-1, keepdim=True)
    prop_d = (pb * (r.abs() + er) + p.abs() * er).sum(-1, keepdim=True)
    err_den = prop_d + gamma(n_k + 1, U64) * pr.abs().sum(-1, keepdim=True)
    err_den = upper(err_den, 2 * n_k + 8)
    lo = den - err_den
    bound = upper((num.abs() + err_num) / lo.clamp_min(1e-300), 4)
    bound = torch.where(lo > 0, bound, torch.full_like(bound, math.inf))
    return torch.minimum(bound, _direct_difference(p, pb, r, er, v, y, eps_y, mask))


def _direct_difference(p, pb, r, er, v, y, eps_y, mask):  # type: ignore[no-untyped-def]
    """Second form, robust when sum p_j r_j is tiny (the identity's numerator then cancels):
    |y_w - y| <= |ŷ_w - ŷ| + err(ŷ_w) + eps_y with ŷ_w = sum a v / sum a, a_j = p_j r_j > 0.

    a_j = â_j (1 + delta_j), |delta_j| <= e_j = (pb_j/p_j + er_j/r_j + pb_j er_j/(p_j r_j) + u)
    / (1 - that), and the weight-perturbation argument of docs/bounds/attention.md gives
    |y_w(a) - y_w(â)| <= sum â_j e_j |v_j - y_w(â)| / sum â_j (1 - e_j); inf unless every
    r_j - er_j > 0 (positive weights).
    """
    n_k = p.shape[-1]
    live = p > 0
    rp = (r - er) > 0
    ok_row = (rp | ~live).all(-1, keepdim=True)
    a = torch.where(live, p * r, 0.0)
    rel = torch.where(live, pb / p.clamp_min(1e-300), 0.0)
    rr = torch.where(live & rp, er / r.abs().clamp_min(1e-300), 0.0)
    e0 = rel + rr + rel * rr + U64
    e = torch.where(e0 < 1, e0 / (1 - e0).clamp_min(1e-300), math.inf)
    e = torch.where(live, e, 0.0)
    sa = a.sum(-1, keepdim=True)
    yw = (a @ v) / sa
    # float64 evaluation of ŷ_w: the matmul, the sum and one division.
    err_eval = gamma(n_k + 3, U64) * (a @ v.abs()) / sa
    dev = (v.unsqueeze(-3) - yw.unsqueeze(-2)).abs() + err_eval.unsqueeze(-2)
    num = ((a * e).unsqueeze(-1) * dev).sum(-2)
    den = (a * (1 - e).clamp_min(0.0)).sum(-1, keepdim=True)
    pert = num / den.clamp_min(1e-300)
    good = ok_row & (den > 0) & torch.isfinite(e).all(-1, keepdim=True)
    diff = (yw - y).abs()
    out = upper(diff * (1 + U64) + err_eval + pert + eps_y, 3 * n_k + 12)
    return torch.where(good, out, torch.full_like(out, math.inf))


def taylor_error_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    degree: int,
    *,
    causal: bool = False,
    scale: float | None = None,
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

    Returns
    -------
    torch.Tensor
        float64 ``[..., n_q, d_v]``. With p_j the softmax weights and
        rho_j = T_P(s_j) e^{-s_j} - 1 (computed from the tail series or Horner, whichever has
        the smaller certified error), y_T - y = sum p_j rho_j (v_j - y) / (1 + sum p_j rho_j)
        exactly; the bound is this expression evaluated in float64 plus a rigorous bound on
        every evaluation error (:func:`ratio_error_bound`). It exceeds |y_T - y| by a relative
        O(n u64 (sum |p rho (v - y)|) / |y_T - y|). ``inf`` where the Taylor normalizer may
        vanish (odd P with large negative logits).
    """
    degree = _check_degree(degree)

    def rho_fn(
        x: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rho, err, r, err_r = _taylor_rho(x, degree)
        dr = _ratio_derivative_bound(x, sigma, None, degree)
        return rho, err + dr, r, err_r + dr

    return ratio_error_bound(q, k, v, rho_fn, causal=causal, scale=scale)
