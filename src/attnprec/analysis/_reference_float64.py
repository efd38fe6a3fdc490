"""Certified float64 references for large problems: softmax, log, taylor/polynomial, and
linear over given features.

The output is computed in float64 and its radius is a rigorous bound on the distance to the
exact result, derived in docs/reference.md. Assumptions (the only ones):

1. ``torch.matmul`` in float64 is a conventional product: each entry is a sum of products
   in some order (any order, with or without FMA). Then ``|fl(a.b) - a.b| <= gamma_n |a|.|b|``
   (Higham 2002, eq. (3.5)), gamma_n = n u / (1 - n u), u = 2^-53.
   With underflow each product may add ``2^-1075`` absolutely (``TINY_DOT`` per term).
2. torch's float64 ``exp`` is accurate to ``EXP_ULPS`` ulps in the normal range, i.e.
   ``|fl(exp t) - exp t| <= 2 * EXP_ULPS * u * exp(t)``, and to an absolute ``2^-1021``
   where the result is below the normal range (subnormal or flushed to zero). Vendor
   accuracy (SLEEF ``u10``, glibc) is 1 ulp; we assume 2, a factor 2 of margin
   (tests/analysis/test_reference.py measures torch's exp against mpmath).
3. Elementary operations (+ - * / sqrt) are correctly rounded (IEEE 754).

The bound is evaluated in float64 and then inflated by ``1 + 64u``, which covers the
roundings of its own evaluation (fewer than 30 operations, each a factor <= 1 + 2u, on
nonnegative quantities).
"""

from __future__ import annotations

import math

import torch

U = 2.0**-53
#: Assumed accuracy of torch's float64 exp, in ulps (1 ulp <= 2u relative).
EXP_ULPS = 2
#: Absolute error allowed for a computed exp below the normal range.
EXP_TINY = 2.0**-1021
#: Rows per block: keeps a few [rows, n_k] float64 temporaries within a few hundred MB.
BLOCK_ELEMS = 2**24
#: Keys per block of the products (see _normalize).
KEY_BLOCK = 256
#: Absolute error a product below the normal range may add (half the smallest subnormal).
TINY_DOT = 2.0**-1075
UP = 1 + 64 * U  # inflation covering the roundings of a bound's own evaluation
UD = U * (1 + 2 * U)  # u / (1 - u), rounded up
E_REL = 2 * EXP_ULPS * U  # relative accuracy of exp


def _gamma(n: int) -> float:
    nu = n * U
    return math.inf if nu >= 0.5 else nu / (1 - nu) * (1 + 4 * U)


def _pairwise_sum_(p: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in place by halving: each term passes ceil(log2 len) additions."""
    n = p.shape[0]
    while n > 1:
        h = n // 2
        p[:h] += p[n - h : n]
        n -= h
    return p[0]


def _exp_shifted(x: torch.Tensor, dx: torch.Tensor, m: torch.Tensor, lo: torch.Tensor) -> tuple:
    """exp(x - m) in place, for x with |x - exact| <= dx (a per-row bound), m a float shift.

    Returns (w, eps, tiny): |w - exp(exact - m)| <= eps w + tiny, per row. The subtraction
    adds u/(1-u) |x - m| <= u/(1-u) (m - lo) (lo = min of x), the exp its assumed accuracy.
    """
    delta = (dx + UD * (m - lo) * (1 + 2 * U)) * UP
    w = x.sub_(m).exp_()
    # eps = (e_rel + expm1(delta)) / (1 - e_rel); tiny = EXP_TINY (1 + eps) + EXP_TINY
    eps = (E_REL + torch.expm1(delta)) / (1 - E_REL) * UP
    return w, eps, EXP_TINY * (2 + eps)


def weighted_average_float64(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    coeffs: tuple[float, ...] = (),
    coeff_rel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in float64 with a certified radius: inputs ``[B, n, d]``.

    ``method``: ``"softmax"``, ``"log"``, ``"polynomial"`` (weights
    ``sum_p c_p (scale q.k)^p``, ``coeffs`` the float64 ``c_p`` within relative
    ``coeff_rel`` of the exact ones, e.g. ``1/p!`` rounded) or ``"linear"`` (q, k are the
    exact features, ``scale`` unused). Row blocks of the weights are computed with a bound
    on |w - w'| against the exact weights w' (for softmax and log up to a row factor that
    cancels): per row ``eps w + tiny`` for the nonnegative softmax and log weights,
    elementwise ``e`` for the signed polynomial and linear ones; then normalized by
    :func:`_normalize`. Keys are padded to a multiple of ``KEY_BLOCK`` with weight 0.
    """
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    nkb = -(-n_k // KEY_BLOCK)
    pad = nkb * KEY_BLOCK - n_k
    g_d = _gamma(max(d, 1))
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    vv = torch.cat([v, v.abs(), torch.ones_like(v[..., :1])], dim=-1)
    vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
    vv = vv.reshape(*vv.shape[:-2], nkb, KEY_BLOCK, vv.shape[-1])
    vsum = v.abs().sum(dim=-2, keepdim=True) * (1 + _gamma(max(n_k, 1)))  # >= sum_j |v_jc|
    if method in ("softmax", "polynomial"):
        # Cauchy-Schwarz: |q|.|k| <= ||q|| ||k||; the norms rounded up ((d + 2) roundings).
        nrm_up = 1 + (d + 3) * 2 * U
        qn = torch.linalg.vector_norm(q, dim=-1, keepdim=True) * nrm_up
        kmax = (torch.linalg.vector_norm(k, dim=-1).amax(dim=-1) * nrm_up)[..., None, None]
    elif method == "linear":
        nonneg = bool((q >= 0).all()) and bool((k >= 0).all())
    elif method == "log":  # w_ij = sum_c exp(scale q_ic) exp(scale k_jc), shifted by maxima
        eq, eps_q, tiny_q = _exp_features(q, scale, keys=False)
        ek, eps_k, tiny_k = _exp_features(k, scale, keys=True)
        ek = torch.nn.functional.pad(ek, (0, 0, 0, pad))  # padded keys: features exactly 0
        # Features a, b (computed) vs A, B: |ab - AB| <= ((1+eps_q)(1+eps_k) - 1) ab
        # + 5 (tiny_q + tiny_k) (a, b <= 1 + 4u, eps < 1); summed over the d channels.
        eps_f = ((1 + eps_q) * (1 + eps_k) - 1) * UP
        tiny_f = d * 6 * (tiny_q + tiny_k)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    rad = torch.empty_like(out)
    block = max(1, BLOCK_ELEMS // (nkb * KEY_BLOCK))
    cols = torch.arange(nkb * KEY_BLOCK)
    eps: torch.Tensor | float | None
    tiny: torch.Tensor | float | None
    for i0 in range(0, n_q, block):
        i1 = min(n_q, i0 + block)
        hidden = cols[None, :] >= n_k
        if causal:
            hidden = hidden | (cols[None, :] > torch.arange(i0, i1)[:, None])
        e = None
        if method in ("softmax", "polynomial"):
            x = q[..., i0:i1, :] @ kp.transpose(-1, -2)
            x.mul_(scale)
            # |x_ij - s_ij| <= |scale| gamma_d ||q_i|| ||k_j|| + u/(1-u) |x_ij|
            lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
            dx = abs(scale) * g_d * qn[..., i0:i1, :] * kmax + UD * torch.maximum(-lo, hi)
        if method == "polynomial":
            w, e = _polynomial_weights(x, dx * UP, coeffs, coeff_rel)
        elif method == "linear":
            w = q[..., i0:i1, :] @ kp.transpose(-1, -2)
            # |fl(a.b) - a.b| <= gamma_d |a|.|b| + d TINY_DOT, and |a|.|b| is at most its
            # computed value / (1 - gamma_d) + d TINY_DOT (nonnegative terms); for
            # nonnegative features that value is w itself: a per-row eps w + tiny.
            if nonneg:
                eps, tiny = g_d / (1 - g_d) * UP, 2 * d * TINY_DOT * UP
            else:
                mag = q[..., i0:i1, :].abs() @ kp.abs().transpose(-1, -2)
                e = (g_d * mag / (1 - g_d) + 2 * d * TINY_DOT) * UP
        if method == "linear" and nonneg:
            if causal:
                w.masked_fill_(hidden, 0.0)
        elif e is not None:  # polynomial, linear
            if causal or pad:
                w.masked_fill_(hidden, 0.0)
                e.masked_fill_(hidden, 0.0)
            eps = tiny = None
        elif method == "softmax":
            if pad or causal:
                x.masked_fill_(hidden, -math.inf)
                hi = x.amax(dim=-1, keepdim=True)
            # the weights are taken relative to exp(m_i), m_i = hi a float: exactly
            w, eps, tiny = _exp_shifted(x, dx, hi, lo)
        else:
            w = eq[..., i0:i1, :] @ ek.transpose(-1, -2)  # nonnegative terms: gamma_d relative
            if causal:
                w.masked_fill_(hidden, 0.0)
            # |w - w'| <= (gamma_d + eps_f) w / (1 - gamma_d) + tiny_f
            eps = (g_d + eps_f[..., i0:i1, :]) / (1 - g_d) * UP
            tiny = tiny_f[..., i0:i1, :]
        y, r = _normalize(w, vv, vsum, n_k, eps=eps, tiny=tiny, e=e)
        out[..., i0:i1, :] = y
        rad[..., i0:i1, :] = r
    return out, rad


def _exp_features(x: torch.Tensor, scale: float, keys: bool) -> tuple:
    """exp(scale x - a), a the row max (queries) or the max over all keys, with its bound
    |f - exact| <= eps f + tiny: eps, tiny per row [..., n, 1] (queries) or [..., 1, 1]."""
    t = x * scale  # |t - scale x| <= u/(1-u) |t|
    dims = (-2, -1) if keys else (-1,)
    lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    return _exp_shifted(t, UD * torch.maximum(-lo, hi), hi, lo)


def _polynomial_weights(
    x: torch.Tensor, dx: torch.Tensor, coeffs: tuple[float, ...], coeff_rel: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = sum_p c_p x^p`` by Horner and ``e >= |w - sum_p c'_p s^p|`` elementwise.

    ``|x - s| <= dx`` (per row), ``|c_p - c'_p| <= coeff_rel |c_p|``. With
    ``S(t) = sum |c_p| t^p``, ``S'`` its derivative and ``t = |x| + dx``: Horner adds at most
    ``gamma_{2P} S(|x|)`` (Higham 2002, eq. (5.3)), the argument error at most
    ``dx S'(t)`` (mean value theorem), the coefficients ``coeff_rel S(t)``, and underflow
    ``P 2^-1074 max(1, t)^P`` (each product's ``2^-1075`` carried through the later powers).
    S and S' (nonnegative terms, 2P operations each) are evaluated in float64 and inflated.
    """
    top = len(coeffs) - 1
    w = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        w.mul_(x).add_(c)
    t = x.abs().add_(dx)
    s = torch.full_like(t, abs(coeffs[-1]))
    ds = torch.full_like(t, top * abs(coeffs[-1]))
    for p in range(top - 1, -1, -1):
        s.mul_(t).add_(abs(coeffs[p]))
        if p >= 1:
            ds.mul_(t).add_(p * abs(coeffs[p]))
    infl = 1 + _gamma(2 * top + 2)
    e = s.mul_((_gamma(2 * top) + coeff_rel) * infl) + ds.mul_(dx * infl)
    e += top * 2.0**-1074 * t.clamp_(min=1.0).pow_(top)
    return w, e.mul_(UP)


def _normalize(
    w: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
    eps: torch.Tensor | float | None = None,
    tiny: torch.Tensor | float | None = None,
    e: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = W V / W 1 for W [..., rows, nkb * KEY_BLOCK] and a bound on its distance to the
    exact weights W': ``eps w + tiny`` per row (W >= 0) or ``e`` elementwise (any sign).

    Keys are summed in blocks of ``KEY_BLOCK`` by the matmul (any order inside a block) and
    the block sums pairwise by us, so each product passes at most
    KEY_BLOCK - 1 + ceil(log2(n_k / KEY_BLOCK)) additions: the gamma of the sums is that
    depth plus one, not n_k. With N, D the computed sums, A = sum |w| |v|,
    |N - N'| <= g A + sum e |v| =: e_N, |D - D'| <= g sum |w| + sum e =: e_D, and
    |N/D - N'/D'| <= (e_N + |y'| e_D) / |D| with |y'| <= (A + sum e |v|) / (|D| - e_D).
    """
    nkb = vv.shape[-3]
    d_v = (vv.shape[-1] - 1) // 2
    g_n = _gamma(min(n_k, KEY_BLOCK) + math.ceil(math.log2(nkb)) + 1)

    def sums(m: torch.Tensor) -> torch.Tensor:
        mb = m.reshape(*m.shape[:-1], nkb, KEY_BLOCK).transpose(-2, -3)
        return _pairwise_sum_((mb @ vv).movedim(-3, 0))

    nd = sums(w)
    num, den = nd[..., :d_v], nd[..., -1:]
    up = 1 / (1 - g_n) * UP  # a computed sum of nonnegative terms, times this, bounds it
    if e is None:  # W >= 0: sum |w| |v| and sum |w| are the columns of the same product
        assert eps is not None and tiny is not None
        a_up, dabs_up = nd[..., d_v:-1] * up, den * up
        ev, e1 = eps * a_up + tiny * vsum, (eps * dabs_up + tiny * n_k) * UP
    else:
        mags = nd if bool((w >= 0).all()) else sums(w.abs())  # |W| = W: same product
        errs = sums(e)
        a_up, dabs_up = mags[..., d_v:-1] * up, mags[..., -1:] * up
        ev, e1 = errs[..., d_v:-1] * up, errs[..., -1:] * up
    e_num = g_n * a_up + ev
    e_den = (g_n * dabs_up + e1) * UP
    y = num / den
    aden = den.abs()
    ybar = (a_up + ev) / (aden - e_den) * UP
    r = ((e_num + ybar * e_den) / aden + UD * y.abs()) * UP
    ok = (aden > e_den) & torch.isfinite(r)
    return y, torch.where(ok, r, torch.full_like(r, math.inf))
