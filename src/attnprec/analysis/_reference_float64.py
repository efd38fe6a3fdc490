"""Certified float64 references for softmax and log attention (large problems).

The output is computed in float64 and its radius is a rigorous bound on the distance to the
exact result, derived in docs/reference.md. Assumptions (the only ones):

1. ``torch.matmul`` in float64 is a conventional product: each entry is a sum of products
   in some order (any order, with or without FMA). Then ``|fl(a.b) - a.b| <= gamma_n |a|.|b|``
   (Higham 2002, eq. (3.5)), gamma_n = n u / (1 - n u), u = 2^-53.
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax or log attention in float64 with a certified radius: inputs ``[B, n, d]``.

    Row blocks of the weights are computed with a per-row bound |w - w'| <= eps w + tiny
    against exact weights w' (up to a row factor that cancels), then normalized by
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
    if method == "softmax":
        # Cauchy-Schwarz: |q|.|k| <= ||q|| ||k||; the norms rounded up ((d + 2) roundings).
        nrm_up = 1 + (d + 3) * 2 * U
        qn = torch.linalg.vector_norm(q, dim=-1, keepdim=True) * nrm_up
        kmax = (torch.linalg.vector_norm(k, dim=-1).amax(dim=-1) * nrm_up)[..., None, None]
    else:  # log: w_ij = sum_c exp(scale q_ic) exp(scale k_jc), factors shifted by maxima
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
    for i0 in range(0, n_q, block):
        i1 = min(n_q, i0 + block)
        hidden = cols[None, :] >= n_k
        if causal:
            hidden = hidden | (cols[None, :] > torch.arange(i0, i1)[:, None])
        if method == "softmax":
            x = q[..., i0:i1, :] @ kp.transpose(-1, -2)
            x.mul_(scale)
            # |x_ij - s_ij| <= |scale| gamma_d ||q_i|| ||k_j|| + u/(1-u) |x_ij|
            lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
            dx = abs(scale) * g_d * qn[..., i0:i1, :] * kmax + UD * torch.maximum(-lo, hi)
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
        y, r = _normalize(w, eps, tiny, vv, vsum, n_k)
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


def _normalize(
    w: torch.Tensor,
    eps: torch.Tensor,
    tiny: torch.Tensor,
    vv: torch.Tensor,
    vsum: torch.Tensor,
    n_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = W V / W 1 for nonnegative W [..., rows, nkb * KEY_BLOCK] known to eps w + tiny.

    Keys are summed in blocks of ``KEY_BLOCK`` by the matmul (any order inside a block) and
    the block sums pairwise by us, so each product passes at most
    KEY_BLOCK - 1 + ceil(log2(n_k / KEY_BLOCK)) additions: the gamma of the sums is that
    depth plus one, not n_k.
    """
    nkb = vv.shape[-3]
    d_v = (vv.shape[-1] - 1) // 2
    g_n = _gamma(min(n_k, KEY_BLOCK) + math.ceil(math.log2(nkb)) + 1)
    wb = w.reshape(*w.shape[:-1], nkb, KEY_BLOCK).transpose(-2, -3)
    nd = _pairwise_sum_((wb @ vv).movedim(-3, 0))
    num, a, den = nd[..., :d_v], nd[..., d_v:-1], nd[..., -1:]
    a_up = a / (1 - g_n) * UP  # >= sum_j w_ij |v_jc|
    e_num = (g_n + eps) * a_up + tiny * vsum
    e_den = ((g_n + eps) * den / (1 - g_n) + tiny * n_k) * UP
    y = num / den
    # |y_exact| <= sum_j |w'_ij| |v_jc| / D' (w' >= 0)
    ybar = (a_up * (1 + eps) + tiny * vsum) / (den - e_den) * UP
    r = ((e_num + ybar * e_den) / den + UD * y.abs()) * UP
    ok = (den > e_den) & torch.isfinite(r)
    return y, torch.where(ok, r, torch.full_like(r, math.inf))
