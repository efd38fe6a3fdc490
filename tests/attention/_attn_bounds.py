"""Rounding bounds of the reference implementations, as their docstrings state them.

Each function returns a float64 tensor ``[..., n_q, d_v]`` bounding ``|y~ - y|``, where
``y~`` is the implementation's output computed in unit roundoff ``u`` and ``y`` the exact
output. They are the tolerances of the tests: derived (comments and docstrings), never
tuned. Bound ingredients are evaluated in float64 and inflated with ``upper`` (or kept
exact as Fractions), so they stay upper bounds.

Conventions: ``exp`` is within 1 ulp (relative 2u, the ``"libm"`` model of
:mod:`attnprec.analysis.bounds.rounding`); a sum of n terms in any order has relative
error ``gamma_{n-1}`` against the sum of absolute values; ``u_min`` is the smallest
subnormal of the compute format (an underflowing exp is off by at most that).

For positive weights computed as ``w~_j = w_j (1 + a_j)`` in the numerator and
``w_j (1 + b_j)`` in the denominator, ``|a_j|, |b_j| <= eps``:
``N~/D~ - y = sum_j w_j (v_j a_j - y b_j) / D~``, so
``|y~ - y| <= eps/(1 - eps) (max_j |v_j| + |y|) + u |y~|`` (the division's rounding).
For signed weights ``w_ij = sum_f t_ijf`` (polynomial features), with each ``t`` carrying
relative error ``eps`` and ``A_i = sum_jf |t_ijf|``:
``|y~ - y| <= eps A_i (max_j |v_j| + |y|) / (D_i - eps A_i) + u |y~|``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from attnprec.analysis.bounds.rounding import gamma, upper

U64 = 2.0**-53
U32 = 2.0**-24


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the compute dtype (fp16/bf16 compute in fp32)."""
    return U64 if dtype == torch.float64 else U32


def min_sub(dtype: torch.dtype) -> float:
    return 2.0**-1074 if dtype == torch.float64 else 2.0**-149


def visible_vmax(v: torch.Tensor, n_q: int, causal: bool) -> torch.Tensor:
    """``max_{j visible to i} |v_jc|`` as ``[..., n_q, d_v]``."""
    a = v.double().abs()
    if causal:
        return torch.cummax(a, dim=-2).values
    return a.amax(-2, keepdim=True).expand(*a.shape[:-2], n_q, a.shape[-1])


def positive_bound(
    eps: torch.Tensor, vmax: torch.Tensor, y_abs: torch.Tensor, u: float
) -> torch.Tensor:
    """``eps/(1-eps) (vmax + |y|) + u (|y| + that)`` (inf where eps >= 1)."""
    ok = eps < 1
    first = torch.where(ok, eps / torch.where(ok, 1 - eps, 1.0), math.inf) * (vmax + y_abs)
    return upper(first + u * (y_abs + first), 8)


def _smax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[..., n_q, 1]``: an upper bound of ``|scale| max_j sum_c |q_ic k_jc|``."""
    d = q.shape[-1]
    s = upper(abs(scale) * (q.double().abs() @ k.double().abs().transpose(-1, -2)), d + 2)
    return s.amax(-1, keepdim=True)


def exp_weights_bound(q, k, v, y_abs, terms, *, causal: bool, scale: float, u: float):
    """Softmax and the exact semiring forms: weights ``sum_r exp(log c_r + lam_r s - M)``.

    The logit ``s`` has error ``gamma_{d+1} scale sum_c |q_ic k_jc|`` (``q * scale``, then a
    length-d dot product); ``lam_r s`` rounds once, ``log c_r`` is within 2u, the addition
    rounds once and the shift by the row maximum once (``u |l - M| <= 2u max|l|``); exp
    adds 2u; the R terms are summed (``gamma_{R-1}``) and the weights pass through ``n_k``
    roundings (product with v, sum over keys). Softmax is the case ``((1, 1),)``, where the
    extra roundings are exact and the bound only larger. Underflowed exps are off by at
    most ``u_min`` each against a denominator ``>= 1`` (the largest term is exactly 1).
    """
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    sm = _smax(q, k, scale)
    g = gamma(d + 1, u)
    err = torch.zeros_like(sm)
    lmax = torch.zeros_like(sm)
    for c, lam in terms:
        lc = abs(math.log(c))
        err = torch.maximum(err, lam * g * sm + u * lam * sm + 2 * u * lc + u * (lam * sm + lc))
        lmax = torch.maximum(lmax, lam * sm + lc)
    r = torch.exp(err + 2 * u * lmax) * (1 + 2 * u) - 1
    eps = upper((1 + r) * (1 + gamma(max(len(terms) - 1, 0), u)) * (1 + gamma(n_k, u)) - 1, 8)
    vmax = visible_vmax(v, n_q, causal)
    tiny = n_k * len(terms) * min_sub(torch.float64 if u == U64 else torch.float32)
    return positive_bound(eps, vmax, y_abs, u) + upper(tiny * (vmax + y_abs), 4)


def _frac(x: float) -> Fraction:
    return Fraction(x)


def polynomial_bound(
    q, k, v, y_abs, coeffs, *, causal: bool, scale: float, u: float, exact_coeffs=None
):
    """Bound of polynomial/taylor attention (docstring of ``polynomial_attention``).

    ``D_i`` and ``A_i = sum_j sum_p |c_p| (scale |q_i|.|k_j|)^p`` are exact Fractions;
    ``exact_coeffs`` are the coefficients of the exact method (``1/p!`` for taylor) when
    they differ from the floats used (the rounding of ``c_p`` is inside ``gamma_{3P+2}``).
    """
    from attnprec.attention.taylor import feature_count

    top = len(coeffs) - 1
    d, n_k = q.shape[-1], k.shape[-2]
    f_count = feature_count(d, coeffs)
    eps = (1 + gamma(3 * top + 2, u)) * (1 + gamma(f_count + n_k + 3, u)) - 1
    ec = [Fraction(c) for c in (exact_coeffs or coeffs)]
    sc = Fraction(scale)
    qq, kk = q.double().reshape(-1, *q.shape[-2:]), k.double().reshape(-1, *k.shape[-2:])
    vmax = visible_vmax(v, q.shape[-2], causal).reshape(-1, q.shape[-2], v.shape[-1])
    ya = y_abs.reshape(vmax.shape)
    out = torch.empty_like(vmax)
    for b in range(qq.shape[0]):
        qb = [[_frac(x) for x in row] for row in qq[b % qq.shape[0]].tolist()]
        kb = [[_frac(x) for x in row] for row in kk[b % kk.shape[0]].tolist()]
        for i, qi in enumerate(qb):
            den, ab = Fraction(0), Fraction(0)
            for j, kj in enumerate(kb):
                if causal and j > i:
                    break
                s = sc * sum((a * c for a, c in zip(qi, kj, strict=True)), Fraction(0))
                sa = abs(sc) * sum((abs(a * c) for a, c in zip(qi, kj, strict=True)), Fraction(0))
                den += sum((c * s**p for p, c in enumerate(ec)), Fraction(0))
                ab += sum((abs(c) * sa**p for p, c in enumerate(ec)), Fraction(0))
            e_a = Fraction(eps) * ab
            for c in range(vmax.shape[-1]):
                if den - e_a <= 0:
                    out[b, i, c] = math.inf
                    continue
                num = e_a * (Fraction(float(vmax[b, i, c])) + Fraction(float(ya[b, i, c])))
                first = num / (den - e_a)
                val = first + Fraction(u) * (Fraction(float(ya[b, i, c])) + first)
                out[b, i, c] = math.nextafter(float(val), math.inf)
    return out.reshape(y_abs.shape)


def linear_elu1_bound(q, k, v, y_abs, *, causal: bool, u: float):
    """elu1 features: one exp (2u) or one addition (u) each, positive; K = F + n_k + 3."""
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    eps = (1 + 2 * u) ** 2 * (1 + gamma(d + n_k + 3, u)) - 1
    eps_t = torch.full((*q.shape[:-1], 1), eps, dtype=torch.float64)
    vmax = visible_vmax(v, n_q, causal)
    return positive_bound(upper(eps_t, 4), vmax, y_abs, u)


def favor_bound(
    q, k, v, y_abs, w, *, causal: bool, scale: float, u: float, chunk: int, terms=((1.0, 1.0),)
):
    """FAVOR+ (docstring of ``favor_attention``).

    Exponent ``t_f = W_f x' - |x'|^2/2 - log(m)/2``: with ``T = sum_c |W_fc x'_c| + |x'|^2/2
    + log(m)/2`` its error is at most ``gamma_{d+6} T`` (x' rounds twice, the dot product and
    the norm d times, two subtractions, log 2u). The row shifts round once (``u`` times at
    most ``2 T``); the key side also rescales by ``exp(a - m)`` (a subtraction, an exp, a
    product) and the state by one such factor per chunk. Several ``terms`` (linearized
    semirings): scale ``lam_r scale`` each, ``log c_r`` added on the key side (2u, one
    rounding), ``R m`` features.
    """
    d, n_k = q.shape[-1], k.shape[-2]
    m = w.shape[0]

    def tmax(x, key):
        out = None
        for c, lam in terms:
            xs = x.double().abs() * math.sqrt(lam * scale)
            t = xs @ w.double().abs().T + 0.5 * (xs * xs).sum(-1, keepdim=True)
            t = upper(t + 0.5 * math.log(m) + (abs(math.log(c)) if key else 0.0), d + 8)
            t = t.amax(-1)
            out = t if out is None else torch.maximum(out, t)
        return out

    tq = tmax(q, False).unsqueeze(-1)  # [..., n_q, 1]
    tk = tmax(k, True).amax(-1)[..., None, None]
    g = gamma(d + 9, u)  # d + 6, plus sqrt(lam scale) and log c_r
    chunks = -(-n_k // chunk)
    arg = g * (tq + tk) + 2 * u * tq + 4 * u * tk + chunks * 2 * u * tk
    r = torch.exp(arg) * ((1 + 2 * u) ** 3 * (1 + u)) * ((1 + 2 * u) * (1 + u)) ** chunks - 1
    eps = upper((1 + r) * (1 + gamma(len(terms) * m + n_k + 3, u)) - 1, 8)
    vmax = visible_vmax(v, q.shape[-2], causal)
    return positive_bound(eps, vmax, y_abs, u)


def gated_bound(q, k, v, log_g, *, scale: float, u: float, chunk: int):
    """Gated linear attention (docstring of ``gated_linear_attention``).

    Every decay ``exp(sum of log-gates over its span)`` is a product of at most
    ``m = ceil(n/chunk) + 2`` exps of within-chunk sums, each sum off by ``gamma_n`` of its
    absolute value: relative error ``exp(gamma_n L)(1 + 2u)^m - 1`` with ``L`` the total
    ``sum_l |log g_l|``. The products with q, k, v, the m decay products and the sums over
    channels and keys add ``gamma_{m + d + n + 4}``; the scale one rounding. ``T_t =
    sum_j sum_c |q_tc| D_tjc |k_jc| |v_j|`` is evaluated by the recurrence on absolute
    values in float64 (n exps and 2n + d + 2 roundings, inflated by ``upper``).
    """
    n, d = q.shape[-2:]
    lg = log_g.double()
    if lg.dim() < 2 or tuple(lg.shape[-2:]) != (n, d):
        lg = lg.unsqueeze(-1).expand(*lg.shape, d)
    lg = lg.expand(*torch.broadcast_shapes(lg.shape, q.shape))
    big_l = torch.where(torch.isinf(lg), 0.0, lg.abs()).sum(-2).amax(-1)[..., None, None]
    m = -(-n // chunk) + 2
    eps = torch.exp(gamma(n, u) * big_l) * (1 + 2 * u) ** m * (1 + gamma(m + d + n + 4, u)) - 1
    qa, ka, va = q.double().abs(), k.double().abs(), v.double().abs()
    s = torch.zeros(*torch.broadcast_shapes(ka.shape[:-2], va.shape[:-2]), d, v.shape[-1])
    s = s.double()
    rows = []
    for t in range(n):
        s = torch.exp(lg[..., t, :]).unsqueeze(-1) * s + ka[..., t, :, None] * va[..., t, None, :]
        rows.append((qa[..., t, None, :] @ s).squeeze(-2))
    tt = upper(abs(scale) * torch.stack(rows, dim=-2), 4 * n + d + 4)
    first = upper(eps * tt, 4)
    return upper(first + u * (tt + first), 4)


def log_bound(q, k, v, *, causal: bool, scale: float, u: float = U64, chunk: int | None = None):
    """Log attention in float64 (docstring of ``log_attention``): ``(bound, |y|)``.

    The sums, their absolute sums and the output are evaluated in 60-digit mpmath; their
    logs (rounded to float64) feed :func:`attnprec.lognum.signed_sum_error_bound`, and the
    result is inflated by ``upper`` for that float64 evaluation. Key sums: ``n`` terms of
    logs ``fl(scale k_jc)`` (error ``u |scale k_jc|``); query sums: ``d_k`` terms carrying
    the key-sum error plus ``u |scale q_ic|`` and the rounding of ``scale q_ic + log S``;
    output ``sign exp(log num - log den)``: ``(1 + 2u) exp(e_num + e_den + u |log num - log
    den|) - 1`` relative to ``|y|``.

    Causal with ``chunk`` (the chunk size, ``1`` for one token per call): each chunk's
    prefix sums start from the carried state, one more term whose log carries the error of
    the previous chunk; its condition number is that of the chunk's own prefix, ``(|S_prev| +
    sum_{j in chunk} |x_j|) / |S_t|`` (logs of the terms in float64, inflated with the rest).
    """
    from attnprec.lognum.reductions import signed_sum_error_bound as ssb

    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    qq = q.double().expand(*batch, *q.shape[-2:]).reshape(-1, *q.shape[-2:])
    kk = k.double().expand(*batch, *k.shape[-2:]).reshape(-1, *k.shape[-2:])
    vv = v.double().expand(*batch, *v.shape[-2:]).reshape(-1, *v.shape[-2:])
    nb, n_q, d = qq.shape
    d_v = vv.shape[-1]
    items = [_log_item(qq[b], kk[b], vv[b], scale, causal) for b in range(nb)]
    l_sabs, l_s, l_z, l_xabs, l_x, l_d, n_vis, y = (
        torch.tensor([it[f] for it in items], dtype=torch.float64) for f in range(8)
    )
    n_vis = n_vis[..., None, None]
    l_d = l_d[..., None]
    amax = (scale * kk).abs().amax(-2)[:, None, :, None]  # per channel, over keys
    if causal and chunk is not None and chunk < n_q:
        e_key, e_kz = _chained(kk, vv, l_s, l_z, scale, u, chunk, amax)
    else:
        e_key = ssb(n_vis, l_sabs, l_s, term_log_error=u * amax)
        e_kz = ssb(n_vis[..., 0], l_z, l_z, term_log_error=u * amax[..., 0])
    sq = (scale * qq).abs()
    t_num = (e_key + u * sq[..., None] + u * (scale * qq[..., None] + l_s).abs()).amax(-2)
    t_den = (e_kz + u * sq + u * (scale * qq + l_z).abs()).amax(-1, keepdim=True)
    e_num = ssb(d, l_xabs, l_x, term_log_error=t_num)
    e_den = ssb(d, l_d, l_d, term_log_error=t_den)
    rel = (1 + 2 * u) * torch.exp(e_num + e_den + u * (l_x - l_d).abs()) - 1
    y_abs = y.abs()
    bound = torch.where(torch.isfinite(rel), upper(rel * y_abs, 64), math.inf)
    out_shape = (*batch, n_q, d_v)
    return bound.reshape(out_shape), y_abs.reshape(out_shape)


def _log_up(x: torch.Tensor, u: float) -> torch.Tensor:
    """An upper bound of a log-sum evaluated in float64 by torch (logcumsumexp/logaddexp:
    a shift, a few exps and a log1p, each within 2 roundings of ``|x| + 1``)."""
    return x + gamma(16, U64) * (x.abs() + 1)


def _chained(kk, vv, l_s, l_z, scale, u, chunk, amax):
    """Log errors of the causal key sums when a state is carried from chunk to chunk.

    Tracked as absolute errors ``E_t`` of the sums (a relative error compounds through
    every step where the running sum nearly cancels; the absolute one does not): a chunk's
    prefix sum takes the computed state ``S^_prev`` (``|S^_prev - S_prev| <= E_prev``) and
    the chunk's terms (log error ``u max|a|``), so by ``signed_sum_error_bound``
    ``E_t <= E_prev + c (n_t + 2) u (|S_prev| + E_prev + X_t) + expm1(u max|a|) X_t +
    |S_t| expm1(e_ulp)``, with ``X_t`` the chunk's sum of ``|x_j|`` so far; then the log
    error is ``-log(1 - E_t / |S_t|)``. Magnitudes here are moderate (plain exp).
    """
    from attnprec.lognum.reductions import SIGNED_SUM_C as C4

    n = kk.shape[-2]
    a = scale * kk  # [nb, n, d]
    lx = a.unsqueeze(-1) + torch.log(vv.abs()).unsqueeze(-2)  # [nb, n, d, d_v]
    g_a = torch.expm1(u * amax[:, 0]).unsqueeze(1)  # [nb, 1, d, 1]

    def run(lterms, lsum, g):
        err = torch.empty_like(lsum)
        e_prev = s_prev = torch.zeros_like(lsum[:, :1])
        for t0 in range(0, n, chunk):
            sl = slice(t0, min(t0 + chunk, n))
            x = torch.exp(_log_up(torch.logcumsumexp(lterms[:, sl], dim=1), u))
            cnt = torch.arange(1, x.shape[1] + 1, dtype=torch.float64) + (t0 > 0)
            cnt = cnt.reshape(1, -1, *([1] * (x.dim() - 2)))
            s_abs = torch.exp(lsum[:, sl])
            tot = s_prev + e_prev + x
            kappa = tot / s_abs
            ulp = u * (lsum[:, sl].abs() + 2 + 2 * torch.log(cnt * kappa))
            e = e_prev + C4 * (cnt + 2) * u * tot + g * x + s_abs * torch.expm1(ulp)
            e = upper(e, 12)
            ratio = e / s_abs
            ok = ratio < 1
            err[:, sl] = torch.where(ok, -torch.log1p(-torch.where(ok, ratio, 0.0)), math.inf)
            e_prev, s_prev = e[:, -1:], s_abs[:, -1:]
        return err

    return run(lx, l_s, g_a), run(a, l_z, g_a[..., 0])


def _lg(x) -> float:
    import mpmath as mp

    return float(mp.log(abs(x))) if x != 0 else -math.inf


def _log_item(q, k, v, scale, causal):
    """One batch item of :func:`log_bound` in 60-digit mpmath: per query the logs of
    ``|S_ce|``, ``sum_j e^{a_jc} |v_je|``, ``Z_c``, of the query sums and the output."""
    import mpmath as mp

    mp.mp.dps = 60
    n_q, d = q.shape
    n_k, d_v = v.shape
    ek = [[mp.exp(mp.mpf(scale) * mp.mpf(x)) for x in row] for row in k.tolist()]
    eq = [[mp.exp(mp.mpf(scale) * mp.mpf(x)) for x in row] for row in q.tolist()]
    vb = [[mp.mpf(x) for x in row] for row in v.tolist()]
    s = [[mp.mpf(0)] * d_v for _ in range(d)]
    sa = [[mp.mpf(0)] * d_v for _ in range(d)]
    z = [mp.mpf(0)] * d
    out = [[] for _ in range(8)]
    for i in range(n_q):
        for j in range(i, i + 1) if causal else (range(n_k) if i == 0 else ()):
            for c in range(d):
                z[c] += ek[j][c]
                for e in range(d_v):
                    s[c][e] += ek[j][c] * vb[j][e]
                    sa[c][e] += ek[j][c] * abs(vb[j][e])
        den = mp.fsum(eq[i][c] * z[c] for c in range(d))
        nums = [mp.fsum(eq[i][c] * s[c][e] for c in range(d)) for e in range(d_v)]
        out[0].append([[_lg(sa[c][e]) for e in range(d_v)] for c in range(d)])
        out[1].append([[_lg(s[c][e]) for e in range(d_v)] for c in range(d)])
        out[2].append([_lg(z[c]) for c in range(d)])
        out[3].append([_lg(mp.fsum(eq[i][c] * abs(s[c][e]) for c in range(d))) for e in range(d_v)])
        out[4].append([_lg(x) for x in nums])
        out[5].append(_lg(den))
        out[6].append(i + 1 if causal else n_k)
        out[7].append([float(x / den) for x in nums])
    return out


def polynomial_bound_long(q, k, v, coeffs, *, causal: bool, scale: float, u: float):
    """:func:`polynomial_bound` for long sequences with positive weights (``|y| <= max|v|``),
    ``D_i`` and ``A_i`` evaluated in float64 instead of Fractions.

    ``s~ = fl(fl(q.k) scale)`` is within ``gamma_{d+1} a`` of ``s`` (``a = scale |q|.|k|``),
    so ``fl(c_p s~^p)`` is within ``gamma_{p(d+1)+4} |c_p| a^p`` (pow within 1 ulp, the
    product, ``c_p`` itself) and ``D~`` within ``gamma_{P(d+1)+P+n+4} A`` of ``D``; ``A`` (sums
    and products of nonnegative numbers, ``P(d+2) + n + 4`` roundings) is inflated by upper.
    """
    from attnprec.attention.taylor import feature_count

    top = len(coeffs) - 1
    n_q, d, n_k = q.shape[-2], q.shape[-1], k.shape[-2]
    qd, kd = q.double(), k.double()
    s = (qd @ kd.transpose(-1, -2)) * scale
    a = (qd.abs() @ kd.abs().transpose(-1, -2)) * abs(scale)
    w = sum(c * s**p for p, c in enumerate(coeffs))
    wa = sum(abs(c) * a**p for p, c in enumerate(coeffs))
    if causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool).tril()
        w, wa = w * mask, wa * mask
    big_a = upper(wa.sum(-1, keepdim=True), top * (d + 2) + n_k + 4)
    d_lo = w.sum(-1, keepdim=True) - gamma(top * (d + 1) + top + n_k + 4, u) * big_a
    eps = (1 + gamma(3 * top + 2, u)) * (1 + gamma(feature_count(d, coeffs) + n_k + 3, u)) - 1
    e_a = eps * big_a
    vmax = visible_vmax(v, n_q, causal)
    ok = d_lo - e_a > 0
    first = torch.where(ok, e_a * 2 * vmax / torch.where(ok, d_lo - e_a, 1.0), math.inf)
    return upper(first + u * (vmax + first), 8)
